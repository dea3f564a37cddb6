"""trtbuild's own onnxruntime kernels: C++ sources shipped with the package, compiled for the
machine they run on (-march=native: AVX-512 where there is one, AVX2 otherwise; tiles sized by
the vector width, ort_op.h) on first use and
cached by source, compiler and CPU in `$TRTBUILD_KERNEL_DIR` (default ~/.cache/trtbuild/kernels).

Ops (domain "trtbuild"): CausalPromptAttention (causal_attention.cc), the attention plugin's
context_fmha; PerTokenQuantize and SwiGLUQuantize (per_token_quant.cc), the gemm plugin's
smooth_quant_plugins for W8A8 per token; LmHead (lm_head.cc), a tied float32 lm_head without onnxruntime's
packed copy of the embedding table (lm_head_plugin); WeightOnlyQuantMatMul (weight_only_matmul.cc),
weight-only linears with weights decoded once for every row (weight_only_quant_matmul_plugin); AllReduce and AllGather (collectives.cc), the
collectives of a tensor-parallel rank's engine. An engine that uses them records those plugin flags
(`PluginConfig.uses_kernels`); the runtime then registers the library with its session (`register`).
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import onnxruntime as ort

from trtbuild.errors import TrtbuildError

DOMAIN = "trtbuild"
KERNEL_DIR_ENV = "TRTBUILD_KERNEL_DIR"
SOURCES = ("register.cc", "causal_attention.cc", "generation_attention.cc", "per_token_quant.cc", "collectives.cc",
           "lm_head.cc", "weight_only_matmul.cc")
# head sizes the attention kernels are compiled for (for_head_size in attention_math.h)
FMHA_HEAD_SIZES = (16, 32, 48, 64, 80, 96, 112, 128, 256)
_HERE = Path(__file__).resolve().parent
_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden"]
# What the library is compiled for: "native" (the machine it runs on: what engines use) or "avx2",
# the form an AVX2 machine without AVX-512 gets, which runs on any x86-64 with AVX2: tests run it on
# an AVX-512 machine too, so both forms are checked wherever the suite runs. "native-no-amx" is the
# form of a machine like this one without AMX (tile registers), which tests run on an AMX machine.
ISA_FLAGS = {"native": ["-march=native"], "avx2": ["-mavx2", "-mfma"],
             "native-no-amx": ["-march=native", "-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16"]}
ISA_ENV = "TRTBUILD_KERNEL_ISA"


class KernelUnavailable(TrtbuildError):
    """The kernel library cannot be built here (no C++ compiler, not Linux, a compile error)."""


def default_kernel_dir() -> Path:
    """`$TRTBUILD_KERNEL_DIR` if set, else ~/.cache/trtbuild/kernels."""
    return Path(os.environ.get(KERNEL_DIR_ENV) or Path.home() / ".cache" / "trtbuild" / "kernels")


def find_compiler() -> str | None:
    """$CXX, else g++, else c++ (clang++ is not enough: the kernels use GCC vector extensions)."""
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def cpu_signature() -> str:
    """The CPU model and its feature flags: a library built with -march=native is only for them."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [line for line in lines if line.split(":")[0].strip() in ("model name", "flags", "Features")]
    return "\n".join(sorted(set(keep)))


def _host_flags() -> list[str]:
    """The host's CPU flags (/proc/cpuinfo: what -march=native reads, even in an emulated process)."""
    return next((line for line in cpu_signature().splitlines() if line.startswith("flags")), "").split()


def _process_cpu_features() -> dict[str, bool]:
    """The features this process's CPUID reports (numpy asks the CPU itself, so an emulated CPU such
    as qemu's Haswell shows its own features where /proc/cpuinfo shows the host's)."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:  # numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__
    return dict(__cpu_features__)


def cpu_description() -> str:
    """What a benchmark figure names as its CPU: model name, vector ISA, VNNI and AMX as this process
    sees them, and the cores it may use, e.g. "Intel(R) Xeon(R) Processor (AVX-512, VNNI, AMX; 2 cores)"."""
    signature = cpu_signature().splitlines()
    model = next((line.split(":", 1)[1].strip() for line in signature if line.startswith("model name")),
                 platform.processor() or platform.machine())
    features = _process_cpu_features()
    isa = "AVX-512" if features.get("AVX512F") else "AVX2" if features.get("AVX2") else "no AVX2"
    vnni = "VNNI" if features.get("AVX512VNNI") or features.get("AVXVNNI") else "no VNNI"
    amx = ", AMX" if host_has_amx() else ""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model} ({isa}, {vnni}{amx}; {cores} cores)"


def default_isa() -> str:
    """`$TRTBUILD_KERNEL_ISA` if set, else "native" where this process's CPU has AVX-512 (the compiler's
    -march=native, which reads the host, then matches it) or lacks AVX2, else "avx2": a process on an
    AVX2-only CPU emulated on an AVX-512 host (qemu) must not get the host's instructions."""
    isa = os.environ.get(ISA_ENV)
    if isa:
        if isa not in ISA_FLAGS:
            raise TrtbuildError(f"${ISA_ENV}={isa!r} is not one of {', '.join(ISA_FLAGS)}")
        return isa
    features = _process_cpu_features()
    return "avx2" if features.get("AVX2") and features.get("FMA3") and not features.get("AVX512F") else "native"


def isa_flags(isa: str) -> list[str]:
    """The compiler flags of `isa` (a key of ISA_FLAGS). -march=native is what the compiler sees: the
    host. Where this process sees a CPU without AVX-512 on a host with it (an emulated CPU such as
    qemu's Haswell), the host's instructions would be illegal here, so "native" gets the AVX2 form."""
    if isa not in ISA_FLAGS:
        raise TrtbuildError(f"kernel ISA {isa!r} is not one of {', '.join(ISA_FLAGS)}")
    if isa.startswith("native") and "avx512f" in _host_flags() and not _process_cpu_features().get("AVX512F"):
        return ISA_FLAGS["avx2"]
    return ISA_FLAGS[isa]


def host_has_amx() -> bool:
    """Whether this process's "native" form has AMX (the host's flags, as -march=native reads them,
    where this process sees the host's AVX-512: an emulated AVX2 CPU gets the AVX2 form)."""
    return "amx_int8" in _host_flags() and isa_flags("native") == ISA_FLAGS["native"]


def _missing_sources() -> list[str]:
    """The SOURCES and the headers they #include "..." (here or in include/) that are absent: a
    trtbuild installed without them (pyproject.toml's package-data ships them)."""
    missing, seen, todo = [], set(), list(SOURCES)
    while todo:
        name = todo.pop()
        path = next((d / name for d in (_HERE, _HERE / "include") if (d / name).is_file()), None)
        if path is None:
            missing.append(name)
        elif path not in seen:
            seen.add(path)
            todo += re.findall(r'^\s*#\s*include\s*"([^"]+)"', path.read_text(errors="replace"), re.M)
    return sorted(set(missing))


def library_path(kernel_dir: Path | None = None, isa: str | None = None) -> Path:
    """The kernel library for this machine (`isa`: a key of ISA_FLAGS, default `default_isa()`): built
    on first call (a few seconds), then reused.

    Raises KernelUnavailable (naming what is missing) when it cannot be built here.
    """
    if sys.platform != "linux":
        raise KernelUnavailable(f"trtbuild's kernels are built for Linux only (this is {sys.platform})")
    compiler = find_compiler()
    if compiler is None:
        raise KernelUnavailable("trtbuild's kernels need a C++ compiler: install g++ (apt install g++) or set $CXX")
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise KernelUnavailable(f"the C++ compiler {compiler} does not run ({e})") from None
    missing = _missing_sources()
    if missing:
        raise KernelUnavailable(f"trtbuild's kernel sources are incomplete: {_HERE} lacks {', '.join(missing)}; "
                                "this trtbuild install is broken: reinstall it")
    digest = hashlib.sha256()
    flags = [*_FLAGS, *isa_flags(isa or default_isa())]
    for part in [version, cpu_signature(), " ".join(flags)]:
        digest.update(part.encode())
    for path in sorted([*_HERE.glob("*.cc"), *_HERE.glob("*.h"), *(_HERE / "include").glob("*.h")]):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    kernel_dir = kernel_dir or default_kernel_dir()
    path = kernel_dir / f"libtrtbuild_kernels-{digest.hexdigest()[:16]}.so"
    if path.is_file():
        return path
    kernel_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=".so", dir=kernel_dir)
    os.close(fd)
    try:
        cmd = [compiler, *flags, f"-I{_HERE / 'include'}", *[str(_HERE / s) for s in SOURCES], "-ldl", "-o", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise KernelUnavailable(f"compiling trtbuild's kernels failed ({' '.join(cmd)}):\n{result.stderr[-2000:]}")
        os.replace(tmp, path)  # atomic: a concurrent build of the same key writes the same bytes
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def register(so: ort.SessionOptions, kernel_dir: Path | None = None, isa: str | None = None) -> None:
    """Make the kernels' ops known to sessions created with `so`."""
    so.register_custom_ops_library(str(library_path(kernel_dir, isa)))
