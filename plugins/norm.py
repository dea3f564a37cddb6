"""Normalization: RMSNorm / LayerNorm, with the residual add fused in (Skip*LayerNormalization).

Fused form: ORT's SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization /
SkipLayerNormalization. Standard form: Add + ONNX RMSNormalization-23 / LayerNormalization-17.
"""

from __future__ import annotations

from trtbuild.onnx_graph import GraphBuilder


def norm(g: GraphBuilder, x: str, weight: str, bias: str | None, norm_type: str, eps: float,
         fused: bool) -> str:
    """Normalize the last axis of x."""
    if norm_type == "layer_norm":
        return g.op("LayerNormalization", [x, weight] + ([bias] if bias else []), axis=-1, epsilon=eps)
    if fused:
        return g.op("SimplifiedLayerNormalization", [x, weight], axis=-1, epsilon=eps, stash_type=1)
    return g.op("RMSNormalization", [x, weight], axis=-1, epsilon=eps, stash_type=1)


def add_norm(g: GraphBuilder, x: str, residual: str, weight: str, bias: str | None, norm_type: str,
             eps: float, fused: bool) -> tuple[str, str]:
    """(norm(x + residual), x + residual)."""
    if fused:
        op = "SkipLayerNormalization" if norm_type == "layer_norm" else "SkipSimplifiedLayerNormalization"
        inputs = [x, residual, weight] + ([bias] if norm_type == "layer_norm" and bias else [])
        outs = g.op(op, inputs, num_outputs=4, domain="com.microsoft", epsilon=eps)
        return outs[0], outs[3]
    total = g.op("Add", [x, residual])
    return norm(g, total, weight, bias, norm_type, eps, fused=False), total
