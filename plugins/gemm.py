"""Linear layers: y = x @ W^T (+ b), floating point or quantized.

Floating point: MatMul in both forms. Quantized weights (see docs/CONTRACTS.md) lower to fused
ORT kernels with the plugin on (MatMulNBits, DynamicQuantizeMatMul) and to standard
DequantizeLinear → MatMul with it off.
"""

from __future__ import annotations

import numpy as np

from trtbuild.checkpoint import QuantConfig
from trtbuild.onnx_graph import GraphBuilder


def linear(g: GraphBuilder, x: str, tensors: dict[str, np.ndarray], prefix: str, dtype: np.dtype,
           fused: bool, quant: QuantConfig | None = None) -> str:
    """Emit the linear layer `prefix` (e.g. transformer.layers.0.attention.qkv) applied to x."""
    if quant is not None and quant.quant_algo is not None:
        from trtbuild.plugins.quant_gemm import quantized_linear

        group_size = quant.group_size if quant.per_group else -1
        y = quantized_linear(g, x, tensors, prefix, dtype, fused, quant.quant_algo, group_size)
    else:
        w = g.weight(prefix + ".weight", np.asarray(tensors[prefix + ".weight"], dtype=dtype).T)
        y = g.op("MatMul", [x, w], name=prefix + "/MatMul")
    bias = tensors.get(prefix + ".bias")
    if bias is not None:
        y = g.op("Add", [y, g.weight(prefix + ".bias", np.asarray(bias, dtype=dtype))], name=prefix + "/Add")
    return y
