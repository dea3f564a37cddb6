"""Pick, on the CPU an engine runs on, the exact and fast form of its ops (see trtbuild.cpu_forms,
which writes the forms and probes at build).

- int8 GEMMs: rank{N}.engine's u8 x s8 GEMMs where the probe finds them exact (VNNI, AMX), else
  rank{N}.u8u8.engine (AVX2 without VNNI: u8 x s8 saturates there).
- prompt attention: trtbuild's kernel where its probe runs faster than GroupQueryAttention's, timed
  once per machine (CPU, onnxruntime, kernel library, threads) and remembered in the kernel dir.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from trtbuild.engine_io import (POSITION_IDS, PROBE_DIR, PROBE_QKV, PROMPT_ATTENTION_PROBES, SEQLENS_K,
                                TOTAL_SEQUENCE_LENGTH, U8S8_GEMM_PROBE, U8S8_PROBE_EXACT, U8S8_PROBE_INPUT, U8S8_PROBE_K,
                                kv_io_names, u8u8_engine_path)
from trtbuild.errors import TrtbuildError

log = logging.getLogger(__name__)

INT8_GEMM_CHOICES = ("auto", "u8s8", "u8u8")
PROMPT_ATTENTION_CHOICES = ("auto", "kernel", "gqa")
MAX_KEPT_CHOICES = 256  # timings kept in the kernel dir's prompt_attention_choices.json
PROBE_PROMPT_LEN = 512  # the prompt length the attention probes time (at most max_input_len)


@dataclass(frozen=True)
class CpuForms:
    """What an engine runs as on this CPU."""

    engine_path: Path      # rank{N}.engine or rank{N}.u8u8.engine
    int8_gemm: str | None  # "u8s8" / "u8u8" (W8A8 engines), None: no int8 GEMMs
    prompt_kernel: bool | None  # prompt attention engines: the kernel's branch (True) or GQA's; None: no choice


def _session(path: Path, threads: int, kernels: bool = False) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    if kernels:
        from trtbuild.kernels import register

        register(so)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def u8s8_gemm_is_exact(probe: Path) -> bool:
    """Whether onnxruntime's u8 x s8 GEMM is exact on this CPU, by the probe's sum whose product
    pairs overflow int16 (one row: MLAS's GEMV kernel; four: its GEMM kernel)."""
    session = _session(probe, 1)
    return all(float(session.run(None, {U8S8_PROBE_INPUT: np.full((rows, U8S8_PROBE_K), 255, np.uint8)})[0].min())
               == U8S8_PROBE_EXACT
               for rows in (1, 4))


def _choices_file() -> Path:
    from trtbuild.kernels import default_kernel_dir

    return default_kernel_dir() / "prompt_attention_choices.json"


def _time_probe(session: ort.InferenceSession, feeds: dict[str, np.ndarray], runs: int) -> float:
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        best = min(best, time.perf_counter() - start)
    return best


def prompt_kernel_is_faster(engine_dir: Path, threads: int, prompt_len: int, max_seq_len: int) -> bool:
    """Time one layer's prompt attention in both forms (the engine's probes) once per machine;
    True if trtbuild's kernel is faster. The result is kept in the kernel dir, keyed by the probes,
    the CPU, onnxruntime, the kernel library and the thread count."""
    from trtbuild.kernels import cpu_signature, library_path

    probes = {form: engine_dir / PROBE_DIR / name for form, name in PROMPT_ATTENTION_PROBES.items()}
    key = hashlib.sha256()
    for part in (*(p.read_bytes() for p in probes.values()), cpu_signature().encode(), ort.__version__.encode(),
                 library_path().name.encode(), f"{threads} {prompt_len} {max_seq_len}".encode()):
        key.update(part)
    digest = key.hexdigest()[:24]
    path = _choices_file()
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if digest in known:
        return bool(known[digest]["kernel"])
    sessions = {form: _session(p, threads, kernels=form == "kernel") for form, p in probes.items()}
    inputs = {i.name: i for i in sessions["gqa"].get_inputs()}
    shape = inputs[PROBE_QKV].shape
    past_k, past_v = kv_io_names(0)[:2]
    past = inputs[past_k]
    cache_dtype = np.int8 if "int8" in past.type else np.float32
    cache = np.zeros((1, past.shape[1], max_seq_len, past.shape[3]), cache_dtype)  # as the runtime's cache
    feeds = {PROBE_QKV: np.random.default_rng(0).standard_normal((1, prompt_len, shape[2])).astype(np.float32),
             POSITION_IDS: np.arange(prompt_len, dtype=np.int64)[None], past_k: cache, past_v: cache.copy(),
             SEQLENS_K: np.array([prompt_len - 1], np.int32), TOTAL_SEQUENCE_LENGTH: np.array(prompt_len, np.int32)}
    per_form = {form: {n.name: feeds[n.name] for n in s.get_inputs()} for form, s in sessions.items()}
    seconds = {form: float("inf") for form in sessions}
    for _ in range(3):  # alternate, so that a busy moment hits both forms; best of each
        for form, session in sessions.items():
            seconds[form] = min(seconds[form], _time_probe(session, per_form[form], 3))
    kernel = seconds["kernel"] < seconds["gqa"]
    known[digest] = {"kernel": kernel, "kernel_ms": seconds["kernel"] * 1e3, "gqa_ms": seconds["gqa"] * 1e3,
                     "threads": threads, "prompt_len": prompt_len, "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
    for stale in sorted(known, key=lambda d: known[d].get("measured", ""))[:-MAX_KEPT_CHOICES]:
        del known[stale]  # the oldest go: engines rebuilt, onnxruntime upgraded
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".choices-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(known, f, indent=1)
    os.replace(tmp, path)
    log.info("prompt attention on this CPU: %s (kernel %.2f ms, GroupQueryAttention %.2f ms a layer at %d tokens)",
             "trtbuild's kernel" if kernel else "GroupQueryAttention", seconds["kernel"] * 1e3, seconds["gqa"] * 1e3,
             prompt_len)
    return kernel


def choose_forms(engine_dir: Path, engine_path: Path, u8u8_form: bool, prompt_kernel_form: bool, threads: int,
                 max_input_len: int, max_seq_len: int, int8_gemm: str = "auto", prompt_attention: str = "auto") -> CpuForms:
    """The forms rank{N}.engine runs as here. `int8_gemm` / `prompt_attention` force one ("auto":
    measure)."""
    if int8_gemm not in INT8_GEMM_CHOICES:
        raise TrtbuildError(f"int8_gemm {int8_gemm!r} is not one of {', '.join(INT8_GEMM_CHOICES)}")
    if prompt_attention not in PROMPT_ATTENTION_CHOICES:
        raise TrtbuildError(f"prompt_attention {prompt_attention!r} is not one of {', '.join(PROMPT_ATTENTION_CHOICES)}")
    gemm = None
    if u8u8_form:
        gemm = int8_gemm if int8_gemm != "auto" else \
            ("u8s8" if u8s8_gemm_is_exact(engine_dir / PROBE_DIR / U8S8_GEMM_PROBE) else "u8u8")
        if gemm == "u8u8":
            engine_path = u8u8_engine_path(engine_path)
            if not engine_path.is_file():
                raise TrtbuildError(f"{engine_path} not found: the engine dir is incomplete; rebuild it with trt-build")
    kernel = None
    if prompt_kernel_form:
        kernel = prompt_attention == "kernel" if prompt_attention != "auto" else \
            prompt_kernel_is_faster(engine_dir, threads, min(PROBE_PROMPT_LEN, max_input_len), max_seq_len)
    return CpuForms(engine_path, gemm, kernel)
