"""Import of pre-quantized HF linears (AutoGPTQ / GPTQModel, AutoAWQ GEMM) into the CONTRACTS.md layout.

Each function takes the tensors of one HF linear (keys `qweight`, `qzeros`, `scales`, optional
`g_idx`, `bias`) and returns ours (`weight`, `weights_scaling_factor`, `zero` when has_zero_point,
`bias`), bare names, [out, ...] orientation. q/k/v parts are stacked with `concat_linears`.

Packed formats (HF weights are [in, out]):
- GPTQ: qweight int32 [in·bits/32, out], packed along `in`, value j of a word in bits
  [bits·j, bits·(j+1)); qzeros int32 [n_groups, out·bits/32] packed the same way along `out`;
  scales [n_groups, out]; g_idx int32 [in] (group of each input). AutoGPTQ's original format
  (checkpoint_format "gptq") stores zero − 1; GPTQModel's "gptq_v2" stores the zero itself.
- AWQ GEMM: qweight int32 [in, out/8], qzeros int32 [n_groups, out/8], packed along `out` in the
  interleaved order [0, 2, 4, 6, 1, 3, 5, 7] (nibble i holds column order[i]); scales
  [n_groups, out]; zero points stored as is; 4-bit only.
dequant: w[i, o] = (q[i, o] − zero[g(i), o]) · scales[g(i), o].

GPTQ act-order checkpoints (a g_idx that is not i // group_size) cannot be stored losslessly in the
plain per-group layout: they are dequantized and re-quantized per plain group (RTN), with a warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch

from trtbuild.checkpoint import QuantConfig
from trtbuild.errors import TrtbuildError
from trtbuild.quant_algo import weight_only_algo

from .layout import QuantizedWeight, quantize_rtn, to_weight_only_tensors

log = logging.getLogger("trtbuild.quantization")

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds column AWQ_ORDER[i] of its 8
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # column k sits in nibble AWQ_REVERSE_ORDER[k]


def _get(tensors: dict[str, torch.Tensor], name: str, key: str) -> torch.Tensor:
    if key not in tensors:
        raise TrtbuildError(f"{name}.{key} is missing from the quantized checkpoint")
    return tensors[key]


def _check(cond: bool, name: str, key: str, msg: str) -> None:
    if not cond:
        raise TrtbuildError(f"{name}.{key}: {msg}: the quantized checkpoint does not match the model "
                            "(or its quantization_config)")


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Sequentially packed int32 → int64 values, expanding `dim` by 32/bits (value j at bits·j)."""
    per = 32 // bits
    mask = (1 << bits) - 1
    p = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per, dtype=torch.int64) * bits
    vals = (p.unsqueeze(-1) >> shifts) & mask  # [..., per]
    if dim in (-1, packed.dim() - 1):
        return vals.reshape(*packed.shape[:-1], packed.shape[-1] * per)
    # dim 0: words along rows, values of a word are consecutive rows
    vals = vals.permute(0, 2, 1)  # [rows, per, cols]
    return vals.reshape(packed.shape[0] * per, packed.shape[1])


def pack_int32(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of unpack_int32 (for tests and for writing GPTQ-format tensors)."""
    per = 32 // bits
    v = values.to(torch.int64)
    if dim == 0:
        v = v.reshape(v.shape[0] // per, per, v.shape[1]).permute(0, 2, 1)
    else:
        v = v.reshape(*v.shape[:-1], v.shape[-1] // per, per)
    shifts = torch.arange(per, dtype=torch.int64) * bits
    words = (v << shifts).sum(dim=-1)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def _awq_unpack(packed: torch.Tensor) -> torch.Tensor:
    """AWQ GEMM int32 [rows, out/8] → int64 [rows, out] in column order."""
    nib = unpack_int32(packed, 4, -1)  # nibble order
    n = nib.shape[-1]
    order = torch.arange(n).reshape(-1, 8)[:, list(AWQ_REVERSE_ORDER)].reshape(-1)
    return nib[:, order]


def awq_pack(values: torch.Tensor) -> torch.Tensor:
    """int [rows, out] in [0, 15] → AWQ GEMM int32 [rows, out/8] (AutoAWQ's pack order)."""
    n = values.shape[-1]
    order = torch.arange(n).reshape(-1, 8)[:, list(AWQ_ORDER)].reshape(-1)
    return pack_int32(values[:, order], 4, -1)


def _n_groups(in_f: int, group_size: int) -> int:
    return 1 if group_size <= 0 else -(-in_f // group_size)


def _finish(name: str, q_io: torch.Tensor, zeros_go: torch.Tensor, scales_go: torch.Tensor,
            g_idx: Optional[torch.Tensor], bits: int, group_size: int, has_zero_point: bool,
            bias: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Common tail: [in, out] ints + per-group [n_groups, out] params → our layout."""
    in_f, out_f = q_io.shape
    gs = in_f if group_size <= 0 else group_size
    plain = torch.arange(in_f) // gs
    mid = 2 ** (bits - 1)
    if g_idx is not None and not torch.equal(g_idx.to(torch.int64), plain):
        # act-order: dequantize with g_idx, then re-quantize in the plain per-group layout
        log.warning("%s: act-order (g_idx) re-quantized to plain groups of %d (adds rounding error)", name, gs)
        g = g_idx.to(torch.int64)
        w = ((q_io - zeros_go[g]).float() * scales_go.float()[g]).t()
        out = to_weight_only_tensors(quantize_rtn(w, bits, gs, has_zero_point, name + ".qweight"), has_zero_point)
    else:
        if in_f % gs:
            raise TrtbuildError(f"{name}.qweight: group_size {gs} does not divide the input dimension {in_f}")
        if not has_zero_point and not torch.all(zeros_go == mid):
            raise TrtbuildError(f"{name}.qzeros: zero points differ from {mid} but the checkpoint is declared "
                                "symmetric (sym / zero_point false)")
        if torch.any((zeros_go < 0) | (zeros_go > 2**bits - 1)):
            raise TrtbuildError(f"{name}.qzeros: zero points outside [0, {2**bits - 1}] "
                                "(wrong checkpoint_format: 'gptq' stores zero − 1, 'gptq_v2' the zero itself)")
        qw = QuantizedWeight(q=q_io.t().contiguous().to(torch.uint8), scale=scales_go.t().float().contiguous(),
                             zero=zeros_go.t().contiguous().to(torch.uint8), bits=bits, group_size=gs)
        out = to_weight_only_tensors(qw, has_zero_point)
    if bias is not None:
        out["bias"] = bias
    return out


def import_gptq_linear(tensors: dict[str, torch.Tensor], name: str, *, bits: int = 4, group_size: int = 128,
                       in_features: Optional[int] = None, out_features: Optional[int] = None,
                       checkpoint_format: str = "gptq", has_zero_point: bool = True) -> dict[str, torch.Tensor]:
    """One AutoGPTQ / GPTQModel linear → our tensors. `name` (the HF module) prefixes every error."""
    if bits not in (4, 8):
        raise TrtbuildError(f"{name}: {bits}-bit GPTQ is not supported (4 or 8 bits)")
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise TrtbuildError(f"{name}: GPTQ checkpoint_format {checkpoint_format!r} is not supported (gptq, gptq_v2)")
    per = 32 // bits
    qweight, qzeros, scales = _get(tensors, name, "qweight"), _get(tensors, name, "qzeros"), _get(tensors, name, "scales")
    for key, t in (("qweight", qweight), ("qzeros", qzeros)):
        _check(t.dtype == torch.int32 and t.dim() == 2, name, key, f"expected a 2-D int32 tensor, got {t.dtype} {tuple(t.shape)}")
    _check(scales.dim() == 2 and scales.is_floating_point(), name, "scales", f"expected a 2-D float tensor, got {tuple(scales.shape)}")
    in_f, out_f = qweight.shape[0] * per, qweight.shape[1]
    if in_features is not None:
        _check(in_f == in_features, name, "qweight",
               f"shape {tuple(qweight.shape)} holds {in_f} inputs at {bits} bits, the model has {in_features}")
    if out_features is not None:
        _check(out_f == out_features, name, "qweight", f"shape {tuple(qweight.shape)} has {out_f} outputs, the model has {out_features}")
    ng = _n_groups(in_f, group_size)
    _check(tuple(scales.shape) == (ng, out_f), name, "scales",
           f"shape {tuple(scales.shape)}, expected ({ng}, {out_f}) for group_size {group_size}")
    _check(tuple(qzeros.shape) == (ng, out_f // per) and out_f % per == 0, name, "qzeros",
           f"shape {tuple(qzeros.shape)}, expected ({ng}, {out_f // per}) for {bits}-bit zeros")
    g_idx = tensors.get("g_idx")
    if g_idx is not None:
        _check(tuple(g_idx.shape) == (in_f,), name, "g_idx", f"shape {tuple(g_idx.shape)}, expected ({in_f},)")
        _check(bool(((g_idx >= 0) & (g_idx < ng)).all()), name, "g_idx", f"group indices outside [0, {ng})")
    q = unpack_int32(qweight, bits, 0)
    zeros = unpack_int32(qzeros, bits, -1)
    if checkpoint_format == "gptq":
        # old AutoGPTQ stored zero − 1; a stored 2^bits − 1 is a zero point of 0 that wrapped around
        zeros = zeros + 1
        if torch.any(zeros > 2**bits - 1):
            raise TrtbuildError(f"{name}.qzeros: stored zero point {2**bits - 1} in the old 'gptq' format (zero − 1) "
                                "means a zero of 0 that AutoGPTQ could not store: re-save the checkpoint with "
                                "GPTQModel in the gptq_v2 format, or set checkpoint_format if it is already v2")
    return _finish(name, q, zeros, scales, g_idx, bits, group_size, has_zero_point, tensors.get("bias"))


def import_awq_linear(tensors: dict[str, torch.Tensor], name: str, *, bits: int = 4, group_size: int = 128,
                      in_features: Optional[int] = None, out_features: Optional[int] = None,
                      has_zero_point: bool = True, version: str = "gemm") -> dict[str, torch.Tensor]:
    """One AutoAWQ GEMM linear → our tensors. AWQ scales were folded into the model before packing."""
    if str(version).lower() != "gemm":
        raise TrtbuildError(f"{name}: AWQ version {version!r} is not supported: only GEMM checkpoints "
                            "(re-export with version='GEMM')")
    if bits != 4:
        raise TrtbuildError(f"{name}: {bits}-bit AWQ is not supported (AutoAWQ GEMM is 4-bit)")
    qweight, qzeros, scales = _get(tensors, name, "qweight"), _get(tensors, name, "qzeros"), _get(tensors, name, "scales")
    for key, t in (("qweight", qweight), ("qzeros", qzeros)):
        _check(t.dtype == torch.int32 and t.dim() == 2, name, key, f"expected a 2-D int32 tensor, got {t.dtype} {tuple(t.shape)}")
    _check(scales.dim() == 2 and scales.is_floating_point(), name, "scales", f"expected a 2-D float tensor, got {tuple(scales.shape)}")
    in_f, out_f = qweight.shape[0], qweight.shape[1] * 8
    if in_features is not None:
        _check(in_f == in_features, name, "qweight", f"shape {tuple(qweight.shape)} has {in_f} inputs, the model has {in_features}")
    if out_features is not None:
        _check(out_f == out_features, name, "qweight",
               f"shape {tuple(qweight.shape)} holds {out_f} outputs at 4 bits, the model has {out_features}")
    ng = _n_groups(in_f, group_size)
    _check(tuple(scales.shape) == (ng, out_f), name, "scales",
           f"shape {tuple(scales.shape)}, expected ({ng}, {out_f}) for group_size {group_size}")
    _check(tuple(qzeros.shape) == (ng, out_f // 8), name, "qzeros", f"shape {tuple(qzeros.shape)}, expected ({ng}, {out_f // 8})")
    q = _awq_unpack(qweight)
    zeros = _awq_unpack(qzeros)
    return _finish(name, q, zeros, scales, None, bits, group_size, has_zero_point, tensors.get("bias"))


def concat_linears(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack imported linears along the output dimension (q, k, v → qkv)."""
    keys = set(parts[0])
    for p in parts[1:]:
        if set(p) != keys:
            raise TrtbuildError(f"cannot stack quantized linears with different tensors: {sorted(keys)} vs {sorted(p)}")
    out = {}
    for k in parts[0]:
        if k == "prequant_scaling_factor":
            raise TrtbuildError("cannot stack linears that carry prequant_scaling_factor")
        out[k] = torch.cat([p[k] for p in parts], dim=0)
    return out


@dataclass
class PrequantizedSpec:
    """What a pre-quantized HF checkpoint's `quantization_config` says, and how to import its linears."""

    method: str  # gptq | awq
    bits: int
    group_size: int
    has_zero_point: bool
    checkpoint_format: str = "gptq"
    desc_act: bool = False
    version: str = "gemm"

    @classmethod
    def from_hf(cls, qcfg: dict[str, Any], source: str = "quantization_config") -> "PrequantizedSpec":
        method = str(qcfg.get("quant_method", "gptq")).lower()
        bits = int(qcfg.get("bits", qcfg.get("w_bit", 4)))
        gs = int(qcfg.get("group_size", qcfg.get("q_group_size", 128)))
        if method == "gptq":
            fmt = qcfg.get("checkpoint_format", qcfg.get("format", "gptq"))
            if bits not in (4, 8):
                raise TrtbuildError(f"{source}: GPTQ bits {bits} are not supported (4 or 8)")
            return cls("gptq", bits, gs, has_zero_point=not qcfg.get("sym", True), checkpoint_format=str(fmt),
                       desc_act=bool(qcfg.get("desc_act", False)))
        if method == "awq":
            if bits != 4:
                raise TrtbuildError(f"{source}: AWQ bits {bits} are not supported (4)")
            return cls("awq", bits, gs, has_zero_point=bool(qcfg.get("zero_point", True)),
                       version=str(qcfg.get("version", "gemm")).lower())
        raise TrtbuildError(f"{source}: quant_method {method!r} is not supported (gptq, awq)")

    def import_linear(self, tensors: dict[str, torch.Tensor], name: str, in_features: Optional[int] = None,
                      out_features: Optional[int] = None) -> dict[str, torch.Tensor]:
        kw = dict(bits=self.bits, group_size=self.group_size, in_features=in_features, out_features=out_features,
                  has_zero_point=self.has_zero_point)
        if self.method == "gptq":
            return import_gptq_linear(tensors, name, checkpoint_format=self.checkpoint_format, **kw)
        return import_awq_linear(tensors, name, version=self.version, **kw)

    def quant_config(self) -> QuantConfig:
        return QuantConfig.for_algo(weight_only_algo(self.bits, self.method), group_size=self.group_size,
                                    has_zero_point=self.has_zero_point)
