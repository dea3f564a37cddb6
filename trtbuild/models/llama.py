"""Llama, Mistral and Qwen2: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP.

They differ only in config.json: Qwen2 always has a qkv bias (and none on o_proj), Mistral attends
within `sliding_window` (here: the usable context stops at the window), Llama 3 scales RoPE.
"""

from __future__ import annotations

from typing import Any

from trtbuild.checkpoint import PretrainedConfig

from .base import Family, WeightRow, llama_like_config

ATTENTION_ROWS = (
    WeightRow("transformer.layers.{i}.attention.qkv.weight",
              ("model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight",
               "model.layers.{i}.self_attn.v_proj.weight")),
    WeightRow("transformer.layers.{i}.attention.qkv.bias",
              ("model.layers.{i}.self_attn.q_proj.bias", "model.layers.{i}.self_attn.k_proj.bias",
               "model.layers.{i}.self_attn.v_proj.bias"), optional=True),
    WeightRow("transformer.layers.{i}.attention.dense.weight", ("model.layers.{i}.self_attn.o_proj.weight",)),
    WeightRow("transformer.layers.{i}.attention.dense.bias", ("model.layers.{i}.self_attn.o_proj.bias",), optional=True),
)
MLP_ROWS = (
    WeightRow("transformer.layers.{i}.mlp.fc.weight", ("model.layers.{i}.mlp.gate_proj.weight",)),
    WeightRow("transformer.layers.{i}.mlp.fc.bias", ("model.layers.{i}.mlp.gate_proj.bias",), optional=True),
    WeightRow("transformer.layers.{i}.mlp.gate.weight", ("model.layers.{i}.mlp.up_proj.weight",)),
    WeightRow("transformer.layers.{i}.mlp.gate.bias", ("model.layers.{i}.mlp.up_proj.bias",), optional=True),
    WeightRow("transformer.layers.{i}.mlp.proj.weight", ("model.layers.{i}.mlp.down_proj.weight",)),
    WeightRow("transformer.layers.{i}.mlp.proj.bias", ("model.layers.{i}.mlp.down_proj.bias",), optional=True),
)
EMBEDDING_ROWS = (WeightRow("transformer.vocab_embedding.weight", ("model.embed_tokens.weight",)),)
HEAD_ROWS = (
    WeightRow("transformer.ln_f.weight", ("model.norm.weight",)),
    WeightRow("lm_head.weight", ("lm_head.weight",), optional=True),
)
NORM_ROWS = (
    WeightRow("transformer.layers.{i}.input_layernorm.weight", ("model.layers.{i}.input_layernorm.weight",)),
    WeightRow("transformer.layers.{i}.post_layernorm.weight", ("model.layers.{i}.post_attention_layernorm.weight",)),
)
WEIGHT_ROWS = EMBEDDING_ROWS + NORM_ROWS + ATTENTION_ROWS + MLP_ROWS + HEAD_ROWS

HF_LORA_MODULES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_dense", "mlp.gate_proj": "mlp_h_to_4h", "mlp.up_proj": "mlp_gate",
    "mlp.down_proj": "mlp_4h_to_h",
}


def read_config(hf: dict[str, Any], arch: str, dtype: str, source: str) -> PretrainedConfig:
    if arch == "Qwen2ForCausalLM":  # q/k/v always biased, o_proj never
        return llama_like_config(hf, arch, dtype, source, qkv_bias=True, dense_bias=False,
                                 sliding_window=bool(hf.get("use_sliding_window", False)))
    return llama_like_config(hf, arch, dtype, source,
                             sliding_window=bool(hf.get("use_sliding_window", arch == "MistralForCausalLM")))


FAMILY = Family(name="llama", architectures=("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"),
                read_config=read_config, weight_rows=WEIGHT_ROWS, hf_lora_modules=HF_LORA_MODULES)
