"""Phi-3 / 3.5 / 4-mini: Llama's layer with fused `qkv_proj` and `gate_up_proj` (gate first),
partial rotary (`partial_rotary_factor`) and LongRoPE scaling, which switches from the short to
the long factors once a sequence passes `original_max_position_embeddings`."""

from __future__ import annotations

from typing import Any

from trtbuild.checkpoint import PretrainedConfig

from . import llama
from .base import Family, WeightRow, llama_like_config

WEIGHT_ROWS = llama.EMBEDDING_ROWS + llama.NORM_ROWS + (
    WeightRow("transformer.layers.{i}.attention.qkv.weight", ("model.layers.{i}.self_attn.qkv_proj.weight",)),
    WeightRow("transformer.layers.{i}.attention.dense.weight", ("model.layers.{i}.self_attn.o_proj.weight",)),
    WeightRow("transformer.layers.{i}.mlp.fc.weight", ("model.layers.{i}.mlp.gate_up_proj.weight",), part=(0, 2)),
    WeightRow("transformer.layers.{i}.mlp.gate.weight", ("model.layers.{i}.mlp.gate_up_proj.weight",), part=(1, 2)),
    WeightRow("transformer.layers.{i}.mlp.proj.weight", ("model.layers.{i}.mlp.down_proj.weight",)),
) + llama.HEAD_ROWS

# gate_up_proj's outputs are two checkpoint linears' (fc, then gate): one A, its B split by rows
HF_LORA_MODULES = {"self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_dense",
                   "mlp.gate_up_proj": "mlp_h_to_4h+mlp_gate", "mlp.down_proj": "mlp_4h_to_h"}


def read_config(hf: dict[str, Any], arch: str, dtype: str, source: str) -> PretrainedConfig:
    config = llama_like_config(hf, arch, dtype, source, sliding_window=True, qkv_bias=False, dense_bias=False,
                               rope_types=("default", "longrope"))
    if config.rotary_scaling is not None:  # longrope: what the runtime needs to switch factors
        sc = dict(config.rotary_scaling)
        sc.setdefault("original_max_position_embeddings", hf.get("original_max_position_embeddings", 4096))
        sc["max_position_embeddings"] = hf.get("max_position_embeddings", 4096)
        config.rotary_scaling = sc
    return config


FAMILY = Family(name="phi3", architectures=("Phi3ForCausalLM",), read_config=read_config, weight_rows=WEIGHT_ROWS,
                hf_lora_modules=HF_LORA_MODULES)
