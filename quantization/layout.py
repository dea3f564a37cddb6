"""The quantized-linear layout of docs/CONTRACTS.md, and round-to-nearest (RTN) quantization into it.

Weight-only (W8A16, W4A16, W4A16_GPTQ, W4A16_AWQ), prefix X:
  X.weight                  uint8 [out, in] (int8, q in [0, 255]) or [out, in/2] (int4, low nibble = even input)
  X.weights_scaling_factor  float32 [out, n_groups]
  X.zero                    uint8 [out, n_groups], iff has_zero_point (else the zero point is 2^(bits-1))
  X.prequant_scaling_factor float32 [in], optional: y = (x * p) @ W^T
  dequant: w = (q - zero) * scale
SmoothQuant (W8A8_SQ_*): X.weight int8 [out, in], X.per_channel_scale float32 [out] or [1],
  X.act_scale float32 [1], X.prequant_scaling_factor float32 [in] (optional).

Every function here works on float32 copies; inputs may be any float dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trtbuild.checkpoint import PretrainedConfig
from trtbuild.errors import TrtbuildError

@dataclass
class QuantizedWeight:
    """Integer weights in original column order plus per-group parameters.

    q: uint8 [out, in] in [0, 2^bits - 1]; scale: float32 [out, n_groups]; zero: uint8 [out, n_groups].
    n_groups = ceil(in / group_size): when group_size does not divide `in`, the last group is
    partial (as AutoGPTQ does), e.g. in=576 at group 128 gives 4 groups of 128 and one of 64.
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int | None = None  # None: in / n_groups (groups that divide `in`)

    def __post_init__(self) -> None:
        if self.group_size is None:
            self.group_size = self.q.shape[1] // self.scale.shape[1]

    def dequantize(self) -> torch.Tensor:
        gs, in_f = self.group_size, self.q.shape[1]
        s = self.scale.repeat_interleave(gs, dim=1)[:, :in_f]
        z = self.zero.float().repeat_interleave(gs, dim=1)[:, :in_f]
        return (self.q.float() - z) * s


def effective_group_size(group_size: int | None, in_features: int) -> int:
    """-1, 0 or None mean per-channel (one group spanning the input dimension)."""
    if group_size is None or group_size <= 0:
        return in_features
    return group_size


def compute_qparams(w: torch.Tensor, bits: int, has_zero_point: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of each row of w [rows, k] (one group a row).

    Symmetric: scale = max|w| / (2^(b-1) - 1), zero = 2^(b-1) (q in [1, 2^b - 1]).
    Asymmetric: the range [min(w, 0), max(w, 0)] maps onto [0, 2^b - 1] with an integer zero point.
    Returns scale float32 [rows] (never 0) and zero float32 [rows] (integers).
    """
    w = w.float()
    maxq = 2**bits - 1
    if has_zero_point:
        wmin = w.amin(dim=1).clamp(max=0)
        wmax = w.amax(dim=1).clamp(min=0)
        scale = (wmax - wmin) / maxq
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(-wmin / scale).clamp(0, maxq)
    else:
        amax = w.abs().amax(dim=1)
        scale = amax / (2 ** (bits - 1) - 1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.full_like(scale, 2 ** (bits - 1))
    return scale, zero


def quantize_with(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """q = clamp(round(w / scale) + zero, 0, 2^b - 1), broadcasting scale/zero over w's last dims."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int | None, has_zero_point: bool,
                 name: str = "weight") -> QuantizedWeight:
    """Round-to-nearest quantization of w [out, in], per channel or per group along `in`."""
    if bits not in (4, 8):
        raise TrtbuildError(f"{name}: {bits}-bit weights are not supported (4 or 8)")
    w = w.float()
    out_f, in_f = w.shape
    gs = effective_group_size(group_size, in_f)
    check_group_size(gs, in_f, name)
    ng = n_groups(in_f, gs)
    wg = pad_to_groups(w, gs).reshape(out_f * ng, gs)  # zero padding changes no group's range
    scale, zero = compute_qparams(wg, bits, has_zero_point)
    q = quantize_with(wg, scale[:, None], zero[:, None], bits)
    return QuantizedWeight(q=q.reshape(out_f, ng * gs)[:, :in_f].to(torch.uint8).contiguous(),
                           scale=scale.reshape(out_f, ng), zero=zero.reshape(out_f, ng).to(torch.uint8), bits=bits,
                           group_size=gs)


def n_groups(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size)


def pad_to_groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """w [..., in] with zero columns appended up to a multiple of group_size."""
    pad = n_groups(w.shape[-1], group_size) * group_size - w.shape[-1]
    return torch.nn.functional.pad(w, (0, pad)) if pad else w


def check_group_size(group_size: int, in_features: int, name: str) -> None:
    """Groups are powers of two from 16 (the int4 kernels' block sizes); the last may be partial."""
    if group_size == in_features:
        return  # per channel
    if group_size < 16 or group_size & (group_size - 1):
        raise TrtbuildError(f"--group_size {group_size} (for {name}) must be a power of two of at least 16, "
                            "e.g. 32, 64 or 128")
    if group_size > in_features:
        raise TrtbuildError(f"--group_size {group_size} is larger than the input dimension {in_features} of {name}: "
                            "use a smaller group size or per-channel quantization (no --per_group)")


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[out, in] values in [0, 15] → uint8 [out, in/2], low nibble = even input index (MatMulNBits' B rows)."""
    if q.shape[-1] % 2:
        raise TrtbuildError(f"int4 packing needs an even input dimension, got {q.shape[-1]}")
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in/2] → uint8 [out, in] (inverse of pack_int4)."""
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def to_weight_only_tensors(qw: QuantizedWeight, has_zero_point: bool, prefix: str = "") -> dict[str, torch.Tensor]:
    """QuantizedWeight → CONTRACTS.md tensors (names `prefix + weight`, ...; prefix "" gives bare names)."""
    out = {prefix + "weight": pack_int4(qw.q) if qw.bits == 4 else qw.q.to(torch.uint8).contiguous(),
           prefix + "weights_scaling_factor": qw.scale.float().contiguous()}
    if has_zero_point:
        out[prefix + "zero"] = qw.zero.to(torch.uint8).contiguous()
    elif not torch.all(qw.zero == 2 ** (qw.bits - 1)):
        raise TrtbuildError(f"{prefix}weight: zero points differ from {2 ** (qw.bits - 1)} but has_zero_point is off")
    return out


def _need(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in tensors:
        raise TrtbuildError(f"checkpoint tensor {name} is missing")
    return tensors[name]


def from_weight_only_tensors(tensors: dict[str, torch.Tensor], prefix: str, bits: int,
                             has_zero_point: bool, group_size: int | None = None) -> QuantizedWeight:
    """CONTRACTS.md tensors of linear `prefix` → QuantizedWeight, checking dtypes and shapes."""
    w = _need(tensors, prefix + ".weight")
    scale = _need(tensors, prefix + ".weights_scaling_factor")
    if w.dtype != torch.uint8:
        raise TrtbuildError(f"{prefix}.weight: expected uint8 for {bits}-bit weight-only, got {w.dtype}")
    q = unpack_int4(w) if bits == 4 else w
    out_f, in_f = q.shape
    gs = group_size if group_size and group_size > 0 else (in_f // scale.shape[1] if scale.dim() == 2 and
                                                             scale.shape[1] else 0)
    if scale.dim() != 2 or scale.shape[0] != out_f or not gs or scale.shape[1] != n_groups(in_f, gs):
        raise TrtbuildError(f"{prefix}.weights_scaling_factor: shape {tuple(scale.shape)} does not fit "
                            f"{prefix}.weight [{out_f}, {in_f}] ({bits}-bit)")
    if has_zero_point:
        zero = _need(tensors, prefix + ".zero")
        if tuple(zero.shape) != tuple(scale.shape):
            raise TrtbuildError(f"{prefix}.zero: shape {tuple(zero.shape)} != weights_scaling_factor {tuple(scale.shape)}")
        zero = zero.to(torch.uint8)
    else:
        zero = torch.full(scale.shape, 2 ** (bits - 1), dtype=torch.uint8)
    return QuantizedWeight(q=q, scale=scale.float(), zero=zero, bits=bits, group_size=gs)


def dequantize_linear(tensors: dict[str, torch.Tensor], prefix: str, config: PretrainedConfig,
                      apply_prequant: bool = True) -> torch.Tensor:
    """The float32 weight [out, in] that linear `prefix` of a (quantized) checkpoint computes with.

    With apply_prequant, a `prequant_scaling_factor` p is folded in (W * p), so y = x @ W^T holds
    for weight-only layouts; SmoothQuant's activation rounding is not representable here.
    """
    qc = config.quantization
    algo = qc.algo
    w = _need(tensors, prefix + ".weight")
    if algo is not None and algo.weight_only and w.dtype == torch.uint8:
        wf = from_weight_only_tensors(tensors, prefix, algo.weight_bits, qc.has_zero_point,
                                      qc.group_size if qc.per_group else None).dequantize()
    elif algo is not None and algo.smoothquant and w.dtype == torch.int8:
        s = _need(tensors, prefix + ".per_channel_scale").float()
        if s.numel() not in (1, w.shape[0]):
            raise TrtbuildError(f"{prefix}.per_channel_scale: {s.numel()} values for {w.shape[0]} output channels")
        wf = w.float() * s.reshape(-1, 1)
    elif w.is_floating_point():
        wf = w.float()
    else:
        raise TrtbuildError(f"{prefix}.weight: dtype {w.dtype} does not match quant_algo {qc.quant_algo!r}")
    p = tensors.get(prefix + ".prequant_scaling_factor")
    if apply_prequant and p is not None:
        if p.numel() != wf.shape[1]:
            raise TrtbuildError(f"{prefix}.prequant_scaling_factor: {p.numel()} values for input dimension {wf.shape[1]}")
        wf = wf * p.float().reshape(1, -1)
    return wf


def rtn_linear(w: torch.Tensor, bits: int, group_size: int | None, has_zero_point: bool,
               name: str = "weight") -> dict[str, torch.Tensor]:
    """RTN weight-only recipe for one linear: float [out, in] → {weight, weights_scaling_factor[, zero]}."""
    return to_weight_only_tensors(quantize_rtn(w, bits, group_size, has_zero_point, name), has_zero_point)


def quantize_int8_sym(w: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 of w [out, in]: (int8 q, float32 scale [out] or [1]), w ≈ q * scale."""
    w = w.float()
    amax = w.abs().amax(dim=1) if per_channel else w.abs().amax().reshape(1)
    scale = amax / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(w / scale.reshape(-1, 1)), -127, 127).to(torch.int8)
    return q, scale.float()
