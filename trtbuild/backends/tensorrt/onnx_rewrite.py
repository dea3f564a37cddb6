"""prepare_onnx_for_tensorrt: the standard-op network rewritten, in place, into the form TensorRT accepts.

The network writer's quantized paths put float32 scales/constants into a float16 network (a
float16 MatMul then refuses its float32 dequantized weight: "IMatrixMultiplyLayer must have same
input types"), and per-channel weights could have a block that K is not a multiple of (block 128
before it became 32, with SmolLM2's hidden 576: "The quantization axis must divide into whole
blocks"). prepare_onnx_for_tensorrt rewrites both (scales to float16; per-channel blocks to one
that divides K), exact up to float16 scale rounding. Per-channel int4 with a block of K (or axis-1
per-channel) also builds, but as a plain gemm on dequantized weights; a dividing block builds
TensorRT's fused weight-only kernel ("runtime_fusion" layers). tensorrt_rtx is strongly typed (no
BuilderFlag.FP16): the ONNX dtypes decide the precision. More in docs/TENSORRT.md.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from trtbuild.errors import TrtbuildError

if TYPE_CHECKING:
    import onnx

def onnx_structure(onnx_path: Path) -> onnx.ModelProto:
    """The graph without its weights (cheap even for a large model with external data)."""
    import onnx

    try:
        return onnx.load(str(onnx_path), load_external_data=False)
    except Exception as e:
        raise TrtbuildError(f"{onnx_path} is not a readable ONNX model: {e}") from e


_FLOAT_TYPES = {"float16": 10, "bfloat16": 16}  # onnx.TensorProto.FLOAT16 / BFLOAT16
_QUANT_INT_TYPES = (3, 2, 22, 21)  # INT8, UINT8, INT4, UINT4
_REBLOCK_SIZES = (128, 64, 32, 16)


def _tensor_values(tensor: onnx.TensorProto, base_dir: Path) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(tensor, base_dir=str(base_dir))


def _store_tensor(tensor: onnx.TensorProto, values: np.ndarray, data_path: Path) -> None:
    """Replace `tensor`'s contents with `values` (same name), appended to the external data file."""
    from onnx import numpy_helper

    from trtbuild.onnx_graph import append_external_data

    new = numpy_helper.from_array(np.ascontiguousarray(values), tensor.name)
    tensor.ClearField("external_data")
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = 0  # DEFAULT
    tensor.data_type = new.data_type
    del tensor.dims[:]
    tensor.dims.extend(new.dims)
    if len(new.raw_data) <= 1024:  # tiny constants stay inline (onnxruntime reads Reshape shapes only inline)
        tensor.raw_data = new.raw_data
        return
    with open(data_path, "ab") as f:  # opened at its end: appended at the next aligned offset
        append_external_data(tensor, new.raw_data, f, data_path.name)


def _to_compute_float(values: np.ndarray, dtype: str, name: str) -> np.ndarray:
    import ml_dtypes

    target = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    with np.errstate(over="ignore"):
        out = values.astype(target)
    wide = out.astype(np.float32)
    if not np.all(np.isfinite(wide) | ~np.isfinite(values)):
        raise TrtbuildError(f"initializer {name!r} has values beyond {dtype}'s range (max |value| "
                            f"{float(np.abs(values[np.isfinite(values)]).max()):.3g}): it cannot be written in {dtype}")
    lost = (wide == 0) & (values != 0)
    if lost.any():  # keep tiny epsilons/scales non-zero: the smallest positive value of the type, with its sign
        tiny = ml_dtypes.finfo(target).smallest_subnormal
        out = np.where(lost, np.copysign(np.asarray(tiny, np.float32), values).astype(target), out)
    return out


def prepare_onnx_for_tensorrt(onnx_path: str | os.PathLike, compute_dtype: str) -> list[str]:
    """Make the standard-op network the form TensorRT accepts, in place; returns what changed.

    The network writer emits quantization scales and constants in float32 (the onnxruntime form);
    TensorRT's strongly typed network wants them in the compute dtype (a float16 MatMul cannot take
    a float32 dequantized weight). And a per-channel int4 weight whose K is not a multiple of its
    block (a hidden size that is not a multiple of 32) is re-blocked to a block that divides K, with the one scale
    per channel repeated: TensorRT wants whole blocks. Both are exact rewrites of what the weights
    mean (scales rounded to the compute dtype). Weights stay packed in the external data file; new
    scales are appended to it. A per-group weight whose K is not a multiple of its group cannot be
    rewritten: that is an error naming the node.
    """
    import onnx

    onnx_path = Path(onnx_path)
    model = onnx_structure(onnx_path)
    base = onnx_path.parent
    data_path = base / (onnx_path.name + ".data")
    inits = {t.name: t for t in model.graph.initializer}
    changes: list[str] = []
    reblocked: Counter = Counter()
    # 1. per-channel int4/int8 blocks that do not divide K
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 2:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        block = int(attrs.get("block_size", 0))
        w, s = inits.get(node.input[0]), inits.get(node.input[1])
        if not block or w is None or s is None or w.data_type not in _QUANT_INT_TYPES:
            continue
        axis = int(attrs.get("axis", 1)) % len(w.dims)
        k = int(w.dims[axis])
        if k % block == 0:
            continue
        if len(node.input) > 2 and node.input[2]:
            continue  # zero points: TensorRT refuses them anyway, and the parser names the node
        scales = _tensor_values(s, base)
        if not np.all(scales == np.take(scales, [0], axis=axis)):
            raise TrtbuildError(f"node {node.name!r}: {k} inputs are not a multiple of the quantization group size "
                                f"{block}, and TensorRT takes only whole blocks: quantize with a --group_size that "
                                "divides the hidden and intermediate sizes")
        new_block = next((b for b in _REBLOCK_SIZES if k % b == 0), k)
        reps = k // new_block
        _store_tensor(s, np.repeat(np.take(scales, [0], axis=axis), reps, axis=axis), data_path)
        for a in node.attribute:
            if a.name == "block_size":
                a.i = new_block
        reblocked[(block, new_block, k)] += 1
    changes += [f"{n} per-channel DequantizeLinear nodes with {k} inputs: block {a} -> {b} (whole blocks)"
                for (a, b, k), n in reblocked.items()]
    # 2. float32 initializers in a float16/bfloat16 network
    if compute_dtype in _FLOAT_TYPES:
        cast = []
        for t in model.graph.initializer:
            if t.data_type == onnx.TensorProto.FLOAT:
                _store_tensor(t, _to_compute_float(_tensor_values(t, base), compute_dtype, t.name), data_path)
                cast.append(t.name)
        if cast:
            changes.append(f"{len(cast)} float32 initializers (quantization scales, constants) -> {compute_dtype}")
    if changes:
        tmp = onnx_path.with_name(f".{onnx_path.name}.partial")
        onnx.save_model(model, str(tmp))
        os.replace(tmp, onnx_path)
    return changes
