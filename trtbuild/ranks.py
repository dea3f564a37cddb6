"""Ranks: how a checkpoint splits over tensor-parallel ranks and pipeline stages, as TensorRT-LLM
splits it. World rank = pp_rank * tp_size + tp_rank.

Pipeline stages take consecutive layers (numbered from 0 in each stage's file; as evenly as they
divide, the first stages one more); the first stage also holds the embeddings, the last the final
norm and lm_head. A stage's engine receives the previous stage's hidden states and sends its own
to the next (trtbuild.kernels' PipelineRecv / PipelineSend).

Column-parallel linears (the layer spec's `parallel = "column"`: qkv, mlp.fc, mlp.gate) keep a
slice of their outputs: qkv a slice of the query heads and of the KV heads (a KV head is repeated
on tp_size / KV ranks when there are fewer KV heads than ranks), fc and gate a slice of the MLP.
Row-parallel linears (attention.dense, mlp.proj) keep the matching slice of their inputs; their
partial outputs are summed over the ranks by the engine's AllReduce, and their bias is added once,
after it. Norms and the embedding stay whole on every rank. lm_head is vocab-parallel: padded to a
multiple of tp_size rows and cut in tp_size row blocks; the engine gathers the blocks and
drops the padding, so every rank of the last stage returns the whole vocabulary's logits.

The checkpoint's config.json describes the whole model and its `mapping`; `rank_config` is the
model one rank's engine computes (its heads, KV heads, MLP width and layers).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from trtbuild.checkpoint import Mapping, PretrainedConfig
from trtbuild.errors import TrtbuildError
from trtbuild.models.base import Linear, expected_shapes, layer_linears


def check_mapping(config: PretrainedConfig, tp_size: int, pp_size: int, source: str = "--tp_size") -> Mapping:
    """The mapping for tp_size x pp_size ranks, or an error naming what does not divide."""
    if tp_size < 1 or pp_size < 1:
        raise TrtbuildError(f"{source}: tp_size {tp_size} and pp_size {pp_size} must be at least 1")
    if pp_size > config.num_hidden_layers:
        raise TrtbuildError(f"{source}: pp_size {pp_size} exceeds the model's {config.num_hidden_layers} layers")
    H, KV, I = config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    if H % tp_size:
        raise TrtbuildError(f"{source}: tp_size {tp_size} does not divide the model's {H} attention heads")
    if KV % tp_size and tp_size % KV:
        raise TrtbuildError(f"{source}: tp_size {tp_size} and the model's {KV} KV heads: one must divide the other")
    if I % tp_size:
        raise TrtbuildError(f"{source}: tp_size {tp_size} does not divide the model's MLP width {I}")
    quant = config.quantization
    if quant.algo is not None and tp_size > 1:  # a row-parallel rank's inputs must hold whole groups / bytes
        group = quant.group_size if quant.per_group else 0
        for lin in layer_linears(config):
            if lin.parallel != "row":
                continue
            share = lin.in_features // tp_size
            if group and share % group:
                raise TrtbuildError(f"{source}: tp_size {tp_size} gives each rank {share} of {lin.name}'s "
                                    f"{lin.in_features} inputs, not a multiple of --group_size {group}; use a "
                                    "smaller group or another tp_size")
            if quant.algo.weight_bits == 4 and share % 2:
                raise TrtbuildError(f"{source}: tp_size {tp_size} splits {lin.name}'s 4-bit weight bytes")
    return Mapping(world_size=tp_size * pp_size, tp_size=tp_size, pp_size=pp_size)


def kv_heads_per_rank(config: PretrainedConfig, tp_size: int) -> int:
    return max(config.num_key_value_heads // tp_size, 1)


def vocab_per_rank(config: PretrainedConfig, tp_size: int) -> int:
    """lm_head rows a rank holds: the vocabulary padded to a multiple of tp_size, divided."""
    return -(-config.vocab_size // tp_size)


@dataclass(frozen=True)
class RankPlace:
    """Where world rank `rank` sits: its tensor-parallel rank within its pipeline stage."""

    rank: int
    tp_rank: int
    pp_rank: int
    first_stage: bool  # it embeds the tokens (else it receives the previous stage's hidden states)
    last_stage: bool  # it computes the logits (else it sends its hidden states on)
    layers: range  # the model's layers its stage runs


def rank_place(config: PretrainedConfig, rank: int) -> RankPlace:
    """TensorRT-LLM's order: rank = pp_rank * tp_size + tp_rank; the layers divided over the stages
    as evenly as they go (the first stages take one more)."""
    m, L = config.mapping, config.num_hidden_layers
    pp_rank, tp_rank = divmod(rank, m.tp_size)
    base, extra = divmod(L, m.pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return RankPlace(rank, tp_rank, pp_rank, pp_rank == 0, pp_rank == m.pp_size - 1,
                     range(start, start + base + (pp_rank < extra)))


def rank_config(config: PretrainedConfig, rank: int) -> PretrainedConfig:
    """What one rank's engine computes: its share of query heads, KV heads and MLP width, its
    stage's layers (numbered from 0); an lm_head of its own (its vocabulary block) even when the
    model ties it to the embedding."""
    m = config.mapping
    if m.world_size == 1:
        return config
    place, tp = rank_place(config, rank), m.tp_size
    layer_types = config.layer_types[place.layers.start:place.layers.stop] if config.layer_types else None
    return dataclasses.replace(config, num_attention_heads=config.num_attention_heads // tp,
                               num_key_value_heads=kv_heads_per_rank(config, tp),
                               intermediate_size=config.intermediate_size // tp, tie_word_embeddings=False,
                               num_hidden_layers=len(place.layers), layer_types=layer_types)


# what only the first stage (it embeds the tokens) and the last (it makes the logits) hold
FIRST_STAGE_TENSORS = ("transformer.vocab_embedding.weight", "transformer.position_embedding.weight")
LAST_STAGE_TENSORS = ("transformer.ln_f.weight", "transformer.ln_f.bias", "lm_head.weight")


def rank_shapes(config: PretrainedConfig, rank: int) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor rank `rank`'s file holds."""
    shapes = expected_shapes(rank_config(config, rank))
    if config.mapping.world_size == 1:
        return shapes
    place = rank_place(config, rank)
    shapes["lm_head.weight"] = (vocab_per_rank(config, config.mapping.tp_size), config.hidden_size)
    for name in (() if place.first_stage else FIRST_STAGE_TENSORS) + (() if place.last_stage else LAST_STAGE_TENSORS):
        shapes.pop(name, None)
    return shapes


def _contiguous(x):
    """numpy arrays and torch tensors alike (the converter splits torch tensors, the builder numpy)."""
    return x.contiguous() if hasattr(x, "contiguous") else np.ascontiguousarray(x)


def _rows_of(x, rows: np.ndarray):
    return x[rows]


def qkv_rows(config: PretrainedConfig, tp: int, rank: int) -> np.ndarray:
    """The rows of qkv rank `rank` keeps: its query heads, then its K and V heads."""
    H, KV, D = config.num_attention_heads, config.num_key_value_heads, config.head_size
    heads, kv_heads = H // tp, kv_heads_per_rank(config, tp)
    kv_first = rank * KV // tp  # the first KV head its query heads read (fewer KV heads than ranks: shared)
    q = np.arange(rank * heads * D, (rank + 1) * heads * D)
    k = H * D + np.arange(kv_first * D, (kv_first + kv_heads) * D)
    return np.concatenate([q, k, k + KV * D])


def _block(x, axis: int, tp: int, rank: int):
    n = x.shape[axis] // tp
    return x[rank * n:(rank + 1) * n] if axis == 0 else x[:, rank * n:(rank + 1) * n]


def _split_linear_tensor(config: PretrainedConfig, lin: Linear, kind: str, x, tp: int, rank: int):
    """Rank `rank`'s part of tensor `kind` of linear `lin` (docs/CONTRACTS.md names them): a
    column-parallel linear keeps its rows of whatever is per output channel; a row-parallel one its
    columns of the weight, of per-group scales and zero points and of per-input scales."""
    per_output = kind in ("weight", "bias", "weights_scaling_factor", "zero", "per_channel_scale") \
        and x.ndim >= 1 and x.shape[0] == lin.out_features
    if lin.parallel == "column":
        if not per_output:
            return x  # per-input smoothing scales, per-tensor scales
        return _rows_of(x, qkv_rows(config, tp, rank)) if lin.name == "attention.qkv" else _block(x, 0, tp, rank)
    if kind == "weight" or (kind in ("weights_scaling_factor", "zero") and x.ndim == 2 and x.shape[1] > 1):
        return _block(x, 1, tp, rank)  # inputs (int4: bytes of two), or their groups
    if kind == "prequant_scaling_factor":
        return _block(x, 0, tp, rank)
    return x  # per output channel or per tensor: every rank's partial sum uses them whole; bias: once, after


def split_tensors(config: PretrainedConfig, tensors: dict, mapping: Mapping, rank: int) -> dict:
    """Rank `rank`'s tensors of a whole (unsplit) checkpoint, floating-point or quantized (numpy
    arrays or torch tensors, returned as the same kind)."""
    if mapping.world_size == 1:
        return dict(tensors)
    config = dataclasses.replace(config, mapping=mapping)
    tp, place = mapping.tp_size, rank_place(config, rank)
    linears = {lin.name: lin for lin in layer_linears(config)}
    out = {}
    for name, x in tensors.items():
        lin, kind = None, ""
        if name.startswith("transformer.layers."):
            _, _, layer, rest = name.split(".", 3)
            if int(layer) not in place.layers:
                continue
            name = f"transformer.layers.{int(layer) - place.layers.start}.{rest}"  # numbered within the stage
            linear_name, _, kind = rest.rpartition(".")
            lin = linears.get(linear_name)
        elif name in FIRST_STAGE_TENSORS and not place.first_stage or name in LAST_STAGE_TENSORS:
            continue
        out[name] = x if lin is None else _split_linear_tensor(config, lin, kind, x, tp, place.tp_rank)
    if place.last_stage:
        lm_head = tensors["transformer.vocab_embedding.weight"] if config.tie_word_embeddings else tensors["lm_head.weight"]
        rows = vocab_per_rank(config, tp)
        # rows past the vocabulary (padding) repeat row 0: the engine drops their logits
        index = np.arange(place.tp_rank * rows, (place.tp_rank + 1) * rows)
        out["lm_head.weight"] = _rows_of(lm_head, np.where(index < config.vocab_size, index, 0))
        for name in LAST_STAGE_TENSORS[:2]:
            if name in tensors:
                out[name] = tensors[name]
    return {k: _contiguous(v) for k, v in out.items()}


# TensorRT-LLM's LoRA target modules: which side of the low-rank product a rank splits
_COLUMN_MODULES = ("attn_qkv", "attn_q", "attn_k", "attn_v", "mlp_h_to_4h", "mlp_gate")


def _module_rows(config: PretrainedConfig, module: str, tp: int, tp_rank: int) -> np.ndarray:
    """The rows of a column-parallel module's B (its delta's outputs) that rank tp_rank keeps."""
    rows = qkv_rows(config, tp, tp_rank)
    q, kv = config.q_dim, config.kv_dim
    if module == "attn_qkv":
        return rows
    if module == "attn_q":
        return rows[rows < q]
    if module == "attn_k":
        return rows[(rows >= q) & (rows < q + kv)] - q
    if module == "attn_v":
        return rows[rows >= q + kv] - q - kv
    n = config.intermediate_size // tp  # mlp_h_to_4h, mlp_gate
    return np.arange(tp_rank * n, (tp_rank + 1) * n)


def split_adapter(adapter, config: PretrainedConfig, rank: int):
    """Rank `rank`'s share of a LoRA adapter (trtbuild.lora_adapter.LoraAdapter) of the whole model
    `config`: its stage's layers (numbered from 0); for a column-parallel module B's rows of its
    outputs (A whole), for a row-parallel one A's columns of its inputs (B whole: the ranks' partial
    deltas are summed with the linear's output)."""
    m = config.mapping
    if m.world_size == 1:
        return adapter
    place, tp = rank_place(config, rank), m.tp_size
    layers = {}
    for layer, modules in adapter.layers.items():
        if layer not in place.layers:
            continue
        split = {}
        for name, lm in modules.items():
            if name in _COLUMN_MODULES:
                split[name] = dataclasses.replace(lm, b=_rows_of(lm.b, _module_rows(config, name, tp, place.tp_rank)))
            else:
                n = lm.a.shape[1] // tp
                split[name] = dataclasses.replace(lm, a=lm.a[:, place.tp_rank * n:(place.tp_rank + 1) * n])
        layers[layer - place.layers.start] = {k: dataclasses.replace(v, a=_contiguous(v.a), b=_contiguous(v.b))
                                              for k, v in split.items()}
    return dataclasses.replace(adapter, layers=layers)
