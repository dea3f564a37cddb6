"""AWQ (Lin et al. 2023): activation-aware per-input-channel scales, then weight clipping, then RTN.

For the linears that share one input x (qkv; fc + gate; dense; proj), search s over a grid of
alpha (AutoAWQ's duo scaling): s = mean|x|^α / mean_w^(1-α), normalised, and keep the s that
minimises the output error of the quantized linears,
    Σ ‖x Wᵀ − (x / s) Q(W·s)ᵀ‖²  =  Σ tr(E G Eᵀ),  E = W − Q(W·s)/s,  G = Σ x xᵀ,
evaluated exactly on all calibration tokens through the Gram matrix G. s = 1 (plain RTN) is
always a candidate. For qkv and fc + gate the caller may instead judge candidates on the output
of the block around them (`block_error`: the attention, the MLP), as AutoAWQ does: that sees
the softmax and the gating the linear error misses, and on SmolLM2-135M at int4 per channel it is
what keeps greedy chat answers from collapsing into loops. Then, per group of each weight, a
clipping ratio (1 → 0.5) is searched on the linear objective restricted to the group's inputs.
The caller folds 1/s into the previous op or keeps it as prequant_scaling_factor.
"""

from __future__ import annotations

from typing import Callable

import torch

from .layout import QuantizedWeight, check_group_size, effective_group_size, n_groups, pad_to_groups, quantize_rtn


def fake_quant(w: torch.Tensor, bits: int, group_size: int, has_zero_point: bool) -> torch.Tensor:
    return quantize_rtn(w, bits, group_size, has_zero_point).dequantize()


def _output_error(E: torch.Tensor, G: torch.Tensor) -> float:
    """tr(E G Eᵀ) = Σ over tokens ‖x Eᵀ‖²."""
    return float(((E @ G) * E).sum())


@torch.no_grad()
def awq_search_scales(weights: list[torch.Tensor], gram: torch.Tensor, x_abs_mean: torch.Tensor, bits: int,
                      group_size: int | None, has_zero_point: bool, n_grid: int = 20,
                      block_error: Callable[[list[torch.Tensor]], float] | None = None) -> torch.Tensor:
    """The per-input-channel scale s [in] for linears sharing one input (weights [out_j, in]).

    block_error, if given, measures a candidate instead of the linears' own output error: it gets
    the weights each linear would compute with (Q(W·s)/s, acting on the unscaled input) and returns
    the error of the block around them (AutoAWQ's module2inspect: the attention or the MLP)."""
    W = torch.cat([w.float() for w in weights])
    in_f = W.shape[1]
    gs = effective_group_size(group_size, in_f)
    G = gram.float()
    G = G / max(float(torch.diag(G).mean()), 1e-30)  # only the argmin matters; keep numbers tame

    def error(Wq: torch.Tensor) -> float:
        if block_error is not None:
            return block_error(list(Wq.split([w.shape[0] for w in weights])))
        return _output_error(W - Wq, G)

    # AutoAWQ's weight statistic: |w| normalised by its group's max, averaged over output rows.
    wg = pad_to_groups(W.abs(), gs).reshape(-1, gs)
    w_mean = (wg / (wg.amax(dim=1, keepdim=True) + 1e-6)).reshape(W.shape[0], -1)[:, :in_f].mean(dim=0)
    x_mean = x_abs_mean.float()

    best_s = torch.ones(in_f)
    best = error(fake_quant(W, bits, gs, has_zero_point))
    for k in range(n_grid):
        alpha = k / n_grid
        s = (x_mean.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4)).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = error(fake_quant(W * s, bits, gs, has_zero_point) / s)
        if err < best:
            best, best_s = err, s
    return best_s


@torch.no_grad()
def awq_clip(w: torch.Tensor, gram: torch.Tensor, bits: int, group_size: int | None, has_zero_point: bool,
             n_grid: int = 20, max_shrink: float = 0.5) -> torch.Tensor:
    """w with each (row, group) clipped to ±ratio·max|w|, the ratio minimising the group's output error."""
    w = w.float()
    out_f, in_f = w.shape
    gs = effective_group_size(group_size, in_f)
    if in_f % gs:  # partial last group: search on zero-padded columns, keep the real ones
        pad = n_groups(in_f, gs) * gs - in_f
        return awq_clip(pad_to_groups(w, gs), torch.nn.functional.pad(gram, (0, pad, 0, pad)), bits, gs,
                        has_zero_point, n_grid, max_shrink)[:, :in_f]
    ng = in_f // gs
    G = gram.float() / max(float(torch.diag(gram).mean()), 1e-30)
    Gb = torch.stack([G[g * gs:(g + 1) * gs, g * gs:(g + 1) * gs] for g in range(ng)])  # [ng, gs, gs]
    wg = w.reshape(out_f, ng, gs)
    amax = wg.abs().amax(dim=-1, keepdim=True)
    best_err = torch.full((out_f, ng), float("inf"))
    best_w = wg.clone()
    for k in range(int(max_shrink * n_grid)):
        m = amax * (1 - k / n_grid)
        cw = torch.maximum(torch.minimum(wg, m), -m)
        q = fake_quant(cw.reshape(out_f, in_f), bits, gs, has_zero_point).reshape(out_f, ng, gs)
        E = (wg - q).transpose(0, 1)  # [ng, out, gs]: one batched matmul per group
        err = (torch.bmm(E, Gb) * E).sum(dim=-1).transpose(0, 1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_w = torch.where(better[..., None], cw, best_w)
    return best_w.reshape(out_f, in_f)


def awq_quantize(w: torch.Tensor, s: torch.Tensor, gram: torch.Tensor, bits: int, group_size: int | None,
                 has_zero_point: bool, clip: bool = True, name: str = "weight") -> QuantizedWeight:
    """Quantize W·s (after clipping search on inputs x/s); the caller applies 1/s to the input."""
    in_f = w.shape[1]
    check_group_size(effective_group_size(group_size, in_f), in_f, name)
    ws = w.float() * s
    if clip:
        # inputs of the scaled weight are x / s: their Gram matrix is G / (s sᵀ)
        ws = awq_clip(ws, gram.float() / torch.outer(s, s), bits, group_size, has_zero_point)
    return quantize_rtn(ws, bits, group_size, has_zero_point, name)
