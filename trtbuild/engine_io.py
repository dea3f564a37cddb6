"""Names of an engine's inputs, outputs and files that the builder writes and the runtime binds:
one module both sides import (the network writer: trtbuild.network, trtbuild.plugins.attention /
.lora, trtbuild.cpu_forms; the runtime: trtbuild.runtime). It imports nothing at run time, so the
runtime never pulls in onnx or the writer's modules through it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only
    from trtbuild.checkpoint import PretrainedConfig
    from trtbuild.lora_adapter import LoraLinearLayout

# ---- every engine ---------------------------------------------------------------------------
INPUT_IDS = "input_ids"                # [batch, seq] int64, rows right-padded
POSITION_IDS = "position_ids"          # [batch, seq] int64
LOGITS_POSITIONS = "logits_positions"  # [batch, K] int64: the positions whose logits are returned
LOGITS = "logits"                      # output [batch, K, vocab] float32


def kv_io_names(layer: int) -> tuple[str, str, str, str]:
    """(past key, past value, present key, present value) of one layer."""
    return (f"past_key_values.{layer}.key", f"past_key_values.{layer}.value",
            f"present.{layer}.key", f"present.{layer}.value")


# ---- the attention plugin's shared KV buffer (kv_cache_layout "shared_buffer") ----------------
SEQLENS_K = "seqlens_k"                          # [batch] int32: each row's cached tokens after the step, - 1
TOTAL_SEQUENCE_LENGTH = "total_sequence_length"  # [] int32: the longest row's cached tokens after the step
# Prompt attention engines (an If around each layer's attention): the runtime's choice of the
# branch for a prompt into an empty cache: trtbuild's CausalPromptAttention kernel (True) or GroupQueryAttention,
# whichever the probes found faster on the CPU it runs on (trtbuild.runtime.cpu_forms). [] bool.
USE_PROMPT_KERNEL = "use_context_fmha"

# ---- standard attention (kv_cache_layout "concat": present = concat(past, new)) ---------------
ATTENTION_MASK = "attention_mask"  # [batch, past + seq] int64: 1 for the real tokens, cached and new

# ---- the lora plugin (trtbuild.plugins.lora) ------------------------------------------------
LORA_TASK_IDS = "lora_task_ids"  # [batch] int64: each row's adapter slot among the bound ones, -1: none
LORA_FORMS = ("masked", "gather")
# Engine dir: lora/{i}/ holds the adapters given at build (task id i), lora/manifest.json the form
# and where each came from.
LORA_DIR = "lora"
LORA_MANIFEST = "manifest.json"


def lora_input_names(prefix: str) -> tuple[str, str]:
    """Graph input names of a targeted linear's stacked A and B."""
    return f"lora.{prefix}.A", f"lora.{prefix}.B"


def lora_graph_inputs(config: PretrainedConfig, layout: dict[str, LoraLinearLayout]) -> dict[str, tuple[str, tuple]]:
    """name → (linear prefix, per-slot shape) of every A/B graph input, layer by layer."""
    out = {}
    for i in range(config.num_hidden_layers):
        for linear, lay in layout.items():
            prefix = f"transformer.layers.{i}.{linear}"
            a, b = lora_input_names(prefix)
            out[a] = (prefix, (lay.rank, lay.in_features))
            out[b] = (prefix, (lay.rank, lay.out_features))
    return out


# ---- probes: graphs the runtime times or checks on the CPU it runs on, in the engine dir ------
PROBE_DIR = "probes"
U8S8_GEMM_PROBE = "u8s8_gemm.onnx"
PROMPT_ATTENTION_PROBES = {"kernel": "prompt_attention_kernel.onnx", "gqa": "prompt_attention_gqa.onnx"}
U8S8_PROBE_INPUT = "a"  # the u8s8 probe's input [rows, K] uint8
PROBE_QKV = "qkv"       # the attention probes' packed qkv input [1, seq, (H + 2 KV) * D] (beside the
                        # layer 0 KV, position, seqlens_k and total_sequence_length inputs above)
# The u8 x s8 probe: a row of 255 (zero point 128) times a column of 127 over K inputs: each pair of
# products is 64,770, past int16, so a CPU that saturates pairs gives a visibly different sum.
U8S8_PROBE_K = 64
U8S8_PROBE_EXACT = (255 - 128) * 127 * U8S8_PROBE_K


def u8u8_engine_path(engine_path: Path) -> Path:
    """The engine's u8 x u8 form beside rank{N}.engine (W8A8 engines; trtbuild.cpu_forms)."""
    return engine_path.with_name(engine_path.name.removesuffix(".engine") + ".u8u8.engine")


# ---- a tensor-parallel rank's engine (trtbuild.ranks) --------------------------------------------
# [4] int64: the MPI handles of the stage's tensor-parallel communicator, MPI_FLOAT, MPI_SUM and the
# world's communicator (mpi4py's `handle`), fed by the runtime with every call: the engine's
# collectives (AllReduce, AllGather, PipelineSend / PipelineRecv) call MPI with them.
MPI_HANDLES = "mpi_handles"
# [1] float: a pipeline stage before the last sends its hidden states on and returns this (0) in
# place of logits
PIPELINE_SENT = "pipeline_sent"
