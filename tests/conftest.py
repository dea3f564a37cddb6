"""Shared fixtures: tiny random HF models of every supported architecture, with a real tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PPL_TEXT = SHARED / "data" / "ppl.txt"
DEFAULT_MODEL = "smollm2-135m-instruct"

TINY_VOCAB = 512


def make_tokenizer(out_dir: Path, vocab_size: int = TINY_VOCAB) -> None:
    """A byte-level BPE trained on real text, saved as tokenizer.json (what the runtime reads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    lines = PPL_TEXT.read_text().splitlines()[:2000]
    tok.train_from_iterator(lines, trainer)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(
        '{"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast"}')


def tiny_hf_config(arch: str):
    """A small config of each architecture exercising its features (GQA, biases, tying, rope)."""
    import transformers as tf

    common = dict(vocab_size=TINY_VOCAB, bos_token_id=0, eos_token_id=1)
    if arch == "llama":
        return tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0,
                              tie_word_embeddings=True, **common)
    if arch == "llama3":  # llama-3 rope scaling, untied lm_head, head_dim != hidden/heads
        return tf.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=1, head_dim=32, max_position_embeddings=256,
                              rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                               "original_max_position_embeddings": 64},
                              tie_word_embeddings=False, **common)
    if arch == "mistral":
        return tf.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=256, sliding_window=None,
                                tie_word_embeddings=False, **common)
    if arch == "qwen2":
        return tf.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=256, rope_theta=1000000.0,
                              tie_word_embeddings=True, **common)
    if arch == "qwen3":  # q/k norms per head, head_dim != hidden / heads
        return tf.Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=32, max_position_embeddings=256, rope_theta=1000000.0,
                              tie_word_embeddings=True, **common)
    if arch == "phi3":  # fused qkv / gate_up, partial rotary (16 of 32), LongRoPE switching at 64 tokens
        return tf.Phi3Config(hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=256, original_max_position_embeddings=64,
                             partial_rotary_factor=0.5, rope_parameters={
                                 "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                 "short_factor": [1.0 + 0.1 * j for j in range(8)],
                                 "long_factor": [2.0 + 0.5 * j for j in range(8)]},
                             sliding_window=None, tie_word_embeddings=False, pad_token_id=0, **common)
    if arch == "gemma3":  # four norms a layer, (1 + w) norms, sliding layers (window 6) beside full ones
        return tf.Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=6,
                                   layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                                "sliding_attention"], query_pre_attn_scalar=24,
                                   tie_word_embeddings=True, pad_token_id=0, **common)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **common)
    raise ValueError(arch)


TINY_ARCHS = ("llama", "llama3", "mistral", "qwen2", "gpt2", "qwen3", "phi3", "gemma3")


def make_tiny_model(arch: str, out_dir: Path, seed: int = 0, safe_serialization: bool = True) -> Path:
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(tiny_hf_config(arch))
    with torch.no_grad():  # random biases and norms, so that every tensor's mapping matters
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=safe_serialization)
    make_tokenizer(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """arch → tiny HF model dir, made once per session."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: make_tiny_model(arch, root / arch) for arch in TINY_ARCHS}


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """The default real model, fetched by the project's own command into the cache."""
    from trtbuild.fetch import fetch_model

    return fetch_model(DEFAULT_MODEL)


def engines_in_both_forms(model_dir: Path, root: Path, **limits) -> dict:
    """convert → build with the attention plugin on ("auto") and off ("disable") → runners (2 threads)."""
    from trtbuild.builder import build_engine
    from trtbuild.convert.converter import convert_checkpoint
    from trtbuild.engine import BuildConfig, PluginConfig
    from trtbuild.runtime import ModelRunner

    convert_checkpoint(model_dir, root / "ckpt", progress=False)
    runners = {}
    for attention in ("auto", "disable"):
        build = BuildConfig(**limits, plugin_config=PluginConfig(gpt_attention_plugin=attention, norm_plugin=attention))
        build_engine(root / "ckpt", root / attention, build, progress=False)
        runners[attention] = ModelRunner.from_dir(root / attention, num_threads=2)
    return runners


def op_types(graph) -> set[str]:
    """Op types of an ONNX graph and of every If branch inside it."""
    import onnx

    ops = set()
    for node in graph.node:
        ops.add(node.op_type)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                ops |= op_types(attr.g)
    return ops
