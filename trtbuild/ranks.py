"""Tensor-parallel ranks: how a checkpoint splits over them, as TensorRT-LLM splits it.

Column-parallel linears (the layer spec's `parallel = "column"`: qkv, mlp.fc, mlp.gate) keep a
slice of their outputs: qkv a slice of the query heads and of the KV heads (a KV head is repeated
on tp_size / KV ranks when there are fewer KV heads than ranks), fc and gate a slice of the MLP.
Row-parallel linears (attention.dense, mlp.proj) keep the matching slice of their inputs; their
partial outputs are summed over the ranks by the engine's AllReduce, and their bias is added once,
after it. Norms and the embedding stay whole on every rank. lm_head is vocab-parallel: padded to a
multiple of tp_size rows and cut in tp_size row blocks; the engine gathers the blocks and
drops the padding, so every rank's engine returns the whole vocabulary's logits.

The checkpoint's config.json describes the whole model and its `mapping`; `rank_config` is the
model one rank's engine computes (its heads, KV heads and MLP width).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from trtbuild.checkpoint import Mapping, PretrainedConfig
from trtbuild.errors import TrtbuildError
from trtbuild.models.base import Linear, expected_shapes, layer_linears


def check_mapping(config: PretrainedConfig, tp_size: int, pp_size: int, source: str = "--tp_size") -> Mapping:
    """The mapping for tp_size x pp_size ranks, or an error naming what does not divide."""
    if tp_size < 1 or pp_size < 1:
        raise TrtbuildError(f"{source}: tp_size {tp_size} and pp_size {pp_size} must be at least 1")
    if pp_size != 1:
        raise TrtbuildError(f"{source}: pipeline parallelism (pp_size {pp_size}) is not supported yet; "
                            "use --pp_size 1 (tensor parallelism works)")
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


def rank_config(config: PretrainedConfig, rank: int) -> PretrainedConfig:
    """What one rank's engine computes: its share of query heads, KV heads and MLP width; an
    lm_head of its own (its vocabulary block) even when the model ties it to the embedding."""
    tp = config.mapping.tp_size
    if tp == 1:
        return config
    return dataclasses.replace(config, num_attention_heads=config.num_attention_heads // tp,
                               num_key_value_heads=kv_heads_per_rank(config, tp),
                               intermediate_size=config.intermediate_size // tp, tie_word_embeddings=False)


def rank_shapes(config: PretrainedConfig, rank: int) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor rank `rank`'s file holds."""
    shapes = expected_shapes(rank_config(config, rank))
    if config.mapping.tp_size > 1:
        shapes["lm_head.weight"] = (vocab_per_rank(config, config.mapping.tp_size), config.hidden_size)
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
    tp = mapping.tp_size
    if tp == 1:
        return dict(tensors)
    linears = {lin.name: lin for lin in layer_linears(config)}
    out = {}
    for name, x in tensors.items():
        lin, kind = None, ""
        if name.startswith("transformer.layers."):
            linear_name, _, kind = name.split(".", 3)[3].rpartition(".")
            lin = linears.get(linear_name)
        out[name] = x if lin is None else _split_linear_tensor(config, lin, kind, x, tp, rank)
    lm_head = tensors["transformer.vocab_embedding.weight"] if config.tie_word_embeddings else tensors["lm_head.weight"]
    rows = vocab_per_rank(config, tp)
    # rows past the vocabulary (padding) repeat row 0: the engine drops their logits
    index = np.arange(rank * rows, (rank + 1) * rows)
    out["lm_head.weight"] = _rows_of(lm_head, np.where(index < config.vocab_size, index, 0))
    return {k: _contiguous(v) for k, v in out.items()}
