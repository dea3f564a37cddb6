"""Read a Hugging Face config.json (transformers 4.x or 5.x) into a trtbuild PretrainedConfig."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trtbuild.checkpoint import PretrainedConfig
from trtbuild.errors import TrtbuildError
from trtbuild.fsutil import read_json

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "GPT2LMHeadModel")


def read_hf_config(model_dir: str | Path) -> dict[str, Any]:
    """Load config.json of an HF model dir, with errors that name the file."""
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise TrtbuildError(f"--model_dir {model_dir} is not a directory")
    return read_json(path, "--model_dir must be a Hugging Face model dir with a config.json")


def architecture_of(hf: dict[str, Any], source: str) -> str:
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise TrtbuildError(
            f"{source}: architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return arch


def _rope(hf: dict[str, Any], source: str) -> tuple[float, dict[str, Any] | None]:
    """rope theta and scaling from either `rope_theta`/`rope_scaling` (4.x) or `rope_parameters` (5.x)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type in (None, "default"):
        return float(theta), None
    if rope_type == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        missing = [k for k in keys if k not in scaling]
        if missing:
            raise TrtbuildError(f"{source}: llama3 rope scaling lacks {missing}")
        return float(theta), {"type": "llama3", **{k: scaling[k] for k in keys}}
    if rope_type == "linear":
        return float(theta), {"type": "linear", "factor": float(scaling["factor"])}
    raise TrtbuildError(f"{source}: rope scaling type {rope_type!r} is not supported (supported: default, linear, llama3)")


def _token_ids(hf: dict[str, Any]) -> dict[str, Any]:
    return {k: hf.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}


def _llama_like(hf: dict[str, Any], arch: str, dtype: str, source: str) -> PretrainedConfig:
    heads = hf["num_attention_heads"]
    head_size = hf.get("head_dim") or hf["hidden_size"] // heads
    theta, scaling = _rope(hf, source)
    qkv_bias = arch == "Qwen2ForCausalLM" or bool(hf.get("attention_bias", False))
    max_pos = hf.get("max_position_embeddings", 2048)
    window = hf.get("sliding_window")
    if hf.get("use_sliding_window", arch == "MistralForCausalLM") and window and window < max_pos:
        # Attention here is global: beyond the window it would differ from the model, so the
        # usable context (and the builder's max_seq_len limit) stops at the window.
        max_pos = window
    return PretrainedConfig(
        architecture=arch, dtype=dtype,
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads, head_size=head_size,
        intermediate_size=hf["intermediate_size"], hidden_act=hf.get("hidden_act", "silu"),
        norm_type="rms_norm", norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        position_embedding_type="rope_gpt_neox",
        max_position_embeddings=max_pos,
        rotary_base=theta, rotary_scaling=scaling,
        attn_bias=qkv_bias, dense_bias=bool(hf.get("attention_bias", False)) and arch != "Qwen2ForCausalLM",
        mlp_bias=bool(hf.get("mlp_bias", False)), gated_mlp=True,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        **_token_ids(hf),
    )


def _gpt2(hf: dict[str, Any], dtype: str, source: str) -> PretrainedConfig:
    hidden = hf["n_embd"]
    heads = hf["n_head"]
    return PretrainedConfig(
        architecture="GPT2LMHeadModel", dtype=dtype,
        vocab_size=hf["vocab_size"], hidden_size=hidden, num_hidden_layers=hf["n_layer"],
        num_attention_heads=heads, num_key_value_heads=heads, head_size=hidden // heads,
        intermediate_size=hf.get("n_inner") or 4 * hidden,
        hidden_act=hf.get("activation_function", "gelu_new"),
        norm_type="layer_norm", norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)),
        position_embedding_type="learned_absolute", max_position_embeddings=hf.get("n_positions", 1024),
        attn_bias=True, dense_bias=True, mlp_bias=True, gated_mlp=False,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        **_token_ids(hf),
    )


def pretrained_config_from_hf(model_dir: str | Path, dtype: str) -> PretrainedConfig:
    """Translate an HF model dir's config.json into a checkpoint config of the given dtype."""
    hf = read_hf_config(model_dir)
    source = str(Path(model_dir) / "config.json")
    arch = architecture_of(hf, source)
    try:
        if arch == "GPT2LMHeadModel":
            config = _gpt2(hf, dtype, source)
        else:
            config = _llama_like(hf, arch, dtype, source)
    except KeyError as e:
        raise TrtbuildError(f"{source}: missing field {e.args[0]!r} required for {arch}") from None
    supported_acts = ("silu", "gelu_new", "gelu_pytorch_tanh", "gelu", "relu")
    if config.hidden_act not in supported_acts:
        raise TrtbuildError(f"{source}: hidden_act {config.hidden_act!r} is not supported ({', '.join(supported_acts)})")
    config.producer = {"name": "trtbuild.convert", "source_model_dir": str(Path(model_dir).resolve()),
                       "source_architecture": arch}
    return config
