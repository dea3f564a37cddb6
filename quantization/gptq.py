"""GPTQ (Frantar et al. 2022): quantize a linear column by column, compensating each column's
rounding error on the columns not yet quantized through the inverse Hessian H = 2/N · X Xᵀ.

Follows the reference implementation (AutoGPTQ's fasterquant): dead inputs zeroed, damping
percdamp · mean(diag H), upper Cholesky factor of H⁻¹, lazy batch updates in blocks of 128
columns. Group parameters (scale, zero) are computed when a group's first column is reached,
from the error-updated weights. With act-order, columns are processed by decreasing diag(H) and
the group parameters are fixed beforehand per group of the original column order ("static
groups"), so the result is stored in the plain per-group layout with no g_idx (CONTRACTS.md).
"""

from __future__ import annotations

import torch

from trtbuild.errors import TrtbuildError

from .layout import (QuantizedWeight, check_group_size, compute_qparams, effective_group_size, n_groups,
                     pad_to_groups, quantize_with)


def _inverse_hessian_factor(H: torch.Tensor, percdamp: float, name: str) -> torch.Tensor:
    """Upper Cholesky factor U of H⁻¹ (H⁻¹ = Uᵀ U), with damping raised until H is positive definite."""
    n = H.shape[0]
    mean_diag = torch.mean(torch.diag(H)).item()
    idx = torch.arange(n)
    damp = percdamp * mean_diag
    for _ in range(6):
        Hd = H.clone()
        Hd[idx, idx] += damp
        L, info = torch.linalg.cholesky_ex(Hd)
        if info.item() == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info.item() == 0:
                return U
        damp *= 10
    raise TrtbuildError(f"GPTQ: the Hessian of {name} is not positive definite even with damping "
                        f"{damp / 10:g}: the calibration data may be too small or degenerate")


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, H: torch.Tensor, bits: int, group_size: int | None, has_zero_point: bool,
                  *, act_order: bool = False, percdamp: float = 0.01, block_size: int = 128,
                  name: str = "weight") -> QuantizedWeight:
    """GPTQ of w [out, in] with Hessian H [in, in] → QuantizedWeight in original column order."""
    if bits not in (4, 8):
        raise TrtbuildError(f"{name}: {bits}-bit weights are not supported (4 or 8)")
    W = w.float().clone()
    out_f, cols = W.shape
    if tuple(H.shape) != (cols, cols):
        raise TrtbuildError(f"GPTQ: Hessian of {name} is {tuple(H.shape)}, expected ({cols}, {cols})")
    gs = effective_group_size(group_size, cols)
    check_group_size(gs, cols, name)
    if cols % gs:  # partial last group: quantize zero-padded columns (dead inputs), keep the real ones
        pad = n_groups(cols, gs) * gs - cols
        qw = gptq_quantize(pad_to_groups(w, gs), torch.nn.functional.pad(H, (0, pad, 0, pad)), bits, gs,
                           has_zero_point, act_order=act_order, percdamp=percdamp, block_size=block_size, name=name)
        return QuantizedWeight(q=qw.q[:, :cols].contiguous(), scale=qw.scale, zero=qw.zero, bits=bits, group_size=gs)
    per_channel = gs == cols
    ng = cols // gs
    block_size = max(block_size, gs) if not per_channel else block_size
    if not per_channel and block_size % gs:
        block_size = gs * max(1, block_size // gs)

    H = H.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    scales = torch.zeros(out_f, ng)
    zeros = torch.zeros(out_f, ng)
    static = per_channel or act_order
    if static:  # group parameters fixed up front, per group of the original column order
        for g in range(ng):
            scales[:, g], zeros[:, g] = compute_qparams(W[:, g * gs:(g + 1) * gs], bits, has_zero_point)

    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    Hinv = _inverse_hessian_factor(H, percdamp, name)

    Q = torch.zeros(out_f, cols)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            col = i1 + i
            orig = int(perm[col]) if perm is not None else col
            g = orig // gs
            if not static and col % gs == 0:  # a group starts: parameters from the updated weights
                scales[:, g], zeros[:, g] = compute_qparams(W1[:, i:i + gs], bits, has_zero_point)
            s, z = scales[:, g], zeros[:, g]
            wc = W1[:, i]
            q = quantize_with(wc, s, z, bits)
            Q1[:, i] = q
            err = (wc - (q - z) * s) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return QuantizedWeight(q=Q.to(torch.uint8), scale=scales, zero=zeros.to(torch.uint8), bits=bits)
