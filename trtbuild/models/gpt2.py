"""GPT-2: learned positions, LayerNorm with biases, GELU MLP, Conv1D weights stored [in, out]."""

from __future__ import annotations

from typing import Any

from trtbuild.checkpoint import PretrainedConfig

from .base import Family, WeightRow, token_ids

WEIGHT_ROWS = (
    WeightRow("transformer.vocab_embedding.weight", ("transformer.wte.weight",)),
    WeightRow("transformer.position_embedding.weight", ("transformer.wpe.weight",)),
    WeightRow("transformer.layers.{i}.input_layernorm.weight", ("transformer.h.{i}.ln_1.weight",)),
    WeightRow("transformer.layers.{i}.input_layernorm.bias", ("transformer.h.{i}.ln_1.bias",)),
    WeightRow("transformer.layers.{i}.attention.qkv.weight", ("transformer.h.{i}.attn.c_attn.weight",), transpose=True),
    WeightRow("transformer.layers.{i}.attention.qkv.bias", ("transformer.h.{i}.attn.c_attn.bias",)),
    WeightRow("transformer.layers.{i}.attention.dense.weight", ("transformer.h.{i}.attn.c_proj.weight",), transpose=True),
    WeightRow("transformer.layers.{i}.attention.dense.bias", ("transformer.h.{i}.attn.c_proj.bias",)),
    WeightRow("transformer.layers.{i}.post_layernorm.weight", ("transformer.h.{i}.ln_2.weight",)),
    WeightRow("transformer.layers.{i}.post_layernorm.bias", ("transformer.h.{i}.ln_2.bias",)),
    WeightRow("transformer.layers.{i}.mlp.fc.weight", ("transformer.h.{i}.mlp.c_fc.weight",), transpose=True),
    WeightRow("transformer.layers.{i}.mlp.fc.bias", ("transformer.h.{i}.mlp.c_fc.bias",)),
    WeightRow("transformer.layers.{i}.mlp.proj.weight", ("transformer.h.{i}.mlp.c_proj.weight",), transpose=True),
    WeightRow("transformer.layers.{i}.mlp.proj.bias", ("transformer.h.{i}.mlp.c_proj.bias",)),
    WeightRow("transformer.ln_f.weight", ("transformer.ln_f.weight",)),
    WeightRow("transformer.ln_f.bias", ("transformer.ln_f.bias",)),
    WeightRow("lm_head.weight", ("lm_head.weight",), optional=True),
)

HF_LORA_MODULES = {
    "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_dense", "mlp.c_fc": "mlp_h_to_4h", "mlp.c_proj": "mlp_4h_to_h",
}


def read_config(hf: dict[str, Any], arch: str, dtype: str, source: str) -> PretrainedConfig:
    hidden, heads = hf["n_embd"], hf["n_head"]
    return PretrainedConfig(
        architecture=arch, dtype=dtype,
        vocab_size=hf["vocab_size"], hidden_size=hidden, num_hidden_layers=hf["n_layer"],
        num_attention_heads=heads, num_key_value_heads=heads, head_size=hidden // heads,
        intermediate_size=hf.get("n_inner") or 4 * hidden,
        hidden_act=hf.get("activation_function", "gelu_new"),
        norm_type="layer_norm", norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)),
        position_embedding_type="learned_absolute", max_position_embeddings=hf.get("n_positions", 1024),
        attn_bias=True, dense_bias=True, mlp_bias=True, gated_mlp=False,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        **token_ids(hf),
    )


FAMILY = Family(name="gpt2", architectures=("GPT2LMHeadModel",), read_config=read_config, weight_rows=WEIGHT_ROWS,
                hf_lora_modules=HF_LORA_MODULES, hf_layer_prefix="transformer.h.")
