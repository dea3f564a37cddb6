"""build_tensorrt_engine: one ONNX file (external data beside it) -> one serialized engine, atomically.

Building needs no GPU with tensorrt_rtx: OnnxParser.parse_from_file -> one optimization profile ->
build_serialized_network_to_stream (streaming the plan to the file: 1 GiB of fp16 weights peaks at
2.4 GiB RSS, 3.3 GiB with build_serialized_network). tensorrt_rtx is strongly typed (the ONNX
dtypes decide the precision); fp16=True matters only for the datacenter `tensorrt`. A profile whose
kMAX volume is over 2^40 elements only warns in TensorRT and still builds: we refuse it. Target
CURRENT and weightless (STRIP_PLAN) engines need a GPU. More in docs/TENSORRT.md.
"""

from __future__ import annotations

import gc
import logging
import os
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, BinaryIO

import numpy as np

from trtbuild.backends.tensorrt.engine_info import engine_header_info, parse_engine_layers, parse_memory
from trtbuild.backends.tensorrt.errors import build_error_message, first_line, parser_error_message
from trtbuild.backends.tensorrt.logs import (BuildProgress, LogCapture, cancel_on_sigint, make_logger,
                                             native_stderr_to_log)
from trtbuild.backends.tensorrt.onnx_rewrite import onnx_structure
from trtbuild.backends.tensorrt.probe import RTX_MAGIC, is_rtx, normalize_compute_capabilities, require_trt
from trtbuild.errors import TrtbuildError

log = logging.getLogger("trtbuild.tensorrt")

Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]
# Per-tensor element limit that TensorRT checks on a profile's kMAX shapes (warning text).
MAX_TENSOR_VOLUME = 1 << 40


def build_tensorrt_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, profile: Profile,
                          compute_capabilities: Sequence[str] | None = None, fp16: bool = True,
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
    trt, package = require_trt()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise TrtbuildError(f"ONNX file {onnx_path} does not exist")
    rtx = is_rtx(package)
    targets = normalize_compute_capabilities(compute_capabilities, package)
    if targets and not rtx:
        raise TrtbuildError(f"compute_capabilities {list(compute_capabilities or ())} need tensorrt_rtx; {package} "
                            "builds for the GPU it runs on")
    model = onnx_structure(onnx_path)
    shown: Any = label or onnx_path

    capture = LogCapture(log_verbose)
    logger = make_logger(trt, capture)
    # Free the TensorRT objects of earlier builds here: a cyclic GC pass that ran inside trt.Builder()
    # would destroy an old IBuilder while TensorRT holds the lock its destructor takes (a hang).
    gc.collect()
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
        msgs = [parser_error_message(shown, parser.get_error(i), model, capture, package)
                for i in range(parser.num_errors)]
        msgs = list(dict.fromkeys(msgs))  # same message for several nodes of one op: keep order, drop repeats
        extra = f" (and {len(msgs) - 1} more parser errors)" if len(msgs) > 1 else ""
        raise TrtbuildError(msgs[0] + extra if msgs else f"{package} could not parse {shown}: "
                            + first_line(capture.real_errors()))
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
                                    + first_line(capture.real_errors()))
    trt_profile = builder.create_optimization_profile()
    for name, (mn, opt, mx) in profile.items():
        trt_profile.set_shape(name, tuple(mn), tuple(opt), tuple(mx))
    if config.add_optimization_profile(trt_profile) < 0:
        raise TrtbuildError(f"invalid optimization profile for {shown}: {first_line(capture.real_errors())}")
    prog = BuildProgress(trt, progress)
    if hasattr(config, "progress_monitor"):
        config.progress_monitor = prog.monitor

    engine_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{engine_path.name}.partial-", dir=engine_path.parent)
    tmp = Path(tmp_name)
    t0 = time.time()
    try:
        with os.fdopen(fd, "wb") as f, cancel_on_sigint(prog), native_stderr_to_log(not log_verbose) as err_fd:
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
            raise TrtbuildError(build_error_message(shown, capture, targets))
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
        "engine_layers": parse_engine_layers(capture.layers_text),
        "memory": parse_memory(capture.info),
        "warnings": [w.splitlines()[0][:300] for w in capture.warnings][:20],
    }
    if rtx:
        info["header"] = engine_header_info(engine_path)
    log.info("built %s with %s %s: %.1f MiB in %.1f s", engine_path.name, package, trt.__version__,
             info["engine_bytes"] / 2**20, build_s)
    return info


def _build_to_file(trt: ModuleType, builder: Any, network: Any, config: Any, f: BinaryIO) -> bool:
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


def _check_profile(network: Any, profile: Profile, onnx_path: Path | str) -> list[dict[str, Any]]:
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
