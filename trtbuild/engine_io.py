"""Names of an engine's inputs, outputs and files that the builder writes and the runtime binds:
one module both sides import (it imports nothing, so the runtime never pulls in onnx)."""

from __future__ import annotations

from pathlib import Path

# Prompt attention engines (an If around the layer stack): the runtime's choice of the branch for a
# prompt into an empty cache: trtbuild's CausalPromptAttention kernel (True) or GroupQueryAttention,
# whichever the probes found faster on the CPU it runs on (trtbuild.runtime.cpu_forms).
USE_PROMPT_KERNEL = "use_context_fmha"

# Probe graphs the runtime times or checks on the CPU it runs on, in the engine dir.
PROBE_DIR = "probes"
U8S8_GEMM_PROBE = "u8s8_gemm.onnx"
PROMPT_ATTENTION_PROBES = {"kernel": "prompt_attention_kernel.onnx", "gqa": "prompt_attention_gqa.onnx"}
# The u8 x s8 probe: a row of 255 (zero point 128) times a column of 127 over K inputs: each pair of
# products is 64,770, past int16, so a CPU that saturates pairs gives a visibly different sum.
U8S8_PROBE_K = 64
U8S8_PROBE_EXACT = (255 - 128) * 127 * U8S8_PROBE_K


def kv_io_names(layer: int) -> tuple[str, str, str, str]:
    """(past key, past value, present key, present value) of one layer."""
    return (f"past_key_values.{layer}.key", f"past_key_values.{layer}.value",
            f"present.{layer}.key", f"present.{layer}.value")


def u8u8_engine_path(engine_path: Path) -> Path:
    """The engine's u8 x u8 form beside rank{N}.engine (W8A8 engines; trtbuild.cpu_forms)."""
    return engine_path.with_name(engine_path.name.removesuffix(".engine") + ".u8u8.engine")
