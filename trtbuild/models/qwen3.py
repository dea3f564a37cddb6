"""Qwen3: Llama plus an RMSNorm over each head of q and of k before RoPE (`q_norm`, `k_norm`),
no qkv bias, an explicit head_dim."""

from __future__ import annotations

from typing import Any

from trtbuild.checkpoint import PretrainedConfig

from . import llama
from .base import Family, WeightRow, llama_like_config

QK_NORM_ROWS = (
    WeightRow("transformer.layers.{i}.attention.q_norm.weight", ("model.layers.{i}.self_attn.q_norm.weight",)),
    WeightRow("transformer.layers.{i}.attention.k_norm.weight", ("model.layers.{i}.self_attn.k_norm.weight",)),
)


def read_config(hf: dict[str, Any], arch: str, dtype: str, source: str) -> PretrainedConfig:
    return llama_like_config(hf, arch, dtype, source, sliding_window=bool(hf.get("use_sliding_window", False)),
                             qk_norm=True)


FAMILY = Family(name="qwen3", architectures=("Qwen3ForCausalLM",), read_config=read_config,
                weight_rows=llama.WEIGHT_ROWS + QK_NORM_ROWS, hf_lora_modules=llama.HF_LORA_MODULES)
