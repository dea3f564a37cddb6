"""The onnxruntime backend: compile the network into an optimized engine file, and open it."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import onnxruntime as ort

from trtbuild.kernels import register

ENGINE_DATA_SUFFIX = ".data"
log = logging.getLogger(__name__)


def compile_engine(onnx_path: Path, engine_path: Path, kernels: bool = False,
                   matmulnbits_accuracy_level: int = 4) -> None:
    """Run onnxruntime's graph optimizations once, at build time, and save the result.

    The saved graph (with fusions and constant folding already applied) is what the runtime
    loads, with its weights in `<engine>.data` beside it. DequantizeLinear → MatMul of weight-only
    weights is fused into MatMulNBits at `matmulnbits_accuracy_level` (4: int8 activations).
    """
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(engine_path)
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                engine_path.name + ENGINE_DATA_SUFFIX)
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(matmulnbits_accuracy_level))
    so.log_severity_level = 3
    if kernels:
        register(so)
    disabled = []
    if _dequantize_in_subgraphs(onnx_path):
        # onnxruntime 1.2x's DequantizeLinear → MatMulNBits fusion looks for the weights in the
        # subgraph only and fails ("Missing required weight"): quantized weights in If branches
        # (standard gemm form beside the attention plugin's prompt branch) stay DQ → MatMul.
        disabled = ["QDQSelectorActionTransformer"]
        log.warning("%s: weight-only GEMMs in the standard form (--gemm_plugin disable) inside the attention "
                    "plugin's prompt branch run unfused (DequantizeLinear per call, slower); the gemm plugin "
                    "runs them fused", onnx_path.name)
    ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)


def _dequantize_in_subgraphs(onnx_path: Path) -> bool:
    """The network has a DequantizeLinear inside an If/Loop branch (weights read from outer scope)."""
    import onnx

    def walk(graph, inside: bool) -> bool:
        for node in graph.node:
            if inside and node.op_type == "DequantizeLinear":
                return True
            if any(a.type == onnx.AttributeProto.GRAPH and walk(a.g, True) for a in node.attribute):
                return True
        return False

    return walk(onnx.load(str(onnx_path), load_external_data=False).graph, False)


def default_num_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def open_session(engine_path: Path, num_threads: int | None = None, kernels: bool = False,
                 spinning: bool = True) -> ort.InferenceSession:
    """Load a compiled engine; optimizations were applied at build, so loading is quick. `kernels`:
    the engine uses trtbuild's own ops (its plugin_config.uses_kernels). `spinning`: onnxruntime's
    intra-op threads spin between kernels (its default, fastest for one session; two sessions taking
    turns, a target and its draft engine, each run ~2x slower while the other's threads spin)."""
    so = ort.SessionOptions()
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.intra_op_num_threads = num_threads or default_num_threads()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    if kernels:
        register(so)
    return ort.InferenceSession(str(engine_path), so, providers=["CPUExecutionProvider"])
