"""Finding TensorRT: the `tensorrt` or `tensorrt_rtx` package, a CUDA driver and GPU, the targets.

Building needs only the package (tensorrt_rtx compiles ahead of time, without a GPU, for the
targets in RTX_TARGETS); running an engine also needs an NVIDIA driver and GPU (can_run_tensorrt).
"""

from __future__ import annotations

import ctypes
import importlib
import re
from collections.abc import Sequence
from types import ModuleType

from trtbuild.errors import TrtbuildError

INSTALL_HINT = ("pip install tensorrt_rtx (builds ahead of time without a GPU; runs on RTX/consumer GPUs), "
                "or pip install tensorrt on a machine with a datacenter GPU")
RTX_MAGIC = b"vtrt"
# Targets that tensorrt_rtx 1.7 compiles ahead of time (ComputeCapability members, CURRENT aside).
RTX_TARGETS = ("SM75", "SM80", "SM86", "SM89", "SM120", "SM121")

_cached_trt: tuple[ModuleType | None, str] | None = None


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


def require_trt() -> tuple[ModuleType, str]:
    """(module, package name) of the importable TensorRT, else a TrtbuildError saying what to install."""
    trt, name = tensorrt_available()
    if trt is None:
        raise TrtbuildError(f"the tensorrt backend needs TensorRT, which is not installed ({name}): {INSTALL_HINT}")
    return trt, name


def is_rtx(package: str) -> bool:
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


# ------------------------------------------------------------------------ compute capabilities
def normalize_compute_capabilities(values: Sequence[str] | None, package: str = "tensorrt_rtx") -> list[str]:
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
