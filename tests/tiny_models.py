"""The tests' one factory of tiny random models: HF model dirs of every supported architecture with a
real tokenizer (conftest's `tiny_models`), and in-memory (HF model, checkpoint tensors, config) triples
for the quantization tests, whose checkpoint tensors come from the real converter."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PPL_TEXT = SHARED / "data" / "ppl.txt"

TINY_VOCAB = 512
TINY_ARCHS = ("llama", "llama3", "mistral", "qwen2", "gpt2", "qwen3", "phi3", "gemma3")

# arch → (transformers config class, its fields); tiny_hf_config's keyword arguments override them
_CONFIGS = {
    "llama": ("LlamaConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0,
                                  tie_word_embeddings=True)),
    # llama-3 rope scaling, untied lm_head, head_dim != hidden/heads
    "llama3": ("LlamaConfig", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=1, head_dim=32, max_position_embeddings=256,
                                   rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 64},
                                   tie_word_embeddings=False)),
    "mistral": ("MistralConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      sliding_window=None, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=256, rope_theta=1000000.0,
                                  tie_word_embeddings=True)),
    # q/k norms per head, head_dim != hidden / heads
    "qwen3": ("Qwen3Config", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                                  rope_theta=1000000.0, tie_word_embeddings=True)),
    # fused qkv / gate_up, partial rotary (16 of 32), LongRoPE switching at 64 tokens
    "phi3": ("Phi3Config", dict(hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=256,
                                original_max_position_embeddings=64, partial_rotary_factor=0.5,
                                rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                                 "partial_rotary_factor": 0.5,
                                                 "short_factor": [1.0 + 0.1 * j for j in range(8)],
                                                 "long_factor": [2.0 + 0.5 * j for j in range(8)]},
                                sliding_window=None, tie_word_embeddings=False, pad_token_id=0)),
    # four norms a layer, (1 + w) norms, sliding layers (window 6) beside full ones
    "gemma3": ("Gemma3TextConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                        max_position_embeddings=256, sliding_window=6,
                                        layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                                     "sliding_attention"], query_pre_attn_scalar=24,
                                        tie_word_embeddings=True, pad_token_id=0)),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_positions=256)),
}

# name → (arch, config overrides, norm/bias noise): models some tests need beside TINY_ARCHS
TINY_VARIANTS = {
    # 4k positions (long streams for the serving tests), weights scaled up so that greedy text is not
    # one repeated token
    "llama_4k": ("llama", dict(max_position_embeddings=4096, initializer_range=0.2), False),
    # SmolLM2's head layout scaled down (6 heads, 3 KV heads: tp 3), a vocabulary 3 does not divide
    "llama_tp3": ("llama", dict(hidden_size=96, intermediate_size=192, num_attention_heads=6, num_key_value_heads=3),
                  True),
}


def tiny_hf_config(arch: str, **overrides):
    """A small config of each architecture exercising its features (GQA, biases, tying, rope);
    keyword arguments replace its fields (rope_parameters replaces rope_theta too)."""
    import transformers as tf

    if arch not in _CONFIGS:
        raise ValueError(arch)
    cls, fields = _CONFIGS[arch]
    kwargs = {"vocab_size": TINY_VOCAB, "bos_token_id": 0, "eos_token_id": 1, **fields}
    if "rope_parameters" in overrides:
        kwargs.pop("rope_theta", None)
    return getattr(tf, cls)(**{**kwargs, **overrides})


def random_model(config, seed: int = 0, perturb=None):
    """The HF causal LM of `config` with torch's initialization under `seed`, then perturb(name, param)
    for every parameter (under no_grad): the norms and biases transformers initializes to constants."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    if perturb is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                perturb(name, p)
    return model


def _noisy_norms_and_biases(name, p):
    """Random biases and norms, so that every tensor's mapping matters."""
    import torch

    if "norm" in name or "ln_" in name or name.endswith(".bias"):
        p.add_(torch.randn_like(p) * 0.1)


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


def make_tiny_model(arch: str, out_dir: Path, seed: int = 0, safe_serialization: bool = True,
                    noise: bool = True, **overrides) -> Path:
    """An HF model dir of tiny_hf_config(arch, **overrides) with the tokenizer; noise: random norms and biases."""
    model = random_model(tiny_hf_config(arch, **overrides), seed, _noisy_norms_and_biases if noise else None)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=safe_serialization)
    make_tokenizer(out_dir)
    return out_dir


class TinyModels(Mapping):
    """name (TINY_ARCHS, TINY_VARIANTS) → tiny HF model dir under root, each made when first asked for."""

    def __init__(self, root: Path):
        self.root, self._made = root, {}

    def __getitem__(self, name: str) -> Path:
        if name not in self._made:
            if name in TINY_VARIANTS:
                arch, overrides, noise = TINY_VARIANTS[name]
                self._made[name] = make_tiny_model(arch, self.root / name, noise=noise, **overrides)
            elif name in TINY_ARCHS:
                self._made[name] = make_tiny_model(name, self.root / name)
            else:
                raise KeyError(name)
        return self._made[name]

    def __iter__(self):
        return iter((*TINY_ARCHS, *TINY_VARIANTS))

    def __len__(self) -> int:
        return len(TINY_ARCHS) + len(TINY_VARIANTS)


# -- in memory, for the quantization tests ------------------------------------------------------
def converted(model):
    """(checkpoint tensors, PretrainedConfig) of an HF model, by the real converter (float32)."""
    from trtbuild.convert.converter import read_hf_weights
    from trtbuild.convert.hf_config import pretrained_config_from_hf

    with tempfile.TemporaryDirectory(prefix="trtbuild-tiny-") as tmp:
        model.save_pretrained(tmp)
        config = pretrained_config_from_hf(tmp, "float32")
        weights = {k: v.clone() for k, v in read_hf_weights(tmp, config, progress=False).items()}
    return weights, config


def tiny_llama(seed: int = 0, *, llama3_rope: bool = True, tie: bool = False, qkv_bias: bool = False,
               hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, inter: int = 128,
               vocab: int = 128):
    """(hf_model, weights, config) for a tiny random Llama (GQA, optional llama3 rope) or Qwen2 (qkv_bias)."""
    import torch

    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if llama3_rope:
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    config = tiny_hf_config("qwen2" if qkv_bias else "llama", vocab_size=vocab, hidden_size=hidden,
                            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                            intermediate_size=inter, max_position_embeddings=256, rms_norm_eps=1e-5,
                            tie_word_embeddings=tie, rope_parameters=rope)

    def random_norms(name, p):  # so that folding scales into them is exercised
        if "norm" in name:
            p.copy_(1.0 + 0.2 * torch.randn_like(p))

    model = random_model(config, seed, random_norms)
    return (model, *converted(model))


def tiny_gpt2(seed: int = 0, *, hidden: int = 64, layers: int = 2, heads: int = 4, vocab: int = 128):
    """(hf_model, weights, config) for a tiny random GPT-2 (Conv1D weights [in, out] transposed)."""
    import torch

    config = tiny_hf_config("gpt2", vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=256,
                            bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)

    def random_norms_and_biases(name, p):
        if ".ln_" in name:
            p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
        elif name.endswith("bias"):
            p.copy_(0.05 * torch.randn_like(p))

    model = random_model(config, seed, random_norms_and_biases)
    return (model, *converted(model))


def tiny_tokenizer(texts: list[str], vocab_size: int = 128):
    """A whitespace-split BPE `tokenizers.Tokenizer` trained on texts, with at most vocab_size ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["[UNK]"], limit_alphabet=vocab_size // 2,
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    assert tok.get_vocab_size() <= vocab_size
    return tok
