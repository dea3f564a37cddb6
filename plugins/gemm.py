"""Linear layers: y = x @ W^T (+ b), floating point or quantized.

Floating point: MatMul in both forms. Quantized weights (see docs/CONTRACTS.md) lower to fused
ORT kernels with the plugin on (MatMulNBits, DynamicQuantizeMatMul) and to standard
DequantizeLinear → MatMul with it off. Linears that read the same input (a gated MLP's fc and
gate) can be merged into one of twice the width (`merge_linears`): one kernel call instead of two
(int4 decode at batch 8 +17% on SmolLM2-135M; for W8A8 onnxruntime already shared the activation
quantization of the two, so it gains little there).
"""

from __future__ import annotations

import numpy as np

from trtbuild.checkpoint import QuantConfig
from trtbuild.onnx_graph import GraphBuilder


def linear(g: GraphBuilder, x: str, tensors: dict[str, np.ndarray], prefix: str, dtype: np.dtype,
           fused: bool, quant: QuantConfig | None = None, kernels: bool = False,
           weight_only_activations: str = "int8", weight_only_kernel: bool = False, swiglu: bool = False) -> str:
    """Emit the linear layer `prefix` (e.g. transformer.layers.0.attention.qkv) applied to x;
    `kernels`: W8A8 per token quantizes with trtbuild's kernels; `weight_only_activations`: "int8"
    or "float" activations for weight-only GEMMs; `weight_only_kernel`: these run trtbuild's
    WeightOnlyQuantMatMul, `swiglu` with x = [fc, gate] of a gated SiLU MLP (plugins.quant_gemm)."""
    if quant is not None and quant.algo is not None:
        from trtbuild.plugins.quant_gemm import quantized_linear

        group_size = quant.group_size if quant.per_group else -1
        y = quantized_linear(g, x, tensors, prefix, dtype, fused, quant.algo, group_size, kernels,
                             weight_only_activations, weight_only_kernel, swiglu)
    else:
        w = g.weight(prefix + ".weight", np.asarray(tensors[prefix + ".weight"], dtype=dtype).T)
        y = g.op("MatMul", [x, w], name=prefix + "/MatMul")
    bias = tensors.get(prefix + ".bias")
    if bias is not None:
        y = g.op("Add", [y, g.weight(prefix + ".bias", np.asarray(bias, dtype=dtype))], name=prefix + "/Add")
    return y


# Per-output-channel tensors of a linear (axis 0 is the output) and per-input ones, which linears
# sharing an input must hold equal to be merged (docs/CONTRACTS.md names them all).
_PER_OUTPUT = (".weight", ".weights_scaling_factor", ".zero", ".bias")
_PER_INPUT = (".prequant_scaling_factor", ".act_scale")


def merge_linears(tensors: dict[str, np.ndarray], prefixes: list[str],
                  merged_prefix: str) -> dict[str, np.ndarray] | None:
    """The tensors of one linear computing every linear in `prefixes` (all applied to the same input)
    side by side along the output, under `merged_prefix`; None when their formats do not allow it
    (a tensor only some have, different per-input scales, an unknown tensor)."""
    suffixes = [{k[len(p):] for k in tensors if k.startswith(p + ".")} for p in prefixes]
    if any(s != suffixes[0] for s in suffixes):
        return None
    merged: dict[str, np.ndarray] = {}
    for suffix in suffixes[0]:
        parts = [np.asarray(tensors[p + suffix]) for p in prefixes]
        if suffix in _PER_OUTPUT:
            merged[merged_prefix + suffix] = np.concatenate(parts, axis=0)
        elif suffix in _PER_INPUT:
            if any(part.shape != parts[0].shape or not np.array_equal(part, parts[0]) for part in parts):
                return None
            merged[merged_prefix + suffix] = parts[0]
        elif suffix == ".per_channel_scale":  # SmoothQuant: [out], or [1] for one scale per tensor
            rows = [np.asarray(tensors[p + ".weight"]).shape[0] for p in prefixes]
            merged[merged_prefix + suffix] = np.concatenate(
                [np.broadcast_to(part.reshape(-1), (n,)) for part, n in zip(parts, rows)])
        else:
            return None
    return merged
