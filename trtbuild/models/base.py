"""What an architecture family module provides, and what families share.

A family module (llama.py, gpt2.py, qwen3.py, ...) defines one `Family`: how to read its HF
config.json, its weight table (HF tensor → checkpoint tensor), the tensors and linears of one
decoder layer (with the roles quantization, LoRA and rank splitting read), and the layer's block
twice: as ONNX (through the network's `LayerOps`) and in torch (through the `ReferenceModel` that
calibration runs). Everything else reads the family through `trtbuild.models.family_of(config)`
and never tests a family's name.

Checkpoint names: per layer i under `transformer.layers.{i}.`; shared tensors are
`transformer.vocab_embedding.weight`, `transformer.position_embedding.weight` (learned positions),
`transformer.ln_f.weight` / `.bias` and `lm_head.weight` (absent when tied). Linear weights are
stored [out, in].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from trtbuild.checkpoint import PretrainedConfig
from trtbuild.errors import TrtbuildError

LAYER_PREFIX = "transformer.layers.{}."


@dataclass(frozen=True)
class WeightRow:
    """One checkpoint tensor made of HF tensor(s): several sources are stacked along the output
    dimension (q, k, v → qkv, like vLLM's stacked_params_mapping); `part` (k, n) takes the k-th of n
    equal row blocks of a single source (Phi-3's gate_up_proj → fc, gate); `offset` is added to the
    values (Gemma's norms compute x * (1 + w): the checkpoint stores 1 + w). `{i}` is the layer."""

    checkpoint: str
    sources: tuple[str, ...]
    transpose: bool = False  # GPT-2's Conv1D weights are stored [in, out]
    optional: bool = False  # present only when the config says so (filtered by `rows_for`)
    part: tuple[int, int] | None = None
    offset: float = 0.0


@dataclass(frozen=True)
class SmoothFold:
    """Where AWQ / SmoothQuant fold 1/s of a linear's input scale s, so that no Mul is left in the
    graph: into the norm that makes the input (`norm`), into the rows of the linear whose output
    feeds it (`rows` of `target`: attention.dense's input is V's output when no head shares V), or
    into the whole linear multiplying it (`linear`: a gated MLP's proj input is act(fc) * gate)."""

    kind: str  # "norm" | "rows" | "linear"
    target: str  # name under transformer.layers.{i}. (without .weight)
    rows: str = ""  # for "rows": "v" (the V rows of attention.qkv)


@dataclass(frozen=True)
class Linear:
    """One linear of a decoder layer, under transformer.layers.{i}."""

    name: str  # e.g. "attention.qkv"
    in_features: int
    out_features: int
    input: str  # what feeds it: linears with the same input are one calibration / smoothing group
    bias: bool = False
    fold: SmoothFold | None = None  # None: a smoothing scale stays a prequant Mul before the GEMM
    parallel: str = "column"  # "column" (split outputs over ranks) or "row" (split inputs, then reduce)
    lora_modules: tuple[str, ...] = ()  # TensorRT-LLM's --lora_target_modules names acting on it


# -- what every family's checkpoint holds ---------------------------------------------------------
def expected_shapes(config: PretrainedConfig) -> dict[str, tuple[int, ...]]:
    """Name → shape of every floating-point tensor a checkpoint of this config must hold."""
    from trtbuild.models import family_of

    c, family = config, family_of(config)
    H, V = c.hidden_size, c.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"transformer.vocab_embedding.weight": (V, H)}
    if c.position_embedding_type == "learned_absolute":
        shapes["transformer.position_embedding.weight"] = (c.max_position_embeddings, H)
    layer_tensors, linears = family.layer_tensors(c), family.linears(c)
    for i in range(c.num_hidden_layers):
        p = LAYER_PREFIX.format(i)
        for name, shape in layer_tensors.items():
            shapes[p + name] = shape
        for lin in linears:
            shapes[p + lin.name + ".weight"] = (lin.out_features, lin.in_features)
            if lin.bias:
                shapes[p + lin.name + ".bias"] = (lin.out_features,)
    shapes["transformer.ln_f.weight"] = (H,)
    if c.norm_type == "layer_norm":
        shapes["transformer.ln_f.bias"] = (H,)
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, H)
    return shapes


def layer_linears(config: PretrainedConfig) -> tuple[Linear, ...]:
    """The linears of one decoder layer of the config's family."""
    from trtbuild.models import family_of

    return family_of(config).linears(config)


def linear_names(config: PretrainedConfig) -> list[str]:
    """The checkpoint prefixes (without `.weight`) of every linear layer that quantization touches."""
    linears = layer_linears(config)
    return [LAYER_PREFIX.format(i) + lin.name for i in range(config.num_hidden_layers) for lin in linears]


def input_groups(config: PretrainedConfig, i: int) -> list[list[str]]:
    """Linears of layer i grouped by shared input, in execution order (qkv, dense, fc + gate, proj)."""
    groups: dict[str, list[str]] = {}
    for lin in layer_linears(config):
        groups.setdefault(lin.input, []).append(LAYER_PREFIX.format(i) + lin.name)
    return list(groups.values())


def linear_spec(config: PretrainedConfig, prefix: str) -> Linear:
    """The spec of the linear at checkpoint prefix `transformer.layers.{i}.NAME`."""
    name = prefix.split(".", 3)[3] if prefix.startswith("transformer.layers.") else prefix
    for lin in layer_linears(config):
        if lin.name == name:
            return lin
    raise TrtbuildError(f"{prefix} is not a linear of {config.architecture}")


def rows_for(config: PretrainedConfig, wanted: set[str]) -> list[WeightRow]:
    """Every row of the config's weight table, expanded per layer, kept if the config wants it."""
    from trtbuild.models import family_of

    rows = []
    for row in family_of(config).weight_rows:
        names = ([row.checkpoint.format(i=i) for i in range(config.num_hidden_layers)]
                 if "{i}" in row.checkpoint else [row.checkpoint])
        for i, name in enumerate(names):
            if name in wanted:
                rows.append(WeightRow(name, tuple(s.format(i=i) for s in row.sources), row.transpose, row.optional,
                                      row.part, row.offset))
    return rows


# -- the standard layer: what most families are made of -------------------------------------------
def standard_linears(c: PretrainedConfig, attention_norm: str = "input_layernorm",
                     mlp_norm: str = "post_layernorm") -> tuple[Linear, ...]:
    """qkv, dense, fc (+ gate), proj: a pre-norm decoder layer's linears, the inputs of qkv and of
    the MLP made by the norms named."""
    H, I = c.hidden_size, c.intermediate_size
    same_heads = c.num_key_value_heads == c.num_attention_heads
    linears = [
        Linear("attention.qkv", H, c.q_dim + 2 * c.kv_dim, attention_norm, c.attn_bias,
               SmoothFold("norm", attention_norm), "column", ("attn_qkv", "attn_q", "attn_k", "attn_v")),
        Linear("attention.dense", c.q_dim, H, "attention", c.dense_bias,
               SmoothFold("rows", "attention.qkv", "v") if same_heads else None, "row", ("attn_dense",)),
        Linear("mlp.fc", H, I, mlp_norm, c.mlp_bias, SmoothFold("norm", mlp_norm), "column", ("mlp_h_to_4h",)),
    ]
    if c.gated_mlp:
        linears.append(Linear("mlp.gate", H, I, mlp_norm, c.mlp_bias, SmoothFold("norm", mlp_norm), "column",
                              ("mlp_gate",)))
    linears.append(Linear("mlp.proj", I, H, "mlp.act", c.mlp_bias, SmoothFold("linear", "mlp.gate") if c.gated_mlp
                          else None, "row", ("mlp_4h_to_h",)))
    return tuple(linears)


def standard_layer_tensors(c: PretrainedConfig) -> dict[str, tuple[int, ...]]:
    """The two norms of a pre-norm layer (with biases for layer_norm), and q/k norms if it has them."""
    H = c.hidden_size
    shapes: dict[str, tuple[int, ...]] = {"input_layernorm.weight": (H,), "post_layernorm.weight": (H,)}
    if c.norm_type == "layer_norm":
        shapes.update({"input_layernorm.bias": (H,), "post_layernorm.bias": (H,)})
    if c.qk_norm:
        shapes.update({"attention.q_norm.weight": (c.head_size,), "attention.k_norm.weight": (c.head_size,)})
    return shapes


def pre_norm_onnx_layer(ops, i: int, pending: str | None, residual: str | None) -> tuple[str, str]:
    """h + attention(norm(h)), then h + mlp(norm(h)); the last add is left pending, so that the
    next layer's norm fuses it (SkipSimplifiedLayerNormalization)."""
    p = LAYER_PREFIX.format(i)
    x, residual = ops.add_norm(pending, residual, p + "input_layernorm")
    attn = ops.self_attention(x, i)
    x, residual = ops.add_norm(attn, residual, p + "post_layernorm")
    return ops.mlp(x, i), residual


def pre_norm_torch_layer(model, i: int, h, linear_hook=None, kv_hook=None):
    """The same layer in torch, on the reference model's helpers."""
    p = LAYER_PREFIX.format(i)
    h = h + model.attention(i, model.norm(p + "input_layernorm", h), linear_hook, kv_hook)
    return h + model.mlp(i, model.norm(p + "post_layernorm", h), linear_hook)


@dataclass(frozen=True)
class Family:
    """Everything trtbuild knows about one architecture family; the defaults are the standard
    pre-norm layer (two norms, qkv / dense / fc (+ gate) / proj) that most families are made of."""

    name: str
    architectures: tuple[str, ...]  # HF `architectures` names read by this family
    read_config: Callable[[dict[str, Any], str, str, str], PretrainedConfig]  # (hf, arch, dtype, source)
    weight_rows: tuple[WeightRow, ...]
    hf_lora_modules: dict[str, str]  # HF module in a layer → TRT-LLM module ("m1+m2": its B split by rows)
    hf_layer_prefix: str = "model.layers."  # how its layers are named in HF module paths (LoRA)
    layer_tensors: Callable[[PretrainedConfig], dict[str, tuple[int, ...]]] = standard_layer_tensors  # per layer
    linears: Callable[[PretrainedConfig], tuple[Linear, ...]] = standard_linears  # in execution order
    onnx_layer: Callable = pre_norm_onnx_layer  # (ops: network.LayerOps, i, pending, residual) -> (pending, residual)
    torch_layer: Callable = pre_norm_torch_layer  # (model: ReferenceModel, i, h, linear_hook, kv_hook) -> h


# -- reading HF configs -----------------------------------------------------------------------------
ROPE_TYPES = ("default", "linear", "llama3")


def rope_from_hf(hf: dict[str, Any], source: str, types: tuple[str, ...] = ROPE_TYPES
                 ) -> tuple[float, dict[str, Any] | None]:
    """RoPE theta and scaling from either `rope_theta`/`rope_scaling` (4.x) or `rope_parameters`
    (5.x); a scaling type outside `types` is refused by name."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type not in types:
        raise TrtbuildError(f"{source}: rope scaling type {rope_type!r} is not supported for "
                            f"{(hf.get('architectures') or ['this model'])[0]} (supported: {', '.join(types)})")
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
    skip = ("type", "rope_type", "rope_theta", "partial_rotary_factor")
    return float(theta), {"type": rope_type, **{k: v for k, v in scaling.items() if k not in skip}}


def token_ids(hf: dict[str, Any]) -> dict[str, Any]:
    return {k: hf.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}


def llama_like_config(hf: dict[str, Any], arch: str, dtype: str, source: str, *, qkv_bias: bool | None = None,
                      dense_bias: bool | None = None, sliding_window: bool = False,
                      rope_types: tuple[str, ...] = ROPE_TYPES, **fields: Any) -> PretrainedConfig:
    """The PretrainedConfig of a Llama-shaped HF config (RMSNorm, RoPE, gated MLP); `fields`
    override or add to what is read. `sliding_window`: the family attends within a window when
    config.json has one; attention here is global, so the usable context stops at the window."""
    heads = hf["num_attention_heads"]
    head_size = hf.get("head_dim") or hf["hidden_size"] // heads
    theta, scaling = rope_from_hf(hf, source, rope_types)
    max_pos = hf.get("max_position_embeddings", 2048)
    window = hf.get("sliding_window")
    if sliding_window and window and window < max_pos:
        max_pos = window
    attention_bias = bool(hf.get("attention_bias", False))
    partial = hf.get("partial_rotary_factor", (hf.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0))
    rotary_dim = int(head_size * partial) if partial != 1.0 else None
    values = dict(
        architecture=arch, dtype=dtype,
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads, head_size=head_size,
        intermediate_size=hf["intermediate_size"], hidden_act=hf.get("hidden_act", "silu"),
        norm_type="rms_norm", norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        position_embedding_type="rope_gpt_neox", max_position_embeddings=max_pos,
        rotary_base=theta, rotary_scaling=scaling, rotary_dim=rotary_dim,
        attn_bias=attention_bias if qkv_bias is None else qkv_bias,
        dense_bias=attention_bias if dense_bias is None else dense_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)), gated_mlp=True,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        **token_ids(hf),
    )
    values.update(fields)
    return PretrainedConfig(**values)
