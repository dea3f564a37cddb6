"""The onnxruntime backend: compile the network into an optimized engine file, and open it."""

from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort

from trtbuild.kernels import register

ENGINE_DATA_SUFFIX = ".data"


def compile_engine(onnx_path: Path, engine_path: Path, kernels: bool = False) -> None:
    """Run onnxruntime's graph optimizations once, at build time, and save the result.

    The saved graph (with fusions and constant folding already applied) is what the runtime
    loads, with its weights in `<engine>.data` beside it.
    """
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(engine_path)
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                engine_path.name + ENGINE_DATA_SUFFIX)
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    so.log_severity_level = 3
    if kernels:
        register(so)
    ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])


def default_num_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def open_session(engine_path: Path, num_threads: int | None = None, kernels: bool = False) -> ort.InferenceSession:
    """Load a compiled engine; optimizations were applied at build, so loading is quick. `kernels`:
    the engine uses trtbuild's own ops (its plugin_config.uses_kernels)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.intra_op_num_threads = num_threads or default_num_threads()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    if kernels:
        register(so)
    return ort.InferenceSession(str(engine_path), so, providers=["CPUExecutionProvider"])
