"""HF tensor name → checkpoint tensor name, one table per architecture family.

Each row maps one checkpoint tensor to the HF tensor(s) it is made of. Rows with several HF
sources are stacked along the output dimension (q, k, v → qkv), like vLLM's stacked_params_mapping.
`{i}` is the layer index. `transpose` marks GPT-2's Conv1D weights, stored [in, out].
"""

from __future__ import annotations

from dataclasses import dataclass

from trtbuild.checkpoint import PretrainedConfig


@dataclass(frozen=True)
class WeightRow:
    checkpoint: str
    sources: tuple[str, ...]
    transpose: bool = False
    optional: bool = False  # present only when the config says so (filtered by `rows_for`)


LLAMA_ROWS = (
    WeightRow("transformer.vocab_embedding.weight", ("model.embed_tokens.weight",)),
    WeightRow("transformer.layers.{i}.input_layernorm.weight", ("model.layers.{i}.input_layernorm.weight",)),
    WeightRow("transformer.layers.{i}.attention.qkv.weight",
              ("model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight",
               "model.layers.{i}.self_attn.v_proj.weight")),
    WeightRow("transformer.layers.{i}.attention.qkv.bias",
              ("model.layers.{i}.self_attn.q_proj.bias", "model.layers.{i}.self_attn.k_proj.bias",
               "model.layers.{i}.self_attn.v_proj.bias"), optional=True),
    WeightRow("transformer.layers.{i}.attention.dense.weight", ("model.layers.{i}.self_attn.o_proj.weight",)),
    WeightRow("transformer.layers.{i}.attention.dense.bias", ("model.layers.{i}.self_attn.o_proj.bias",), optional=True),
    WeightRow("transformer.layers.{i}.post_layernorm.weight", ("model.layers.{i}.post_attention_layernorm.weight",)),
    WeightRow("transformer.layers.{i}.mlp.fc.weight", ("model.layers.{i}.mlp.gate_proj.weight",)),
    WeightRow("transformer.layers.{i}.mlp.fc.bias", ("model.layers.{i}.mlp.gate_proj.bias",), optional=True),
    WeightRow("transformer.layers.{i}.mlp.gate.weight", ("model.layers.{i}.mlp.up_proj.weight",)),
    WeightRow("transformer.layers.{i}.mlp.gate.bias", ("model.layers.{i}.mlp.up_proj.bias",), optional=True),
    WeightRow("transformer.layers.{i}.mlp.proj.weight", ("model.layers.{i}.mlp.down_proj.weight",)),
    WeightRow("transformer.layers.{i}.mlp.proj.bias", ("model.layers.{i}.mlp.down_proj.bias",), optional=True),
    WeightRow("transformer.ln_f.weight", ("model.norm.weight",)),
    WeightRow("lm_head.weight", ("lm_head.weight",), optional=True),
)

GPT2_ROWS = (
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

WEIGHT_TABLES: dict[str, tuple[WeightRow, ...]] = {
    "LlamaForCausalLM": LLAMA_ROWS,
    "MistralForCausalLM": LLAMA_ROWS,
    "Qwen2ForCausalLM": LLAMA_ROWS,
    "GPT2LMHeadModel": GPT2_ROWS,
}

# HF tensors that carry no weights of the model (buffers saved by old transformers versions).
IGNORED_SUFFIXES = (".rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")


def rows_for(config: PretrainedConfig, wanted: set[str]) -> list[WeightRow]:
    """Every row of the config's architecture, expanded per layer, kept if the config wants it."""
    rows = []
    for row in WEIGHT_TABLES[config.architecture]:
        names = ([row.checkpoint.format(i=i) for i in range(config.num_hidden_layers)]
                 if "{i}" in row.checkpoint else [row.checkpoint])
        for i, name in enumerate(names):
            if name not in wanted:
                continue
            sources = tuple(s.format(i=i) for s in row.sources)
            rows.append(WeightRow(name, sources, row.transpose, row.optional))
    return rows
