"""SmoothQuant (Xiao et al. 2022) W8A8 and the INT8 KV-cache scales.

For linears sharing an input x: s = max|x|^α / max|W|^(1-α) per input channel (max|W| over all
their output rows), W' = W·s, x' = x/s. 1/s is folded into the preceding norm for qkv and fc/gate
into the rows of a gated MLP's gate for proj (through gate's per-channel weight scales), and kept
as prequant_scaling_factor otherwise (dense; proj with per-tensor weight scales). Weights: int8 symmetric per output channel
or per tensor. act_scale: max|x'| / 127, the static per-tensor input scale.
"""

from __future__ import annotations

import torch

from trtbuild.errors import TrtbuildError

from .layout import quantize_int8_sym


def smooth_scales(act_abs_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s [in] for linears sharing one input; act_abs_max [in] = max|x| over calibration tokens."""
    if not 0.0 <= alpha <= 1.0:
        raise TrtbuildError(f"--smoothquant {alpha}: alpha must be in [0, 1]")
    w_max = torch.cat([w.float() for w in weights]).abs().amax(dim=0).clamp(min=1e-5)
    a = act_abs_max.float().clamp(min=1e-5)
    s = (a.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)
    return s


def sq_linear(w: torch.Tensor, s: torch.Tensor, act_abs_max: torch.Tensor, per_channel: bool,
              keep_prequant: bool) -> dict[str, torch.Tensor]:
    """Smoothed int8 tensors for one linear (bare names: weight, per_channel_scale, act_scale[, prequant_scaling_factor])."""
    q, scale = quantize_int8_sym(w.float() * s, per_channel)
    x_max = float((act_abs_max.float() / s).max())
    out = {"weight": q, "per_channel_scale": scale,
           "act_scale": torch.tensor([max(x_max, 1e-8) / 127.0], dtype=torch.float32)}
    if keep_prequant:
        out["prequant_scaling_factor"] = (1.0 / s).float()
    return out


def kv_cache_scales(k_amax: torch.Tensor, v_amax: torch.Tensor) -> torch.Tensor:
    """kv_cache_scaling_factor [2] = (k_scale, v_scale) from max |K|, |V| (per channel or scalar):
    stored value = round(x / scale) in [-127, 127]."""
    k, v = float(torch.as_tensor(k_amax).max()), float(torch.as_tensor(v_amax).max())
    return torch.tensor([max(k, 1e-8) / 127.0, max(v, 1e-8) / 127.0], dtype=torch.float32)
