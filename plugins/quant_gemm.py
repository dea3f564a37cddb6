"""Quantized linear layers (the gemm plugin's quantized lowerings). Tensor layout: docs/CONTRACTS.md.

Weight-only int4/int8 (W4A16*, W8A16):
  fused    com.microsoft::MatMulNBits (block-wise)
  standard DequantizeLinear-21 block-wise along K → MatMul (weights stay packed in the file; onnxruntime
           fuses it into MatMulNBits at build, at the same accuracy level)
  On CPU, MatMulNBits is fast only at accuracy_level 4, which quantizes the activations to int8 (a
  scale per block of K): what TensorRT-LLM calls W8A16 then computes int8 x int8, not int8 x float.
  Engines do so by default (weight_only_activations "int8") with blocks of 32 for weights per
  channel, the group size for grouped weights: on SmolLM2-135M W8A16 costs +0.2-0.8% perplexity
  over fp32 on three texts (blocks of 128: +0.6-1.7%) at 2.4x fp32's decode speed (AVX-512 Xeon).
  "float" keeps the activations in float (accuracy_level 0: exactly A16, +/-0.2%, but ~8x slower
  decode than fp32, the weights being dequantized at every call).
SmoothQuant W8A8 (int8 weights per channel or per tensor; activations per token or static):
  fused    u8 (zero point 128) × s8 MatMulIntegerToFloat (dynamic per-token scales applied after it, or
           static); on CPUs where u8 × s8 saturates the engine's u8 × u8 form runs (trtbuild.cpu_forms);
           per token with trtbuild's kernels (smooth_quant_plugins): PerTokenQuantize, and a gated
           SiLU MLP's middle in one SwiGLUQuantize
  standard QuantizeLinear/DequantizeLinear pairs around a float MatMul (what TensorRT fuses)
Groups may end short (K not a multiple of group_size: the last group is partial, as in AutoGPTQ).
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from trtbuild.errors import TrtbuildError
from trtbuild.onnx_graph import GraphBuilder
from trtbuild.quant_algo import QuantAlgo

# weight_only_activations → MatMulNBits accuracy_level (onnxruntime: 0 = float compute, 4 = int8)
ACCURACY_LEVELS = {"int8": 4, "float": 0}
PER_CHANNEL_BLOCK = 32  # activation block of weights per channel (the finest MLAS's int8 kernels run fast)


def _unpack_int4(packed: np.ndarray) -> np.ndarray:
    """[out, in/2] bytes → [out, in] values, low nibble first."""
    out = np.empty((packed.shape[0], packed.shape[1] * 2), np.uint8)
    out[:, 0::2] = packed & 0x0F
    out[:, 1::2] = packed >> 4
    return out


def pack_int4(values: np.ndarray) -> np.ndarray:
    """[..., 2n] uint8 values in [0, 15] → [..., n] bytes, low nibble first."""
    return (values[..., 0::2] & 0x0F) | (values[..., 1::2] << 4)


def _weight_only_values(tensors: dict[str, np.ndarray], prefix: str, bits: int):
    """(q [out, in] uint8, scale [out, groups] f32, zero [out, groups] uint8)."""
    packed = np.asarray(tensors[prefix + ".weight"])
    if packed.dtype != np.uint8:
        raise TrtbuildError(f"{prefix}.weight is {packed.dtype}; a {bits}-bit weight-only checkpoint stores uint8")
    q = _unpack_int4(packed) if bits == 4 else packed
    scale = np.asarray(tensors[prefix + ".weights_scaling_factor"], np.float32)
    zero = tensors.get(prefix + ".zero")
    zero = np.full(scale.shape, 1 << (bits - 1), np.uint8) if zero is None else np.asarray(zero, np.uint8)
    if scale.shape[0] != q.shape[0] or zero.shape != scale.shape:
        raise TrtbuildError(f"{prefix}: weights_scaling_factor {scale.shape} / zero {zero.shape} do not match "
                            f"the weight's {q.shape[0]} output channels")
    return q, scale, zero


def _block_size(in_features: int, groups: int, group_size: int) -> int:
    """The block along K: the group size, or (per channel, the scale repeated per block) 32, the block
    over which accuracy_level 4 shares one activation scale (16 for K < 32)."""
    if groups > 1:
        return group_size
    return PER_CHANNEL_BLOCK if in_features >= PER_CHANNEL_BLOCK else 16


def _prequant(g: GraphBuilder, tensors: dict[str, np.ndarray], prefix: str) -> str | None:
    """The linear's prequant_scaling_factor (AWQ's or SmoothQuant's 1/s kept for its input), if it has one."""
    prequant = tensors.get(prefix + ".prequant_scaling_factor")
    return None if prequant is None else g.weight(prefix + ".prequant_scaling_factor", np.asarray(prequant, np.float32))


def accuracy_level(weight_only_activations: str) -> int:
    """MatMulNBits' accuracy_level for --weight_only_activations (int8 | float)."""
    if weight_only_activations not in ACCURACY_LEVELS:
        raise TrtbuildError(f"--weight_only_activations {weight_only_activations!r}: use "
                            f"{' or '.join(ACCURACY_LEVELS)}")
    return ACCURACY_LEVELS[weight_only_activations]


def nbits_matmul(g: GraphBuilder, inputs: list[str], name: str, k: int, n: int, bits: int, block: int,
                 weight_only_activations: str = "int8", kernel: bool = False, weights_shared: bool = False,
                 swiglu: bool = False) -> str:
    """x times block-quantized weights: inputs (x, b, scales[, zero_points]) in MatMulNBits' layout
    (docs/CONTRACTS.md), as onnxruntime's MatMulNBits or, with `kernel` (int8 activations only),
    trtbuild's WeightOnlyQuantMatMul, which computes the same and decodes the weights once for all rows
    of a step (trtbuild/kernels/weight_only_matmul.cc). `weights_shared`: another node reads b too (a
    tied int8 embedding table), so the kernel keeps the file's copy of it resident. `swiglu` (the kernel
    only): x is a gated SiLU MLP's merged fc and gate output [..., 2k], and silu(fc) * gate is what gets
    multiplied (this is the MLP's proj)."""
    if kernel and block % 16 == 0:  # the kernel's blocks hold whole vectors of x (MatMulNBits' are 16, 32, ...)
        if weight_only_activations != "int8":
            raise TrtbuildError("trtbuild's WeightOnlyQuantMatMul computes with int8 activations only "
                                f"(--weight_only_activations {weight_only_activations!r})")
        return g.op("WeightOnlyQuantMatMul", inputs, domain="trtbuild", name=name + "/WeightOnlyQuantMatMul",
                    K=k, N=n, bits=bits, block_size=block, weights_shared=int(weights_shared), swiglu=int(swiglu))
    if swiglu:
        raise TrtbuildError(f"{name}: a SiLU-gated input needs trtbuild's WeightOnlyQuantMatMul (blocks of 16, 32, ...)")
    return g.op("MatMulNBits", inputs, domain="com.microsoft", name=name + "/MatMulNBits",
                K=k, N=n, bits=bits, block_size=block, accuracy_level=accuracy_level(weight_only_activations))


def weight_only_linear(g: GraphBuilder, x: str, tensors: dict[str, np.ndarray], prefix: str, bits: int,
                       group_size: int, fused: bool, weight_only_activations: str = "int8",
                       kernel: bool = False, swiglu: bool = False) -> str:
    """A weight-only linear: int8/int4 weights (per channel or per group, with zero points) times x
    (`kernel`: as trtbuild's WeightOnlyQuantMatMul; `swiglu`: times silu(fc) * gate of x = [fc, gate],
    see nbits_matmul)."""
    if swiglu and not (fused and kernel):
        raise TrtbuildError(f"{prefix}: a SiLU-gated input needs the gemm plugin's WeightOnlyQuantMatMul")
    q, scale, zero = _weight_only_values(tensors, prefix, bits)
    n, k = q.shape
    groups = scale.shape[1]
    block = _block_size(k, groups, group_size)
    if groups > 1 and groups != -(-k // block):
        raise TrtbuildError(f"{prefix}: {groups} scale groups for {k} inputs do not fit group_size {group_size}")
    blocks = -(-k // block)
    if groups == 1:  # per channel: the one scale repeated over every block
        scale, zero = np.repeat(scale, blocks, axis=1), np.repeat(zero, blocks, axis=1)
    prequant = _prequant(g, tensors, prefix)
    if prequant is not None:
        if swiglu:
            raise TrtbuildError(f"{prefix}: a SiLU-gated input cannot take a prequant_scaling_factor")
        x = g.op("Mul", [x, prequant])
    # symmetric: every zero point is the middle of the unsigned range (8 / 128)
    symmetric = bool(np.all(zero == (1 << (bits - 1))))
    if fused:
        padded = np.zeros((n, blocks * block), np.uint8)
        padded[:, :k] = q
        blob = pack_int4(padded) if bits == 4 else padded
        b = g.weight(prefix + ".qweight", blob.reshape(n, blocks, block * bits // 8))
        inputs = [x, b, g.weight(prefix + ".scales", scale)]
        if not symmetric:  # without the input MatMulNBits takes 2^(bits-1): the same values, but its
            # kernel is 2.2x faster at batch 1 (MLAS' asymmetric path reads and applies zero points)
            zp = pack_int4(np.pad(zero, ((0, 0), (0, blocks % 2)))) if bits == 4 else zero
            inputs.append(g.weight(prefix + ".zero_points", np.ascontiguousarray(zp)))
        return nbits_matmul(g, inputs, prefix, k, n, bits, block, weight_only_activations, kernel, swiglu=swiglu)
    # standard: DequantizeLinear along K of the [K, N] weight; symmetric int4 as signed values with no
    # zero point (the form TensorRT accepts), asymmetric as uint4/uint8 with zero points.
    values = q.T  # [K, N]
    if symmetric:
        signed = values.astype(np.int16) - (1 << (bits - 1))
        raw_type = TensorProto.INT4 if bits == 4 else TensorProto.INT8
        data = signed.astype(np.int8).astype(np.uint8)
    else:
        raw_type = TensorProto.UINT4 if bits == 4 else TensorProto.UINT8
        data = values
    if bits == 4:
        flat = data.reshape(-1) & 0x0F
        raw = pack_int4(np.pad(flat, (0, flat.size % 2))[None, :])[0].tobytes()
    else:
        raw = np.ascontiguousarray(data).tobytes()
    w = g.raw_weight(prefix + ".qweight", raw, raw_type, [k, n])
    dq_inputs = [w, g.weight(prefix + ".scales", np.ascontiguousarray(scale.T))]
    if not symmetric:
        zt = np.ascontiguousarray(zero.T)
        if bits == 4:
            zflat = zt.reshape(-1)
            zraw = pack_int4(np.pad(zflat, (0, zflat.size % 2))[None, :])[0].tobytes()
            dq_inputs.append(g.raw_weight(prefix + ".zero_points", zraw, TensorProto.UINT4, list(zt.shape)))
        else:
            dq_inputs.append(g.weight(prefix + ".zero_points", zt))
    wf = g.op("DequantizeLinear", dq_inputs, axis=0, block_size=block, name=prefix + "/DequantizeLinear")
    return g.op("MatMul", [x, wf], name=prefix + "/MatMul")


def _int8_weight(g: GraphBuilder, tensors: dict[str, np.ndarray], prefix: str) -> tuple[str, str, np.ndarray]:
    """(qweight [K, N] int8, its scales [N] or scalar, the scales as numpy) of a SmoothQuant linear."""
    w = np.asarray(tensors[prefix + ".weight"])
    if w.dtype != np.int8:
        raise TrtbuildError(f"{prefix}.weight is {w.dtype}; SmoothQuant checkpoints store int8 weights")
    w_scale = np.asarray(tensors[prefix + ".per_channel_scale"], np.float32).reshape(-1)
    wq = g.weight(prefix + ".qweight", np.ascontiguousarray(w.T))
    ws = g.weight(prefix + ".w_scale", w_scale if w_scale.size > 1 else w_scale.reshape(()))
    return wq, ws, w_scale


def _u8_matmul(g: GraphBuilder, xq: str, wq: str, ws: str, prefix: str) -> str:
    """u8 (zero point 128) x s8 GEMM with the weight scales in its epilogue; the row scales are the caller's."""
    return g.op("MatMulIntegerToFloat", [xq, wq, g.const(1.0, np.float32), ws, g.const(128, dtype=np.uint8),
                                         g.const(0, dtype=np.int8)], domain="com.microsoft",
                name=prefix + "/MatMulIntegerToFloat")


def _u8_gemm(g: GraphBuilder, xq: str, x_scale: str, wq: str, ws: str, prefix: str) -> str:
    """_u8_matmul times the row scales."""
    return g.op("Mul", [_u8_matmul(g, xq, wq, ws, prefix), x_scale])


def per_token_quantize(g: GraphBuilder, x: str, prequant: str | None, prefix: str) -> tuple[str, str]:
    """trtbuild's PerTokenQuantize kernel: (u8 values with zero point 128, row scales [..., 1])."""
    xq, x_scale = g.op("PerTokenQuantize", [x] + ([prequant] if prequant else []), num_outputs=2, domain="trtbuild",
                       name=prefix + "/PerTokenQuantize")
    return xq, x_scale


def smoothquant_linear(g: GraphBuilder, x: str, tensors: dict[str, np.ndarray], prefix: str, per_token: bool,
                       fused: bool, kernels: bool = False) -> str:
    """`kernels` (fused, per token): trtbuild's PerTokenQuantize instead of onnxruntime's ops."""
    wq, ws, w_scale = _int8_weight(g, tensors, prefix)
    n, k = np.asarray(tensors[prefix + ".weight"]).shape
    prequant = _prequant(g, tensors, prefix)
    if fused and per_token and kernels:
        return _u8_gemm(g, *per_token_quantize(g, x, prequant, prefix), wq, ws, prefix)
    if prequant is not None:
        x = g.op("Mul", [x, prequant])
    zero_i8 = g.const(0, dtype=np.int8)
    if per_token:
        # per-row scale = max|x| / 127 over K
        amax = g.op("ReduceMax", [g.op("Abs", [x]), g.const([-1])], keepdims=1)
        if fused:
            # A zero row gets scale 0: its quantized values are whatever 0/0 saturates to, but the
            # GEMM's row is then multiplied by that 0 scale, so it comes out exactly 0 with no epsilon
            # guard (one node less in each of the ~4 linears of a layer).
            x_scale = g.op("Mul", [amax, g.const(1 / 127, np.float32)])
            # u8 × s8: the symmetric int8 values shifted by 128 so MLAS takes its fastest path. One
            # QuantizeLinear blocked over the whole row (round half to even, as Round), the weight scales
            # applied in the GEMM's epilogue and one Mul by the row scales replace nine elementwise
            # passes (Div, Round, Clip, Add, Cast, Cast, Mul, Mul): ~20% of an int8 linear at 512 tokens.
            # The zero points [batch, seq, 1] are the same for every linear: made once per graph.
            zero_u8 = g.shared("per_token_zero_point_u8", lambda: g.op("Expand", [
                g.const(128, dtype=np.uint8),
                g.op("Concat", [g.op("Shape", [x], end=-1), g.const([1])], axis=0)], name="per_token_zero_point"))
            xq = g.op("QuantizeLinear", [x, x_scale, zero_u8], axis=-1, block_size=k)
            return _u8_gemm(g, xq, x_scale, wq, ws, prefix)
        x_scale = g.op("Mul", [g.op("Max", [amax, g.const(1e-8, np.float32)]), g.const(1 / 127, np.float32)])
        xdq = g.op("Mul", [g.op("Clip", [g.op("Round", [g.op("Div", [x, x_scale])]),
                                          g.const(-127.0, np.float32), g.const(127.0, np.float32)]), x_scale])
    else:
        act_scale = np.asarray(tensors[prefix + ".act_scale"], np.float32).reshape(())
        a_scale = g.weight(prefix + ".act_scale", act_scale)
        if fused:
            # u8 with zero point 128 (the same 256 steps as s8 with zero point 0): MLAS has fast u8 x s8
            # kernels on every x86 CPU, but s8 x s8 only with AVX-VNNI-INT8 (13 ms against 0.3 ms for a
            # 512-token SmolLM2 MLP GEMM on an AMX Xeon, scalar code elsewhere).
            zero_u8 = g.const(128, dtype=np.uint8)
            xq = g.op("QuantizeLinear", [x, a_scale, zero_u8])
            return g.op("MatMulIntegerToFloat", [xq, wq, a_scale, ws, zero_u8], domain="com.microsoft",
                        name=prefix + "/MatMulIntegerToFloat")
        xq = g.op("QuantizeLinear", [x, a_scale, zero_i8])
        xdq = g.op("DequantizeLinear", [xq, a_scale, zero_i8])
    wf = g.op("DequantizeLinear", [wq, ws] + ([] if w_scale.size == 1 else [g.const(np.zeros(n), np.int8)]),
              axis=1)
    return g.op("MatMul", [xdq, wf], name=prefix + "/MatMul")


def smoothquant_swiglu_mlp(g: GraphBuilder, x: str, fc_gate: dict[str, np.ndarray], fc_gate_prefix: str,
                           tensors: dict[str, np.ndarray], proj_prefix: str) -> str | None:
    """A gated SiLU MLP, proj(silu(fc(x)) * gate(x)), in W8A8 per token with trtbuild's kernels:
    PerTokenQuantize → one GEMM for fc and gate (`fc_gate`, merged) → SwiGLUQuantize (scales, SiLU,
    product and the quantization for proj in one pass) → proj's GEMM. None when a bias or proj's
    prequant scale needs the unfused form."""
    if any(name.endswith(".bias") for name in fc_gate) or proj_prefix + ".bias" in tensors \
            or proj_prefix + ".prequant_scaling_factor" in tensors:
        return None
    xq, x_scale = per_token_quantize(g, x, _prequant(g, fc_gate, fc_gate_prefix), fc_gate_prefix)
    wq, ws, _ = _int8_weight(g, fc_gate, fc_gate_prefix)
    y = _u8_matmul(g, xq, wq, ws, fc_gate_prefix)  # the row scales go into SwiGLUQuantize
    aq, a_scale = g.op("SwiGLUQuantize", [y, x_scale], num_outputs=2, domain="trtbuild",
                       name=fc_gate_prefix + "/SwiGLUQuantize")
    wq, ws, _ = _int8_weight(g, tensors, proj_prefix)
    return _u8_gemm(g, aq, a_scale, wq, ws, proj_prefix)


def quantized_linear(g: GraphBuilder, x: str, tensors: dict[str, np.ndarray], prefix: str, dtype: np.dtype,
                     fused: bool, algo: QuantAlgo, group_size: int = 128, kernels: bool = False,
                     weight_only_activations: str = "int8", weight_only_kernel: bool = False,
                     swiglu: bool = False) -> str:
    """Lower one quantized linear holding `algo`'s weights (`swiglu`: weight-only, see weight_only_linear)."""
    if algo.weight_only:
        return weight_only_linear(g, x, tensors, prefix, algo.weight_bits, group_size, fused,
                                  weight_only_activations, weight_only_kernel, swiglu)
    return smoothquant_linear(g, x, tensors, prefix, per_token=algo.per_token, fused=fused, kernels=kernels)
