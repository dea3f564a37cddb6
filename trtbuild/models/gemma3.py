"""Gemma 3 (text): four norms a layer (around attention and around the MLP), RMSNorm computing
x * (1 + w) (the checkpoint stores 1 + w), q / k norms before RoPE, embeddings times
sqrt(hidden), GeGLU, and `layer_types` mixing sliding-window layers (their own RoPE base) with
full ones."""

from __future__ import annotations

import math
from typing import Any

from trtbuild.checkpoint import PretrainedConfig
from trtbuild.errors import TrtbuildError

from . import llama
from .base import LAYER_PREFIX, Family, WeightRow, llama_like_config, rope_from_hf

LAYER_TYPES = ("sliding_attention", "full_attention")


def _norm_row(checkpoint: str, hf: str) -> WeightRow:
    return WeightRow(f"transformer.layers.{{i}}.{checkpoint}.weight", (f"model.layers.{{i}}.{hf}.weight",), offset=1.0)


WEIGHT_ROWS = llama.EMBEDDING_ROWS + (
    _norm_row("input_layernorm", "input_layernorm"),
    _norm_row("post_attention_norm", "post_attention_layernorm"),
    _norm_row("post_layernorm", "pre_feedforward_layernorm"),  # the MLP's input norm, as in every family
    _norm_row("post_mlp_norm", "post_feedforward_layernorm"),
    _norm_row("attention.q_norm", "self_attn.q_norm"),
    _norm_row("attention.k_norm", "self_attn.k_norm"),
) + llama.ATTENTION_ROWS + llama.MLP_ROWS + (
    WeightRow("transformer.ln_f.weight", ("model.norm.weight",), offset=1.0),
    WeightRow("lm_head.weight", ("lm_head.weight",), optional=True),
)


def read_config(hf: dict[str, Any], arch: str, dtype: str, source: str) -> PretrainedConfig:
    for field in ("attn_logit_softcapping", "final_logit_softcapping"):
        if hf.get(field) is not None:
            raise TrtbuildError(f"{source}: {field} {hf[field]} is not supported (Gemma 2's softcapping)")
    if hf.get("use_bidirectional_attention"):
        raise TrtbuildError(f"{source}: use_bidirectional_attention is not supported (a causal LM attends causally)")
    layer_types = hf.get("layer_types") or ["full_attention"] * hf["num_hidden_layers"]
    unknown = sorted(set(layer_types) - set(LAYER_TYPES))
    if unknown or len(layer_types) != hf["num_hidden_layers"]:
        raise TrtbuildError(f"{source}: layer_types {unknown or len(layer_types)} not understood "
                            f"({', '.join(LAYER_TYPES)}, one per layer)")
    params = hf.get("rope_parameters") or {}
    full = dict(hf, rope_parameters=params.get("full_attention", params))
    config = llama_like_config(full, arch, dtype, source, qk_norm=True,
                               hidden_act=hf.get("hidden_activation", hf.get("hidden_act", "gelu_pytorch_tanh")),
                               embedding_multiplier=math.sqrt(hf["hidden_size"]),
                               attention_scale=float(hf.get("query_pre_attn_scalar") or hf.get("head_dim")) ** -0.5,
                               tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)))
    if "sliding_attention" in layer_types:
        local_base, local_scaling = rope_from_hf(dict(hf, rope_parameters=params.get("sliding_attention", {}),
                                                      rope_theta=hf.get("rope_local_base_freq", 10000.0)),
                                                 source, ("default",))
        config.layer_types, config.sliding_window = list(layer_types), int(hf["sliding_window"])
        config.rotary_base_local = local_base
    return config


def layer_tensors(c: PretrainedConfig) -> dict[str, tuple[int, ...]]:
    H, D = c.hidden_size, c.head_size
    return {"input_layernorm.weight": (H,), "post_attention_norm.weight": (H,), "post_layernorm.weight": (H,),
            "post_mlp_norm.weight": (H,), "attention.q_norm.weight": (D,), "attention.k_norm.weight": (D,)}


def onnx_layer(ops, i: int, pending: str | None, residual: str) -> tuple[str, str]:
    """h + norm(attention(norm(h))), then h + norm(mlp(norm(h))); the last add left pending."""
    p = LAYER_PREFIX.format(i)
    x, residual = ops.add_norm(pending, residual, p + "input_layernorm")
    attn = ops.norm(ops.self_attention(x, i), p + "post_attention_norm")
    x, residual = ops.add_norm(attn, residual, p + "post_layernorm")
    return ops.norm(ops.mlp(x, i), p + "post_mlp_norm"), residual


def torch_layer(model, i: int, h, linear_hook=None, kv_hook=None):
    p = LAYER_PREFIX.format(i)
    attn = model.attention(i, model.norm(p + "input_layernorm", h), linear_hook, kv_hook)
    h = h + model.norm(p + "post_attention_norm", attn)
    return h + model.norm(p + "post_mlp_norm", model.mlp(i, model.norm(p + "post_layernorm", h), linear_hook))


FAMILY = Family(name="gemma3", architectures=("Gemma3ForCausalLM",), read_config=read_config, weight_rows=WEIGHT_ROWS,
                hf_lora_modules=llama.HF_LORA_MODULES, layer_tensors=layer_tensors, onnx_layer=onnx_layer,
                torch_layer=torch_layer)
