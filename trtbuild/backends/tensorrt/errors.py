"""TensorRT's failures as one line naming what to change: the node, op or initializer, and a hint.

Rejected at parse (measured with tensorrt_rtx 1.7.1.116; docs/TENSORRT.md): a non-zero int4 zero
point, any uint4 initializer (a graph-level error, node -1, "Failed to import initializer", so the
initializer is named), Attention with more than one output, ops without a parser (Unique, Det,
StringNormalizer), com.microsoft ops whose plugins the wheel does not ship (MatMulNBits,
GroupQueryAttention), float32 initializers in a float16 network ("must have same input types").
Rejected at build: float32 Attention (no Myelin kernel), target CURRENT without a GPU (cudaError
35), a too small WORKSPACE pool ("OutOfMemory"), an invalid profile.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trtbuild.backends.tensorrt.logs import LogCapture
from trtbuild.backends.tensorrt.probe import RTX_TARGETS

if TYPE_CHECKING:
    import onnx


def parser_error_message(onnx_path: Path | str, err: Any, model: onnx.ModelProto | None, capture: LogCapture,
                         package: str) -> str:
    """One OnnxParser error (`err`, an IParserError) as one line naming the node and op, with a hint."""
    node_idx = err.node()
    node_name, op = err.node_name(), err.node_operator()
    if node_idx >= 0 and model is not None and node_idx < len(model.graph.node):
        n = model.graph.node[node_idx]
        node_name = node_name or n.name
        op = op or (f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type)
    desc = err.desc()
    # TensorRT's descriptions end in "<cond>: <message>"; keep the readable tail.
    short = one_line_reason(desc.split("Assertion failed: ", 1)[-1])
    where = f"node {node_name or '#' + str(node_idx)!r} ({op})" if node_idx >= 0 else "the graph"
    hint = ""
    if "must have same input types" in desc or "must have identical types" in desc:
        hint = ("the network mixes float16/bfloat16 and float32 tensors, which a strongly typed TensorRT network "
                "refuses: write every float initializer in the compute dtype (build_for_engine_dir does)")
    if "Non-zero zero point" in desc:
        hint = ("TensorRT's DequantizeLinear takes only zero zero-points: quantize int4/int8 weights symmetrically "
                "(no zero point, signed int4), or fold the zero point into a correction term, or build with "
                "--backend onnxruntime")
        short = "non-zero zero point"
    elif ("failed to load" in desc or "Plugin not found" in desc) and "plugin" in desc.lower():
        hint = (f"{package} has no plugin for {op}: build the standard-op form (--gemm_plugin disable, "
                "--gpt_attention_plugin disable)")
    elif "only supports Attention nodes with one output" in desc:
        hint = "leave Attention's present_key/present_value/qk outputs empty and concatenate past KV outside it"
    elif "Failed to import initializer" in desc:
        found = re.findall(r"Failed to import initializer: (\S+)$", desc.strip()) or \
            re.findall(r"Failed to import initializer: (\S+)", desc)
        init = found[-1] if found else "?"
        opened = [i for i in capture.info + capture.errors if "Failed to open file" in i]
        if opened:
            path = opened[0].split("Failed to open file:", 1)[-1].strip()
            return (f"{onnx_path}: initializer {init!r} is stored in external data file {path}, which cannot be "
                    "opened: keep the .data file beside the .onnx file")
        dtype = _initializer_dtype(model, init)
        if dtype in ("UINT4", "FLOAT4E2M1") or dtype is None:
            hint = "TensorRT has no uint4 weights: store signed int4 with zero zero-points (q - 8)"
        return f"{onnx_path}: {package} cannot import initializer {init!r} ({dtype or 'unknown type'})" + (
            f"; {hint}" if hint else "")
    elif short.strip() in ("false", ""):  # the op checkers' bare verdict
        short = f"op {op} is not supported by {package}'s ONNX parser"
    msg = f"{onnx_path}: {package}'s ONNX parser rejected {where}: {short.strip()}"
    return msg + (f"; {hint}" if hint else "")


def one_line_reason(desc: str) -> str:
    """TensorRT's multi-line parser text -> its reason on one line.

    "Invalid Node - X" is followed by the builder's own line, e.g. "ITensor::getDimensions: Error Code 4:
    API Usage Error (X: IMatrixMultiplyLayer must have same input types. ... In validateTypes at
    /_src/...)"; the CUDA-driver echo that follows every failed call on a GPU-less machine is dropped.
    """
    lines = [ln.strip() for ln in desc.strip().splitlines() if ln.strip() and "catchCudaError" not in ln]
    if not lines:
        return ""
    if len(lines) > 1 and lines[0].startswith("Invalid Node"):
        lines = lines[1:]
    out = []
    for ln in lines:
        m = re.search(r"Error Code \d+: [^(]*\((.*)\)\s*$", ln)
        if m:
            ln = m.group(1)
            ln = re.sub(r"^[^:]*: (?=[A-Z])", "", ln, count=1)  # the layer name, already named by the caller
        ln = re.sub(r"\s*In \w+ at /\S+$", "", ln).rstrip(". ")
        out.append(ln)
    return "; ".join(dict.fromkeys(out))[:600]


def _initializer_dtype(model: onnx.ModelProto | None, name: str) -> str | None:
    import onnx

    if model is None:
        return None
    for t in model.graph.initializer:
        if t.name == name:
            return onnx.TensorProto.DataType.Name(t.data_type)
    return None


def build_error_message(onnx_path: Path | str, capture: LogCapture, targets: list[str]) -> str:
    """A failed build_serialized_network as one line: what ran out or is missing, and what to change."""
    errs = capture.real_errors()
    text = "\n".join(errs)
    if "Build canceled" in text or "BuildCanceled" in text:
        return "the build was cancelled"
    if "Attention operation was not supported by a dedicated kernel" in text:
        return (f"{onnx_path}: TensorRT has no kernel for an Attention node with these dtypes/shapes (float32 "
                "Attention has none): write the network in float16 or bfloat16")
    if "OutOfMemory" in text or "MEM_ALLOC_FAILED" in text or "out of memory" in text.lower():
        m = re.search(r"Requested size was (\d+) bytes", text)
        size = f" (a request for {int(m.group(1)):,} bytes failed)" if m else ""
        return (f"TensorRT ran out of memory building {onnx_path}{size}: the optimization profile is too large for "
                "the memory pool; lower max_batch_size / max_seq_len / max_num_tokens or raise workspace_bytes")
    if "CUDA driver version is insufficient" in text or "cudaError 35" in text or "no CUDA-capable device" in text:
        if "CURRENT" in targets:
            return ("compute capability CURRENT means the GPU of this machine, and there is none: name the targets "
                    f"instead ({', '.join(RTX_TARGETS)})")
        return (f"building {onnx_path} needed a GPU at a step that tensorrt_rtx cannot do ahead of time: "
                + first_line(errs))
    if "Invalid optimization profile" in text or "no optimization profile" in text:
        return f"invalid optimization profile for {onnx_path}: {first_line(errs)}"
    return f"TensorRT could not build {onnx_path}: {first_line(errs) or 'no error message'}"


def first_line(errs: list[str]) -> str:
    """The first line of the first error (at most 600 characters), or ""."""
    if not errs:
        return ""
    e = errs[0].strip().splitlines()[0]
    return e[:600]
