"""TensorRT backend: compile the standard-op ONNX network into a serialized TensorRT engine.

Measured here (tensorrt_rtx 1.7.1.116 from PyPI, polygraphy 0.53.6, onnx 1.23.2, onnxruntime 1.32;
2 x86 cores, no GPU, no libcuda):

- Building needs no GPU: OnnxParser.parse_from_file (external data found beside the .onnx) -> one
  optimization profile -> build_serialized_network_to_stream. Engines start with b"vtrt"; header
  bytes 24..27 are the tensorrt_rtx version (1, 7, 1, 116) and byte 32 a bit set of the targets
  (SM75=1, SM80=2, SM86=4, SM89=8, SM120=16, SM121=32; no target set = default = 0x7e, SM80 and
  later without Turing). Observed, not documented: see `engine_header_info`.
- Parsed and built, fp16 unless said (build times on this machine): MatMul (0.07 s); blockwise
  DequantizeLinear int4 (opset 21 and 23, axis 0, block_size 32) -> MatMul with no zero point or
  all-zero int4 zero points (0.2-0.6 s; weights stay packed: 288 MiB of int4 data -> 260 MiB
  engine); the exact zero-point correction x@DQ(q) - blocksum(x)@(z*s) for asymmetric int4;
  Attention-23 in 4-D form with GQA (q heads 4, kv heads 2) and past KV Concat outside, with no
  mask, is_causal, bool [S,T] or [B,1,S,T] mask, or additive fp16 mask (0.1-0.2 s), also bf16;
  RMSNormalization-23 (fp16 and fp32); RotaryEmbedding-23 (4-D, 3-D with num_heads, interleaved,
  position_ids + [max_pos, D/2] caches, or [B,S,D/2] cos/sin inputs); TensorScatter-24 (writing
  KV into a fixed-capacity cache). A chain of fp16 MatMuls with 1 GiB of weights: 2.6 s.
  End to end, `trt-build --backend tensorrt` on SmolLM2-135M fp16 (30 layers; batch 8, input
  1024, seq 2048): 274 MiB engine, 21 s build (10 s CPU on a loaded box), 1.5 GiB peak RSS.
- Rejected at parse (we name the node and op): a non-zero int4 zero point ("Non-zero zero point is
  not supported"); any uint4 initializer (a graph-level error, node -1, "Failed to import
  initializer", so we name the initializer); Attention with more than one output; Attention with
  3-D Q but 4-D K/V; Unique, Det, StringNormalizer. com.microsoft MatMulNBits and
  GroupQueryAttention are known to the parser (supports_operator is True) but need plugins that
  the wheel does not ship ("failed to load ... plugin"); DynamicQuantizeMatMul,
  MatMulIntegerToFloat, MatMulInteger, SkipLayerNormalization and FastGelu are unsupported.
- Rejected at build: Attention in fp32 (Myelin: "Attention operation was not supported by a
  dedicated kernel"; Myelin also prints "Internal Error: ..." straight to fd 2, which we route to
  the debug log); target CURRENT and BuilderFlag.STRIP_PLAN (weightless engine) need a GPU
  (cudaError 35); a tiny WORKSPACE pool -> "OutOfMemory (Requested size ...)"; min > max profile
  -> API usage error. A kMAX volume over 2^40 elements only WARNS and still builds: we refuse it.
- Host memory (peak RSS): 1 GiB of fp16 weights -> 2.4 GiB streaming the plan to a file, 3.3 GiB
  with build_serialized_network (whole plan in memory); 288 MiB of int4 -> 1.1 GiB. Parsing is
  lazy (~0.2 GiB after parse). A 7B fp16 model (~14 GB) will not build in 24 GiB; 7B int4 should.
- Running: Runtime.deserialize_cuda_engine, get_engine_validity, `polygraphy inspect model
  x.engine` and `polygraphy run --trt` all need a GPU ("CUDA driver version is insufficient for
  CUDA runtime version", cudaError 35). polygraphy uses tensorrt_rtx only with
  POLYGRAPHY_USE_TENSORRT_RTX=1 (else "Module: 'tensorrt' is required"). EngineInspector needs a
  deserialized engine, so layer information comes from the builder's verbose "Layers:" message.
- polygraphy's comparison passes an element when abs diff <= atol OR rel diff <= rtol (relative to
  the loaded reference), unlike numpy.allclose; with one output on each side it pairs them whatever
  their names (so polygraphy_compare checks names first). One `polygraphy run --onnxrt`: ~1.5 s.
- onnxruntime cannot load a Reshape whose shape initializer is in external data ("Cannot parse data
  from external tensors"); TensorRT can. Keep tiny constants inline (onnx's size_threshold=1024).
- tensorrt_rtx is strongly typed (no BuilderFlag.FP16): the ONNX dtypes decide the precision, so
  the network must be written in float16/bfloat16; fp16=True matters only for `tensorrt`.
- The network writer's quantized paths put float32 scales/constants into a float16 network (a
  float16 MatMul then refuses its float32 dequantized weight: "IMatrixMultiplyLayer must have same
  input types"), and per-channel weights could have a block that K is not a multiple of (block
  128 before it became 32, with SmolLM2's hidden 576: "The quantization axis must divide into whole
  blocks"). prepare_onnx_for_tensorrt rewrites both in place (scales to float16; per-channel blocks
  to one that divides K), exact up to float16 scale rounding. Per-channel int4 with a block of K (or axis-1 per-channel) also builds, but as a plain
  gemm on dequantized weights; a dividing block builds TensorRT's fused weight-only kernel
  ("runtime_fusion" layers). With that, on a tiny Llama: float16, int8/int4 weight-only (RTN,
  GPTQ, AWQ; per channel or per group), SmoothQuant (static per-tensor Q/DQ, and per-token, which
  stays a float16 emulation) and int8 KV all build and match the fused onnxruntime engine at the
  parser level; asymmetric (zero points) and bfloat16 (written as float32 by the network writer)
  are refused up front by check_tensorrt_recipe. SmolLM2-135M, batch 4 / input 256 / seq 512:
  float16 274 MiB engine in ~37 s, int4 161 MiB in ~26-30 s (TensorRT build time, 2 loaded cores).
- Parser-level equality uses `polygraphy run --onnxrt --graph-optimization-level ORT_DISABLE_ALL`:
  with onnxruntime's default optimizations it fuses DequantizeLinear -> MatMul into MatMulNBits
  (int8 activations) and checks its own rewrite, not the graph TensorRT compiles.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

import numpy as np

from trtbuild.errors import TrtbuildError

log = logging.getLogger("trtbuild.tensorrt")

Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]

INSTALL_HINT = ("pip install tensorrt_rtx (builds ahead of time without a GPU; runs on RTX/consumer GPUs), "
                "or pip install tensorrt on a machine with a datacenter GPU")
RTX_MAGIC = b"vtrt"
# Targets that tensorrt_rtx 1.7 compiles ahead of time (ComputeCapability members, CURRENT aside).
RTX_TARGETS = ("SM75", "SM80", "SM86", "SM89", "SM120", "SM121")
# Observed bit of each target in byte 32 of a tensorrt_rtx engine header.
_RTX_TARGET_BITS = {1: "SM75", 2: "SM80", 4: "SM86", 8: "SM89", 16: "SM120", 32: "SM121"}
# Per-tensor element limit that TensorRT checks on a profile's kMAX shapes (warning text).
MAX_TENSOR_VOLUME = 1 << 40

_cached_trt: tuple[ModuleType | None, str] | None = None


# ----------------------------------------------------------------------------------------- import
def tensorrt_available() -> tuple[ModuleType | None, str]:
    """Import `tensorrt`, else `tensorrt_rtx`: (module, package name), or (None, why not)."""
    global _cached_trt
    if _cached_trt is not None:
        return _cached_trt
    errors = []
    for name in ("tensorrt", "tensorrt_rtx"):
        try:
            mod = importlib.import_module(name)
        except Exception as e:  # ImportError, or a broken stub package raising something else
            errors.append(f"{name}: {e}")
            continue
        if not hasattr(mod, "Builder"):  # e.g. the PyPI 'tensorrt' placeholder without its wheel
            errors.append(f"{name}: no Builder in {getattr(mod, '__file__', '?')}")
            continue
        _cached_trt = (mod, name)
        return _cached_trt
    return None, "; ".join(errors)


def _require_trt() -> tuple[ModuleType, str]:
    trt, name = tensorrt_available()
    if trt is None:
        raise TrtbuildError(f"the tensorrt backend needs TensorRT, which is not installed ({name}): {INSTALL_HINT}")
    return trt, name


def _is_rtx(package: str) -> bool:
    return package == "tensorrt_rtx"


# ------------------------------------------------------------------------------------ GPU check
def _cuda_driver() -> tuple[ctypes.CDLL | None, str]:
    for lib in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            return ctypes.CDLL(lib), lib
        except OSError:
            continue
    return None, "no NVIDIA driver (libcuda.so.1 not found)"


def can_run_tensorrt() -> tuple[bool, str]:
    """Whether this machine can run a TensorRT engine: TensorRT importable, a CUDA driver and a GPU.

    Returns (True, "GPU 0: <name> (SM<cc>)") or (False, one line saying what is missing).
    """
    trt, name = tensorrt_available()
    if trt is None:
        return False, f"TensorRT is not installed ({INSTALL_HINT})"
    cuda, lib = _cuda_driver()
    if cuda is None:
        return False, f"{lib}: running a TensorRT engine needs an NVIDIA GPU (building one does not)"
    rc = cuda.cuInit(0)
    if rc != 0:
        return False, f"the CUDA driver did not initialise (cuInit error {rc}): no usable NVIDIA GPU"
    count = ctypes.c_int(0)
    rc = cuda.cuDeviceGetCount(ctypes.byref(count))
    if rc != 0 or count.value == 0:
        return False, "the CUDA driver sees no GPU"
    dev = ctypes.c_int(0)
    cuda.cuDeviceGet(ctypes.byref(dev), 0)
    buf = ctypes.create_string_buffer(256)
    cuda.cuDeviceGetName(buf, 256, dev)
    major, minor = ctypes.c_int(0), ctypes.c_int(0)
    cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
    cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)  # ..._MINOR
    return True, f"GPU 0: {buf.value.decode(errors='replace')} (SM{major.value}{minor.value}), {name}"


# --------------------------------------------------------------------------------------- logging
class _Capture:
    """Collects TensorRT's log: errors/warnings for our messages, a few INFO/VERBOSE facts."""

    _KEEP_INFO = ("Total Activation Memory", "Total Weights Memory", "Max Scratch Memory",
                  "Total Host Persistent Memory", "Total Device Persistent Memory",
                  "Engine generation completed", "Failed to open file")

    def __init__(self, verbose: bool):
        self.verbose = verbose
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.info: list[str] = []
        self.layers_text: str | None = None
        self.lock = threading.Lock()

    def handle(self, severity_name: str, msg: str) -> None:
        with self.lock:
            if severity_name in ("INTERNAL_ERROR", "ERROR"):
                self.errors.append(msg)
            elif severity_name == "WARNING":
                self.warnings.append(msg)
            elif msg.startswith("Layers:"):
                self.layers_text = msg
            elif any(k in msg for k in self._KEEP_INFO):
                self.info.append(msg)
        if severity_name in ("INTERNAL_ERROR", "ERROR", "WARNING"):
            log.debug("[TRT] %s %s", severity_name, msg)
        elif self.verbose and (severity_name == "INFO" or log.isEnabledFor(logging.DEBUG)):
            log.debug("[TRT] %s", msg)

    def real_errors(self) -> list[str]:
        """Errors without the 'catchCudaError' echo that follows every failed call on a GPU-less box."""
        errs = [e for e in self.errors if "catchCudaError" not in e]
        return errs or list(self.errors)


def _make_logger(trt: ModuleType, capture: _Capture):
    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):  # noqa: D401 - TensorRT callback
            capture.handle(getattr(severity, "name", str(severity)).split(".")[-1], msg)

    return _Logger()


# ------------------------------------------------------------------------ compute capabilities
def normalize_compute_capabilities(values: list[str] | None, package: str = "tensorrt_rtx") -> list[str]:
    """'SM89', 'sm_89', '89', '8.9', 'current' -> ComputeCapability member names ('SM89', 'CURRENT')."""
    if not values:
        return []
    out = []
    for v in values:
        s = str(v).strip().upper().replace("_", "")
        if s == "CURRENT":
            name = "CURRENT"
        else:
            s = s[2:] if s.startswith("SM") else s
            name = "SM" + s.replace(".", "") if re.fullmatch(r"\d+(\.\d)?", s) else f"?{v}"
        if name != "CURRENT" and name not in RTX_TARGETS:
            raise TrtbuildError(f"compute capability {v!r} is not a {package} target: use one or more of "
                                f"{', '.join(RTX_TARGETS)} (or CURRENT, the GPU of the building machine)")
        if name not in out:
            out.append(name)
    if "CURRENT" in out and len(out) > 1:
        raise TrtbuildError("compute capability CURRENT cannot be combined with other targets")
    return out


# --------------------------------------------------------------------------------- ONNX checks
def _onnx_structure(onnx_path: Path):
    """The graph without its weights (cheap even for a large model with external data)."""
    import onnx

    try:
        return onnx.load(str(onnx_path), load_external_data=False)
    except Exception as e:
        raise TrtbuildError(f"{onnx_path} is not a readable ONNX model: {e}") from e


def _parser_error_message(onnx_path: Path, err, model, capture: _Capture, package: str) -> str:
    node_idx = err.node()
    node_name, op = err.node_name(), err.node_operator()
    if node_idx >= 0 and model is not None and node_idx < len(model.graph.node):
        n = model.graph.node[node_idx]
        node_name = node_name or n.name
        op = op or (f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type)
    desc = err.desc()
    # TensorRT's descriptions end in "<cond>: <message>"; keep the readable tail.
    short = _one_line_reason(desc.split("Assertion failed: ", 1)[-1])
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


def _one_line_reason(desc: str) -> str:
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


def _initializer_dtype(model, name: str) -> str | None:
    import onnx

    if model is None:
        return None
    for t in model.graph.initializer:
        if t.name == name:
            return onnx.TensorProto.DataType.Name(t.data_type)
    return None


def _check_profile(network, profile: Profile, onnx_path: Path) -> list[dict[str, Any]]:
    """Check the profile against the network's inputs before TensorRT sees it; return the inputs."""
    inputs = []
    for i in range(network.num_inputs):
        t = network.get_input(i)
        inputs.append({"name": t.name, "shape": tuple(int(d) for d in t.shape), "dtype": t.dtype.name.lower()})
    names = {t["name"] for t in inputs}
    for k in profile:
        if k not in names:
            raise TrtbuildError(f"{onnx_path}: the optimization profile names input {k!r}, which the network does not "
                                f"have (inputs: {', '.join(sorted(names))})")
    for t in inputs:
        name, shape = t["name"], t["shape"]
        dynamic = any(d < 0 for d in shape)
        if name not in profile:
            if dynamic:
                raise TrtbuildError(f"{onnx_path}: input {name!r} has dynamic shape {shape} but the optimization "
                                    "profile gives no min/opt/max shapes for it")
            continue
        try:
            mn, opt, mx = (tuple(int(d) for d in s) for s in profile[name])
        except (TypeError, ValueError) as e:
            raise TrtbuildError(f"profile for input {name!r} must be (min, opt, max) shapes: {e}") from e
        for label, s in (("min", mn), ("opt", opt), ("max", mx)):
            if len(s) != len(shape):
                raise TrtbuildError(f"profile {label} shape {s} for input {name!r} has rank {len(s)}; the input "
                                    f"has rank {len(shape)} {shape}")
            for axis, (want, got) in enumerate(zip(shape, s)):
                if want >= 0 and got != want:
                    raise TrtbuildError(f"profile {label} shape {s} for input {name!r}: axis {axis} is fixed at {want}")
                if got < 0:
                    raise TrtbuildError(f"profile {label} shape {s} for input {name!r} has a negative dimension")
        if not all(a <= b <= c for a, b, c in zip(mn, opt, mx)):
            raise TrtbuildError(f"profile for input {name!r} must satisfy min <= opt <= max on every axis: "
                                f"min {mn}, opt {opt}, max {mx}")
        vol = int(np.prod(mx, dtype=np.float64))
        if vol > MAX_TENSOR_VOLUME:
            raise TrtbuildError(f"profile too large: input {name!r} max shape {mx} has {vol:.3g} elements, over "
                                f"TensorRT's limit of 2^40; lower max_batch_size / max_seq_len / max_num_tokens")
        t["profile"] = {"min": list(mn), "opt": list(opt), "max": list(mx)}
    return inputs


# ----------------------------------------------------------------------------------- building
def _build_error_message(onnx_path: Path, capture: _Capture, targets: list[str]) -> str:
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
                + _first_line(errs))
    if "Invalid optimization profile" in text or "no optimization profile" in text:
        return f"invalid optimization profile for {onnx_path}: {_first_line(errs)}"
    return f"TensorRT could not build {onnx_path}: {_first_line(errs) or 'no error message'}"


def _first_line(errs: list[str]) -> str:
    if not errs:
        return ""
    e = errs[0].strip().splitlines()[0]
    return e[:600]


class _Progress:
    """IProgressMonitor: optional tqdm bar over the top phase, and Ctrl-C cancels the build cleanly."""

    def __init__(self, trt: ModuleType, show: bool):
        self.cancel = False
        self.bar = None
        self.stderr_fd: int | None = None  # the real stderr while fd 2 is captured
        self._bar_file = None
        outer = self

        class Monitor(trt.IProgressMonitor):
            def __init__(self):
                trt.IProgressMonitor.__init__(self)

            def phase_start(self, phase_name, parent_phase, num_steps):
                if parent_phase is None and show and outer.bar is None:
                    from tqdm import tqdm

                    if outer.stderr_fd is not None:
                        outer._bar_file = os.fdopen(os.dup(outer.stderr_fd), "w")
                    outer.bar = tqdm(total=num_steps, desc="TensorRT build", unit="phase", leave=False,
                                     file=outer._bar_file or sys.stderr)

            def step_complete(self, phase_name, step):
                if outer.bar is not None and phase_name == "Building engine":
                    outer.bar.update(1)
                return not outer.cancel

            def phase_finish(self, phase_name):
                if outer.bar is not None and phase_name == "Building engine":
                    outer.bar.n = outer.bar.total
                    outer.bar.refresh()

        self.monitor = Monitor()

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self._bar_file is not None:
            self._bar_file.close()
            self._bar_file = None


@contextlib.contextmanager
def _cancel_on_sigint(progress: _Progress) -> Iterator[None]:
    """During the native build, Ctrl-C asks TensorRT to stop (via the progress monitor)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        progress.cancel = True

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


@contextlib.contextmanager
def _native_stderr_to_log(enabled: bool) -> Iterator[int | None]:
    """Send what native code prints on fd 2 (Myelin's "Internal Error: ..." lines) to the debug log.

    TensorRT's own messages come through the logger; these prints would only precede our one-line
    error with a raw one. Yields a dup of the real stderr (for a progress bar), or None.
    """
    if not enabled:
        yield None
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield None
        return
    with tempfile.TemporaryFile() as cap:
        os.dup2(cap.fileno(), 2)
        try:
            yield saved
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            cap.seek(0)
            text = cap.read().decode(errors="replace").strip()
            if text:
                log.debug("[TRT native stderr] %s", text)


def build_tensorrt_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, profile: Profile,
                          compute_capabilities: list[str] | None = None, fp16: bool = True,
                          log_verbose: bool = False, *, workspace_bytes: int | None = None,
                          progress: bool = False, label: str | None = None) -> dict[str, Any]:
    """Compile `onnx_path` (external data beside it) into a serialized engine at `engine_path`.

    `profile`: input name -> (min, opt, max) shapes, one optimization profile; every dynamic input
    needs one. `compute_capabilities` (tensorrt_rtx only): targets such as ["SM86", "SM89"]; None is
    TensorRT-RTX's default (SM80 and later, no Turing); "CURRENT" needs a GPU. `fp16`: with the
    datacenter `tensorrt`, allow fp16 kernels for fp32 layers (weakly typed network); tensorrt_rtx is
    strongly typed and ignores it (the ONNX dtypes decide). The engine is written atomically
    (temporary file in the same dir, then renamed); a failure leaves any previous engine untouched.
    `label` names the network in error messages instead of its path (e.g. "rank0 network (fp16)").

    Returns build info (JSON-serialisable): package, version, engine size, times, inputs/outputs,
    network layer types, the engine's layers (from the builder log) and memory figures.
    """
    trt, package = _require_trt()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise TrtbuildError(f"ONNX file {onnx_path} does not exist")
    rtx = _is_rtx(package)
    targets = normalize_compute_capabilities(compute_capabilities, package)
    if targets and not rtx:
        raise TrtbuildError(f"compute_capabilities {compute_capabilities} need tensorrt_rtx; {package} builds for "
                            "the GPU it runs on")
    model = _onnx_structure(onnx_path)
    shown: Any = label or onnx_path

    capture = _Capture(log_verbose)
    logger = _make_logger(trt, capture)
    builder = trt.Builder(logger)
    flags = 0
    strongly_typed = rtx
    if not rtx:
        ndf = trt.NetworkDefinitionCreationFlag
        if hasattr(ndf, "EXPLICIT_BATCH"):  # TensorRT 8; deprecated (and implied) in 10
            flags |= 1 << int(ndf.EXPLICIT_BATCH)
        if not fp16 and hasattr(ndf, "STRONGLY_TYPED"):
            flags |= 1 << int(ndf.STRONGLY_TYPED)
            strongly_typed = True
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)

    t0 = time.time()
    ok = parser.parse_from_file(str(onnx_path))
    parse_s = time.time() - t0
    if not ok:
        msgs = [_parser_error_message(shown, parser.get_error(i), model, capture, package)
                for i in range(parser.num_errors)]
        msgs = list(dict.fromkeys(msgs))  # same message for several nodes of one op: keep order, drop repeats
        extra = f" (and {len(msgs) - 1} more parser errors)" if len(msgs) > 1 else ""
        raise TrtbuildError(msgs[0] + extra if msgs else f"{package} could not parse {shown}: "
                            + _first_line(capture.real_errors()))
    inputs = _check_profile(network, profile, shown)
    outputs = []
    for i in range(network.num_outputs):
        t = network.get_output(i)
        outputs.append({"name": t.name, "shape": [int(d) for d in t.shape], "dtype": t.dtype.name.lower()})
    layer_types = Counter(network.get_layer(i).type.name for i in range(network.num_layers))

    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    fp16_flag = bool(fp16 and not rtx and hasattr(trt.BuilderFlag, "FP16") and not strongly_typed)
    if fp16_flag:
        config.set_flag(trt.BuilderFlag.FP16)
    if targets:
        config.num_compute_capabilities = len(targets)
        for i, name in enumerate(targets):
            if not config.set_compute_capability(getattr(trt.ComputeCapability, name), i):
                raise TrtbuildError(f"{package} refused compute capability {name}: "
                                    + _first_line(capture.real_errors()))
    trt_profile = builder.create_optimization_profile()
    for name, (mn, opt, mx) in profile.items():
        trt_profile.set_shape(name, tuple(mn), tuple(opt), tuple(mx))
    if config.add_optimization_profile(trt_profile) < 0:
        raise TrtbuildError(f"invalid optimization profile for {shown}: {_first_line(capture.real_errors())}")
    prog = _Progress(trt, progress)
    if hasattr(config, "progress_monitor"):
        config.progress_monitor = prog.monitor

    engine_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{engine_path.name}.partial-", dir=engine_path.parent)
    tmp = Path(tmp_name)
    t0 = time.time()
    try:
        with os.fdopen(fd, "wb") as f, _cancel_on_sigint(prog), _native_stderr_to_log(not log_verbose) as err_fd:
            prog.stderr_fd = err_fd
            built = _build_to_file(trt, builder, network, config, f)
            if built:
                f.flush()
                os.fsync(f.fileno())
        build_s = time.time() - t0
        prog.close()
        if prog.cancel:
            raise KeyboardInterrupt
        if not built:
            raise TrtbuildError(_build_error_message(shown, capture, targets))
        too_big = [w for w in capture.warnings if "Volume exceeds limit" in w or "volume exceeds" in w]
        if too_big:
            raise TrtbuildError(f"profile too large for {shown}: {too_big[0].splitlines()[0][:300]} "
                                "— lower max_batch_size / max_seq_len / max_num_tokens")
        with open(tmp, "rb") as f:
            head = f.read(64)
        if rtx and not head.startswith(RTX_MAGIC):
            raise TrtbuildError(f"{package} wrote an engine that does not start with {RTX_MAGIC!r}: {head[:8]!r}")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it 0600; the engine is an ordinary output file
        os.replace(tmp, engine_path)
    except BaseException:
        prog.close()
        tmp.unlink(missing_ok=True)
        raise

    info: dict[str, Any] = {
        "backend": "tensorrt",
        "package": package,
        "version": trt.__version__,
        "onnx_path": str(onnx_path),
        "engine_path": str(engine_path),
        "engine_bytes": engine_path.stat().st_size,
        "parse_seconds": round(parse_s, 3),
        "build_seconds": round(build_s, 3),
        "compute_capabilities": targets or ("default: SM80 and later" if rtx else "the building GPU"),
        "strongly_typed": strongly_typed,
        "fp16_flag": fp16_flag,
        "inputs": [{**t, "shape": list(t["shape"])} for t in inputs],
        "outputs": outputs,
        "network_layers": sum(layer_types.values()),
        "network_layer_types": dict(layer_types),
        "engine_layers": _parse_engine_layers(capture.layers_text),
        "memory": _parse_memory(capture.info),
        "warnings": [w.splitlines()[0][:300] for w in capture.warnings][:20],
    }
    if rtx:
        info["header"] = engine_header_info(engine_path)
    log.info("built %s with %s %s: %.1f MiB in %.1f s", engine_path.name, package, trt.__version__,
             info["engine_bytes"] / 2**20, build_s)
    return info


def _build_to_file(trt: ModuleType, builder, network, config, f) -> bool:
    """Stream the plan to `f` (one copy fewer in memory than build_serialized_network)."""
    if hasattr(builder, "build_serialized_network_to_stream") and hasattr(trt, "IStreamWriter"):
        failure: list[BaseException] = []

        class Writer(trt.IStreamWriter):
            def __init__(self):
                trt.IStreamWriter.__init__(self)

            def write(self, data):
                try:
                    f.write(data)
                    return len(data)
                except BaseException as e:  # disk full etc.: make TensorRT stop, re-raise below
                    failure.append(e)
                    return 0

        ok = builder.build_serialized_network_to_stream(network, config, Writer())
        if failure:
            raise TrtbuildError(f"could not write the engine: {failure[0]}") from failure[0]
        return bool(ok)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        return False
    f.write(memoryview(plan))
    return True


_LAYER_RE = re.compile(r"Name: (?P<name>.*?), LayerType: (?P<type>[^,]*),.*?Metadata: (?P<meta>.*)$")


def _parse_engine_layers(text: str | None) -> list[dict[str, Any]] | None:
    if not text:
        return None
    layers = []
    for line in text.splitlines()[1:]:
        m = _LAYER_RE.search(line)
        if m:
            layers.append({"name": m["name"], "type": m["type"],
                           "onnx_nodes": re.findall(r"\[ONNX Layer: ([^\]]*)\]", m["meta"])})
    return layers


def _parse_memory(lines: list[str]) -> dict[str, int]:
    keys = {"Total Activation Memory": "activation_bytes", "Total Weights Memory": "weights_bytes",
            "Max Scratch Memory": "max_scratch_bytes", "Total Host Persistent Memory": "host_persistent_bytes",
            "Total Device Persistent Memory": "device_persistent_bytes"}
    out = {}
    for line in lines:
        for k, v in keys.items():
            m = re.search(re.escape(k) + r": (\d+) bytes", line)
            if m:
                out[v] = int(m.group(1))
    return out


def engine_header_info(engine_path: str | os.PathLike) -> dict[str, Any]:
    """What built a serialized engine, read from its first 64 bytes (no GPU needed).

    For tensorrt_rtx engines (b"vtrt"): version from bytes 24..27 and targets from the bit set at
    byte 32. This layout was observed with tensorrt_rtx 1.7.1.116, not documented; unknown bits are
    reported as "bit<N>".
    """
    with open(engine_path, "rb") as f:
        head = f.read(64)
    if not head.startswith(RTX_MAGIC):
        return {"magic": head[:4].decode("latin-1"), "package": None}
    version = ".".join(str(b) for b in head[24:28])
    bits = head[32] if len(head) > 32 else 0
    targets = [n for b, n in _RTX_TARGET_BITS.items() if bits & b]
    targets += [f"bit{i}" for i in range(8) if bits & (1 << i) and (1 << i) not in _RTX_TARGET_BITS]
    return {"magic": "vtrt", "package": "tensorrt_rtx", "version": version, "compute_capabilities": targets}


# --------------------------------------------------------------- preparing the network for TensorRT
_FLOAT_TYPES = {"float16": 10, "bfloat16": 16}  # onnx.TensorProto.FLOAT16 / BFLOAT16
_QUANT_INT_TYPES = (3, 2, 22, 21)  # INT8, UINT8, INT4, UINT4
_REBLOCK_SIZES = (128, 64, 32, 16)


def _tensor_values(tensor, base_dir: Path) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(tensor, base_dir=str(base_dir))


def _store_tensor(tensor, values: np.ndarray, data_path: Path) -> None:
    """Replace `tensor`'s contents with `values` (same name), appended to the external data file."""
    from onnx import numpy_helper

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
    with open(data_path, "ab") as f:
        offset = f.tell()
        pad = (-offset) % 4096
        f.write(b"\0" * pad)
        f.write(new.raw_data)
    tensor.data_location = 1  # EXTERNAL
    for k, v in (("location", data_path.name), ("offset", str(offset + pad)), ("length", str(len(new.raw_data)))):
        e = tensor.external_data.add()
        e.key, e.value = k, v


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


def describe_recipe(config, build=None) -> str:
    """One phrase for what is built: "float16", "float16, int4 weight-only W4A16 (symmetric, per-group 64)"."""
    q = config.quantization
    parts = [getattr(build, "compute_dtype", None) or config.dtype]
    if q.quant_algo:
        algo = q.quant_algo
        if algo.startswith("W8A8_SQ"):
            what = f"SmoothQuant {algo}"
        else:
            bits = "int8" if algo.startswith("W8") else "int4"
            kind = {"W4A16_GPTQ": " GPTQ", "W4A16_AWQ": " AWQ"}.get(algo, "")
            grouping = f"per-group {q.group_size}" if q.per_group and q.group_size and q.group_size > 0 \
                else "per-channel"
            zp = "asymmetric" if q.has_zero_point else "symmetric"
            what = f"{bits}{kind} weight-only {algo} ({zp}, {grouping})"
        parts.append(what)
    if q.kv_cache_quant_algo:
        parts.append(f"{q.kv_cache_quant_algo.lower()} KV cache")
    return ", ".join(parts)


def _effective_quant(config, recipe=None):
    """The checkpoint's quantization, or what a trt-build recipe (QuantRecipe) will make of it."""
    from dataclasses import replace

    q = config.quantization
    if recipe is None or getattr(recipe, "is_noop", True):
        return q
    return replace(q, quant_algo=recipe.quant_algo,
                   has_zero_point=bool(recipe.use_weight_only and recipe.has_zero_point),
                   per_group=bool(recipe.per_group), group_size=recipe.group_size if recipe.per_group else -1,
                   kv_cache_quant_algo="INT8" if recipe.int8_kv_cache else q.kv_cache_quant_algo)


def check_tensorrt_recipe(config, build, recipe=None) -> None:
    """Refuse, before any work, what the tensorrt backend cannot compile: one line naming the recipe.

    Built and checked here (tensorrt_rtx 1.7.1.116): float16 (float32 checkpoints are built in
    float16), int8/int4 weight-only symmetric (RTN, GPTQ, AWQ; per channel or per group),
    SmoothQuant W8A8 (per-tensor static and per-token forms), int8 KV cache. Refused: asymmetric
    weight-only (zero points: TensorRT's DequantizeLinear takes only zero zero-points, and has no
    uint4), bfloat16 (the network writer writes it as float32, and TensorRT's Attention has no
    float32 kernel), and per-group sizes that do not divide a linear's inputs (TensorRT needs whole
    blocks).
    """
    import copy

    view = copy.copy(config)
    view.quantization = _effective_quant(config, recipe)
    q = view.quantization
    what = describe_recipe(view, build)

    def refuse(reason: str) -> None:
        raise TrtbuildError(f"--backend tensorrt cannot build {what}: {reason}")

    if getattr(build, "compute_dtype", None) == "bfloat16" or config.dtype == "bfloat16":
        what = what.replace("bfloat16", "a bfloat16 checkpoint", 1)
        refuse("the network is written in float32 for bfloat16 checkpoints and TensorRT's Attention has no float32 "
               "kernel; convert with --dtype float16 (or float32, which is built in float16), or build with "
               "--backend onnxruntime")
    if q.quant_algo and not q.quant_algo.startswith("W8A8") and q.has_zero_point:
        refuse("TensorRT's DequantizeLinear takes only zero zero-points (and has no uint4 weights); quantize "
               "symmetrically (without --has_zero_point), or build with --backend onnxruntime")
    if q.quant_algo and q.per_group and q.group_size and q.group_size > 0:
        sizes = {"hidden_size": config.hidden_size, "attention output (heads * head_size)": config.q_dim,
                 "intermediate_size": config.intermediate_size}
        bad = [f"{k} {v}" for k, v in sizes.items() if v % q.group_size]
        if bad:
            refuse(f"{', '.join(bad)} is not a multiple of group_size {q.group_size} and TensorRT quantizes in whole "
                   "blocks; use a --group_size that divides it, per-channel scales, or --backend onnxruntime")


def check_tensorrt_build(config, build, recipe=None) -> None:
    """Everything the tensorrt backend can refuse before any work: TensorRT installed, the targets
    (--trt_compute_capabilities) and the recipe (check_tensorrt_recipe). One line each."""
    _, package = _require_trt()
    targets = normalize_compute_capabilities(getattr(build, "trt_compute_capabilities", None), package)
    if targets and not _is_rtx(package):
        raise TrtbuildError(f"--trt_compute_capabilities needs tensorrt_rtx; {package} builds for the GPU it runs on")
    check_tensorrt_recipe(config, build, recipe)


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
    model = _onnx_structure(onnx_path)
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


# --------------------------------------------------------------------- engine dir integration
def profile_from_dim_ranges(onnx_path: str | os.PathLike, dim_ranges: dict[str, tuple[int, int, int]]) -> Profile:
    """Build a profile from the ONNX inputs' symbolic dims: {"batch_size": (1, 4, 8), ...}.

    Fixed dims are kept; a symbolic dim with no range (or an unnamed dynamic dim) is an error that
    names the input and the dim.
    """
    onnx_path = Path(onnx_path)
    model = _onnx_structure(onnx_path)
    inits = {t.name for t in model.graph.initializer}
    profile: Profile = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = vi.type.tensor_type.shape.dim
        if not any(d.HasField("dim_param") or not d.HasField("dim_value") for d in dims):
            continue
        mn, opt, mx = [], [], []
        for axis, d in enumerate(dims):
            if d.HasField("dim_value"):
                v = int(d.dim_value)
                mn.append(v), opt.append(v), mx.append(v)
                continue
            if not d.dim_param or d.dim_param not in dim_ranges:
                raise TrtbuildError(f"{onnx_path}: input {vi.name!r} axis {axis} is dynamic "
                                    f"({d.dim_param or 'unnamed'}) and has no min/opt/max range")
            a, b, c = dim_ranges[d.dim_param]
            mn.append(int(a)), opt.append(int(b)), mx.append(int(c))
        profile[vi.name] = (tuple(mn), tuple(opt), tuple(mx))
    return profile


def dim_ranges_for_build(build) -> dict[str, tuple[int, int, int]]:
    """min/opt/max of the decoder network's symbolic dims from a BuildConfig (trtllm-build limits)."""
    def rng(lo: int, hi: int) -> tuple[int, int, int]:
        hi = max(lo, int(hi))
        return lo, max(lo, (hi + 1) // 2), hi

    max_input = int(build.max_input_len)
    if getattr(build, "max_num_tokens", None):
        max_input = min(max_input, int(build.max_num_tokens))
    max_seq = int(build.max_seq_len)
    return {
        "batch_size": rng(1, build.max_batch_size),
        "sequence_length": rng(1, max_input),
        "num_logits": rng(1, max_input),
        "past_sequence_length": rng(0, max_seq - 1),
        "total_sequence_length": rng(1, max_seq),
        "max_sequence_length": (max_seq, max_seq, max_seq),
    }


def build_for_engine_dir(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, config, build,
                         log_verbose: bool = False, progress: bool = False, rank: int = 0) -> dict[str, Any]:
    """The engine-dir step (trtbuild.builder): prepare the network, profile from the limits, build.

    `build.trt_compute_capabilities` (--trt_compute_capabilities, a list of targets) picks the GPUs.
    The ONNX file is rewritten in place into the form TensorRT accepts (prepare_onnx_for_tensorrt),
    so a kept rank{N}.onnx is exactly what TensorRT compiled. Errors name the rank and the recipe.
    Returns the build info of build_tensorrt_engine plus "recipe" and "onnx_rewrites".
    """
    recipe = describe_recipe(config, build) if config is not None else getattr(build, "compute_dtype", "?")
    label = f"rank{rank} network ({recipe})"
    dtype = getattr(build, "compute_dtype", "float16")
    try:
        rewrites = prepare_onnx_for_tensorrt(onnx_path, dtype)
    except TrtbuildError as e:
        raise TrtbuildError(f"{label}: {e}") from None
    for line in rewrites:
        log.info("prepared for TensorRT: %s", line)
    profile = profile_from_dim_ranges(onnx_path, dim_ranges_for_build(build))
    targets = getattr(build, "trt_compute_capabilities", None) or getattr(build, "compute_capabilities", None)
    info = build_tensorrt_engine(onnx_path, engine_path, profile, compute_capabilities=targets,
                                 fp16=dtype != "float32", log_verbose=log_verbose, progress=progress, label=label)
    info["recipe"] = recipe
    info["onnx_rewrites"] = rewrites
    return info


def build_info_for_config(info: dict[str, Any]) -> dict[str, Any]:
    """What an engine dir's config.json records under built_by.tensorrt.rank{N} (no temporary paths,
    the engine's layer list reduced to counts)."""
    keep = ("package", "version", "recipe", "compute_capabilities", "header", "engine_bytes", "parse_seconds",
            "build_seconds", "strongly_typed", "onnx_rewrites", "inputs", "outputs", "network_layers", "memory")
    out = {k: info[k] for k in keep if k in info}
    for key in ("inputs", "outputs"):  # one entry for the 2 x num_layers KV tensors that share a profile
        merged: dict[tuple, dict[str, Any]] = {}
        for t in out.get(key, []):
            pattern = re.sub(r"\.\d+\.", ".{i}.", t["name"])
            sig = (pattern, t["dtype"], json.dumps(t.get("shape")), json.dumps(t.get("profile"), sort_keys=True))
            if sig in merged:
                merged[sig]["count"] = merged[sig].get("count", 1) + 1
            else:
                merged[sig] = dict(t)
        out[key] = [{**t, "name": re.sub(r"\.\d+\.", ".{i}.", t["name"])} if t.get("count") else t
                    for t in merged.values()]
    layers = info.get("engine_layers") or []
    out["engine_layers"] = len(layers)
    out["engine_layer_types"] = dict(Counter(layer["type"] for layer in layers))
    out["warnings"] = len(info.get("warnings") or [])
    return out


def layers_report(engine_path: str | os.PathLike, info: dict[str, Any] | None = None) -> str:
    """For the verbose build log: `polygraphy inspect model ENGINE --show layers`, and the builder's own
    list of the engine's layers (what polygraphy would show; inspecting an engine needs a GPU)."""
    lines = [f"polygraphy inspect model {Path(engine_path).name} --show layers:"]
    try:
        lines += ["  " + ln for ln in polygraphy_inspect_engine(engine_path).splitlines()]
    except TrtbuildError as e:  # polygraphy not installed
        lines.append(f"  {e}")
    layers = (info or {}).get("engine_layers")
    if layers:
        lines.append(f"engine layers from the TensorRT builder ({len(layers)}):")
        for i, layer in enumerate(layers):
            nodes = ", ".join(layer["onnx_nodes"][:4]) + (" ..." if len(layer["onnx_nodes"]) > 4 else "")
            lines.append(f"  [{i}] {layer['type']:<16} {layer['name'][:100]}" + (f"  <- {nodes}" if nodes else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- running
class TensorRTSession:
    """Run a serialized engine with numpy inputs on an NVIDIA GPU.

    Device memory comes from cuda-python (`pip install cuda-python`), else from torch.cuda when
    torch has CUDA (the runtime does not otherwise import torch). Each run's buffers are freed after
    its outputs are copied back. Without a GPU the constructor raises TrtbuildError with one line.
    """

    def __init__(self, engine_path: str | os.PathLike, device: int = 0):
        self.engine_path = Path(engine_path)
        ok, why = can_run_tensorrt()
        if not ok:
            raise TrtbuildError(f"cannot run TensorRT engine {self.engine_path}: {why}; "
                                "use --backend onnxruntime on this machine")
        trt, package = _require_trt()
        if not self.engine_path.is_file():
            raise TrtbuildError(f"engine file {self.engine_path} does not exist")
        head = engine_header_info(self.engine_path)
        if head["package"] == "tensorrt_rtx" and package != "tensorrt_rtx":
            raise TrtbuildError(f"{self.engine_path} was built by tensorrt_rtx {head['version']}, but {package} is "
                                "the TensorRT importable here: pip install tensorrt_rtx")
        if head["package"] == "tensorrt_rtx" and head["version"] != trt.__version__:
            raise TrtbuildError(f"{self.engine_path} was built by tensorrt_rtx {head['version']} and this is "
                                f"{trt.__version__}: rebuild the engine (trt-build) with this version")
        self._trt = trt
        self._capture = _Capture(False)
        self._logger = _make_logger(trt, self._capture)
        self._runtime = trt.Runtime(self._logger)
        self._mem = _DeviceMemory(device)
        self.engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self.engine is None:
            raise TrtbuildError(f"cannot load {self.engine_path}: {_first_line(self._capture.real_errors())} "
                                "(an engine runs only on the GPU targets and TensorRT version it was built for)")
        self.context = self.engine.create_execution_context()
        self.input_names, self.output_names = [], []
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            mode = self.engine.get_tensor_mode(name)
            (self.input_names if mode == trt.TensorIOMode.INPUT else self.output_names).append(name)

    def _np_dtype(self, name: str):
        return np.dtype(self._trt.nptype(self.engine.get_tensor_dtype(name)))

    def run(self, feeds: dict[str, np.ndarray], output_names: list[str] | None = None) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise TrtbuildError(f"missing engine inputs: {', '.join(missing)}")
        keep = []
        for name in self.input_names:
            arr = np.ascontiguousarray(feeds[name], dtype=self._np_dtype(name))
            if not self.context.set_input_shape(name, arr.shape):
                raise TrtbuildError(f"input {name!r} shape {arr.shape} is outside the engine's optimization profile "
                                    f"{self.engine.get_tensor_profile_shape(name, 0)}")
            buf = self._mem.upload(arr)
            keep.append(buf)
            self.context.set_tensor_address(name, self._mem.ptr(buf))
        outs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise TrtbuildError(f"output {name!r} has a data-dependent shape {shape}, not supported here")
            buf = self._mem.empty(shape, self._np_dtype(name))
            outs[name] = (buf, shape)
            self.context.set_tensor_address(name, self._mem.ptr(buf))
        if not self.context.execute_async_v3(self._mem.stream_handle()):
            raise TrtbuildError(f"TensorRT failed to run {self.engine_path}: {_first_line(self._capture.real_errors())}")
        self._mem.synchronize()
        wanted = output_names or self.output_names
        try:
            return {n: self._mem.download(outs[n][0], outs[n][1], self._np_dtype(n)) for n in wanted}
        finally:
            keep.clear()
            outs.clear()
            self._mem.free_all()

    def close(self) -> None:
        self.context = None
        self.engine = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _DeviceMemory:
    """Device buffers and a stream through cuda-python, else torch.cuda."""

    def __init__(self, device: int):
        self.torch = None
        self._allocs: list[int] = []
        try:
            try:
                from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
            except ImportError:
                from cuda import cudart  # type: ignore[no-redef]
        except ImportError:
            cudart = None
        if cudart is None:
            try:
                import torch

                if torch.cuda.is_available():
                    self.torch = torch
                    torch.cuda.set_device(device)
                    self.stream = torch.cuda.Stream()
                    return
            except ImportError:
                pass
            raise TrtbuildError("running a TensorRT engine needs device memory from cuda-python (pip install "
                                "cuda-python) or torch with CUDA")
        self.cudart = cudart
        self._check(cudart.cudaSetDevice(device))
        self.stream = self._check(cudart.cudaStreamCreate())

    def _check(self, result):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            raise TrtbuildError(f"CUDA error {err}")
        return rest[0] if len(rest) == 1 else rest

    def stream_handle(self) -> int:
        if self.torch is not None:
            return self.stream.cuda_stream
        return int(self.stream)

    def upload(self, arr: np.ndarray):
        if self.torch is not None:
            return self.torch.from_numpy(arr.view(np.uint8).reshape(-1) if arr.dtype == np.bool_ else arr).cuda()
        ptr = self._check(self.cudart.cudaMalloc(max(arr.nbytes, 1)))
        self._allocs.append(ptr)
        if arr.nbytes:
            self._check(self.cudart.cudaMemcpy(ptr, arr.ctypes.data, arr.nbytes,
                                               self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice))
        return ptr

    def empty(self, shape, dtype: np.dtype):
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if self.torch is not None:
            return self.torch.empty(max(nbytes, 1), dtype=self.torch.uint8, device="cuda")
        ptr = self._check(self.cudart.cudaMalloc(max(nbytes, 1)))
        self._allocs.append(ptr)
        return ptr

    def ptr(self, buf) -> int:
        return buf.data_ptr() if self.torch is not None else int(buf)

    def synchronize(self) -> None:
        if self.torch is not None:
            self.stream.synchronize()
        else:
            self._check(self.cudart.cudaStreamSynchronize(self.stream))

    def download(self, buf, shape, dtype: np.dtype) -> np.ndarray:
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if self.torch is not None:
            return buf[:nbytes].cpu().numpy().view(dtype).reshape(shape)
        out = np.empty(shape, dtype)
        if nbytes:
            self._check(self.cudart.cudaMemcpy(out.ctypes.data, int(buf), nbytes,
                                               self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost))
        return out

    def free_all(self) -> None:
        """Free this run's buffers (torch's caching allocator takes back its tensors by itself)."""
        if getattr(self, "cudart", None) is not None:
            for p in getattr(self, "_allocs", []):
                self.cudart.cudaFree(p)
        self._allocs = []

    def __del__(self):
        self.free_all()


# ------------------------------------------------------------------------------- polygraphy
def _polygraphy_exe() -> list[str]:
    exe = Path(sys.executable).parent / "polygraphy"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("polygraphy")
    if found:
        return [found]
    raise TrtbuildError("polygraphy is not installed: pip install polygraphy")


def _polygraphy_env(rtx: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("POLYGRAPHY_AUTOINSTALL_DEPS", "0")
    if rtx:
        env["POLYGRAPHY_USE_TENSORRT_RTX"] = "1"
    return env


_SUMMARY_RE = re.compile(r"(PASSED|FAILED|Minimum Required Tolerance|Absolute Difference \| Stats|"
                         r"Relative Difference \| Stats|Difference exceeds|Accuracy Summary|\[!\]|\[E\])")


def polygraphy_compare(onnx_path: str | os.PathLike, inputs: dict[str, np.ndarray],
                       reference_outputs: dict[str, np.ndarray], rtol: float = 1e-3,
                       atol: float = 1e-3, timeout: float = 600,
                       save_dir: str | os.PathLike | None = None,
                       graph_optimization_level: str = "ORT_DISABLE_ALL") -> tuple[bool, str]:
    """Run `polygraphy run ONNX --onnxrt` on `inputs` and compare with `reference_outputs`.

    The reference is saved as a polygraphy RunResults (--load-outputs) and the inputs as a feed
    dict (--load-inputs). polygraphy passes an element when |diff| <= atol OR |diff|/|ref| <= rtol.
    With `save_dir`, inputs.json, reference.json and polygraphy's outputs.json (RunResults.load)
    are kept there; otherwise in a temporary dir. onnxruntime's graph optimizations are off by
    default so that the graph runs as written: ORT_ENABLE_ALL would fuse DequantizeLinear -> MatMul
    into MatMulNBits, which quantizes activations to int8 (measured on SmolLM2 int4: logits 3.0 off
    instead of 0.5), i.e. check onnxruntime's rewrite instead of what TensorRT compiles.
    Returns (passed, summary of polygraphy's verdict lines).
    """
    try:
        from polygraphy.comparator import RunResults
        from polygraphy.comparator.struct import IterationResult
        from polygraphy.json import save_json
    except ImportError as e:
        raise TrtbuildError("polygraphy is not installed: pip install polygraphy") from e
    from polygraphy.logger import G_LOGGER

    exe = _polygraphy_exe()
    # polygraphy matches a lone output with a lone reference whatever their names: check names here.
    graph = _onnx_structure(Path(onnx_path)).graph
    outputs = [o.name for o in graph.output]
    unknown = [k for k in reference_outputs if k not in outputs]
    if unknown or not reference_outputs:
        return False, (f"reference outputs {unknown or '(none)'} are not outputs of {onnx_path} "
                       f"(outputs: {', '.join(outputs)})")
    if save_dir is not None:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
    workdir = contextlib.nullcontext(str(save_dir)) if save_dir is not None else \
        tempfile.TemporaryDirectory(prefix="trtbuild-polygraphy-")
    with workdir as d, G_LOGGER.verbosity(G_LOGGER.WARNING):
        d = Path(d)
        save_json([{k: np.asarray(v) for k, v in inputs.items()}], str(d / "inputs.json"))
        ref = RunResults()
        ref.append(("reference", [IterationResult({k: np.asarray(v) for k, v in reference_outputs.items()},
                                                  runner_name="reference")]))
        ref.save(str(d / "reference.json"))
        cmd = exe + ["run", str(onnx_path), "--onnxrt", "--load-inputs", str(d / "inputs.json"),
                     "--load-outputs", str(d / "reference.json"), "--save-outputs", str(d / "outputs.json"),
                     "--rtol", repr(float(rtol)), "--atol", repr(float(atol)),
                     "--graph-optimization-level", graph_optimization_level]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_polygraphy_env(False))
        except subprocess.TimeoutExpired:
            return False, f"polygraphy run timed out after {timeout:.0f} s"
    text = r.stdout + r.stderr
    lines = [ln.strip() for ln in text.splitlines() if _SUMMARY_RE.search(ln)]
    compared = any("Accuracy Summary" in ln for ln in lines)
    passed = r.returncode == 0 and compared
    if not compared and r.returncode == 0:
        lines.append("polygraphy compared nothing: do the reference output names match the model's outputs?")
    return passed, "\n".join(lines) or text.strip()[-2000:]


def polygraphy_inspect_engine(engine_path: str | os.PathLike, timeout: float = 300) -> str:
    """`polygraphy inspect model ENGINE --show layers`; without a GPU, says so with polygraphy's words.

    Observed here (no GPU): polygraphy deserializes the engine and fails with
    "[!] Could not deserialize engine. See log for details." after
    "IRuntime::deserializeCudaEngine: Error Code 1: Cuda Runtime (... cudaError 35: CUDA driver
    version is insufficient for CUDA runtime version)".
    """
    trt, package = tensorrt_available()
    cmd = _polygraphy_exe() + ["inspect", "model", str(engine_path), "--model-type", "engine", "--show", "layers"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           env=_polygraphy_env(_is_rtx(package) if trt is not None else False))
    except subprocess.TimeoutExpired:
        return f"polygraphy inspect timed out after {timeout:.0f} s"
    text = (r.stdout + r.stderr).strip()
    if r.returncode == 0:
        return text
    said = [ln.strip() for ln in text.splitlines() if ln.lstrip().startswith(("[!]", "[E]"))]
    gpu_ok, why = can_run_tensorrt()
    reason = ("inspecting a TensorRT engine deserializes it, which needs an NVIDIA GPU: " + why) if not gpu_ok \
        else "polygraphy could not inspect the engine"
    return f"{reason}. polygraphy said: " + " | ".join(said or text.splitlines()[-3:])


__all__ = [
    "tensorrt_available", "build_tensorrt_engine", "can_run_tensorrt", "TensorRTSession", "engine_header_info",
    "normalize_compute_capabilities", "profile_from_dim_ranges", "dim_ranges_for_build", "build_for_engine_dir",
    "polygraphy_compare", "polygraphy_inspect_engine", "RTX_TARGETS", "INSTALL_HINT",
    "check_tensorrt_build", "check_tensorrt_recipe", "build_info_for_config", "layers_report", "describe_recipe",
    "prepare_onnx_for_tensorrt",
]
