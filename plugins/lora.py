"""The lora plugin: per-row LoRA adapters over stacked A/B weights that are graph inputs.

For every targeted linear `prefix` (e.g. transformer.layers.3.attention.qkv, see
trtbuild.lora_adapter.lora_layout for which modules share a linear and how q/k/v keep their own
rank slots) the network has two graph inputs

    lora.{prefix}.A   [lora_slots, R, in]    adapter k's A (rank-padded)
    lora.{prefix}.B   [lora_slots, R, out]   adapter k's B transposed (B^T, scale folded in)

and one shared input `lora_task_ids` [batch] int64: row b uses slot lora_task_ids[b], and -1 means
no adapter (the base model). Weights are inputs, not initializers, so that the runtime
(trtbuild.runtime.lora.LoraManager) loads, replaces and drops adapters in a running engine and
binds, each step, only the slots the batch uses: `lora_slots` is a dynamic dim, the bound slots
are a zero-copy view of the manager's stacked arrays, and task ids are relative to that view.
B is stored as B^T per slot so that [K, R, out] reads as one [K*R, out] matrix (a free reshape)
whose product with the masked [tokens, K*R] activations also sums over the slots.

Two lowerings of the same inputs, both standard ONNX ops (equal up to float rounding; tested):

- "masked" (the default): every token against every bound slot, masked per row,
      z = y + ((x @ A_all^T) * onehot(task)) @ B_all^T          A_all [K*R, in], B_all^T [K*R, out]
  two GEMMs per linear whose weights are read once per step for the whole batch. Its cost grows
  with K, the slots the batch uses (1 at batch 1, the distinct adapters in a mixed batch), not with
  the batch: the right trade on CPU, where decode is bound by weight traffic. An empty slot range
  (a batch of base-model rows only) is valid: the GEMMs are empty and cost nothing.
- "gather": each row gathers its own A/B (Gather on the slot axis) and runs batched MatMuls,
      z_b = y_b + (x_b @ A[t_b]^T) @ B[t_b]^T
  cost ∝ batch rows (each row copies its adapter's weights every step); what a GPU grouped-GEMM
  LoRA kernel computes. Kept as the reference lowering.
Measured on SmolLM2-135M, rank 16 on every linear, one thread, CPU time (benchmarks/bench_lora.py):
masked -7% decode tokens/s at batch 1, -11% at batch 8 with 2 adapters; gather -5% and -22%.
(A weights-left variant, B_k @ (A_k @ x^T) with a ReduceSum over slots, cost 35% more than
masked: more small ops, and MLAS's GEMM is no faster with the weights as the left operand.)

There is no fused form in the gemm/attention plugins' sense: onnxruntime has no gather-GEMM
(punica/bgmv-style) kernel, its own LoRA support (RunOptions.add_active_adapter) binds adapter
weights to graph inputs, which is what the LoraManager does here, for one active adapter per run
where this does any mix per row; and its build-time optimizer already fuses what can be fused.
TensorRT would compile either form (the tensorrt backend has no profile for `lora_slots` yet).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from trtbuild.checkpoint import PretrainedConfig
from trtbuild.engine_io import LORA_FORMS, LORA_TASK_IDS, lora_graph_inputs, lora_input_names
from trtbuild.lora_adapter import LoraLinearLayout, lora_layout

if TYPE_CHECKING:
    from trtbuild.onnx_graph import GraphBuilder

LORA_SLOTS_DIM = "lora_slots"
_PREFIX = re.compile(r"^transformer\.layers\.(\d+)\.(.+)$")


@dataclass
class LoraGraphValues:
    """What add_graph_inputs made (values built on first use and shared by all layers live in the
    GraphBuilder, per graph or If branch: GraphBuilder.shared)."""

    task_ids: str
    first_a: str | None = None


@dataclass
class LoraNetworkOptions:
    """The lora plugin as the network writer sees it (trtbuild.network.NetworkOptions.lora)."""

    config: PretrainedConfig
    target_modules: list[str]
    max_rank: int
    dtype: str = "float32"  # compute dtype of the graph (and of the bound A/B arrays)
    form: str = "masked"

    def __post_init__(self) -> None:
        if self.form not in LORA_FORMS:
            raise ValueError(f"lora form {self.form!r} is not one of {LORA_FORMS}")
        self.layout = lora_layout(self.config, self.target_modules, self.max_rank)

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype("float32") if self.dtype == "bfloat16" else np.dtype(self.dtype)

    def add_graph_inputs(self, g: GraphBuilder) -> LoraGraphValues:
        from onnx import TensorProto

        from trtbuild.onnx_graph import NP_TO_ONNX

        elem = NP_TO_ONNX[self.np_dtype]
        values = LoraGraphValues(g.input(LORA_TASK_IDS, TensorProto.INT64, ["batch_size"]))
        for name, (_, shape) in lora_graph_inputs(self.config, self.layout).items():
            g.input(name, elem, [LORA_SLOTS_DIM, *shape])
            values.first_a = values.first_a or name
        return values

    def apply(self, g: GraphBuilder, x: str, y: str, prefix: str, values: LoraGraphValues) -> str:
        """y (the linear `prefix` applied to x, [batch, seq, out]) plus the row's adapter delta."""
        m = _PREFIX.match(prefix)
        if not m or m[2] not in self.layout:
            return y
        lay = self.layout[m[2]]
        a, b = lora_input_names(prefix)
        if self.form == "gather":
            return _gather_form(g, x, y, a, b, values, self.np_dtype, prefix)
        return _masked_form(g, x, y, a, b, lay, values, self.np_dtype, prefix)


def _shared(g: GraphBuilder, key, make):
    return g.shared(("lora", key), make)


def _masked_form(g: GraphBuilder, x: str, y: str, a: str, b: str, lay: LoraLinearLayout, values: LoraGraphValues,
                 dtype: np.dtype, prefix: str) -> str:
    from trtbuild.onnx_graph import NP_TO_ONNX

    def out_shape():  # [batch, seq, -1]
        bs = g.op("Slice", [g.op("Shape", [x]), g.const([0]), g.const([2])])
        return g.op("Concat", [bs, g.const([-1])], axis=0, name="lora/out_shape")

    def onehot():  # [batch * seq, K, 1] in the compute dtype: token t's row uses bound slot k; -1 matches none
        bs = g.op("Slice", [g.op("Shape", [x]), g.const([0]), g.const([2])])
        tok = g.op("Reshape", [g.op("Expand", [g.op("Unsqueeze", [values.task_ids, g.const([1])]), bs]),
                               g.const([-1, 1])], name="lora/token_tasks")
        k = g.op("Slice", [g.op("Shape", [values.first_a]), g.const([0]), g.const([1])])
        slots = g.op("Range", [g.const(0), g.op("Squeeze", [k, g.const([0])]), g.const(1)])
        hot = g.op("Cast", [g.op("Equal", [tok, g.op("Unsqueeze", [slots, g.const([0])])])], to=NP_TO_ONNX[dtype])
        return g.op("Unsqueeze", [hot, g.const([2])], name="lora/onehot")

    def mask(rank: int):  # [batch * seq, K * rank]: the one-hot widened over each slot's rank
        wide = g.op("Expand", [_shared(g, "onehot", onehot), g.const([1, 1, rank])])
        return g.op("Flatten", [wide], axis=1, name=f"lora/mask_r{rank}")

    x2 = _shared(g, ("x2d", x), lambda: g.op("Reshape", [x, g.const([-1, lay.in_features])],
                                                  name=prefix + "/lora/x2d"))  # qkv, and fc with gate, share x
    a2 = g.op("Reshape", [a, g.const([-1, lay.in_features])], name=prefix + "/lora/A2d")  # [K*R, in], a view
    b2 = g.op("Reshape", [b, g.const([-1, lay.out_features])], name=prefix + "/lora/B2d")  # [K*R, out], a view
    xa = g.op("Gemm", [x2, a2], transB=1, name=prefix + "/lora/xA")  # [tokens, K*R]
    xa = g.op("Mul", [xa, _shared(g, ("mask", lay.rank), lambda: mask(lay.rank))], name=prefix + "/lora/select")
    d = g.op("MatMul", [xa, b2], name=prefix + "/lora/xAB")  # [tokens, out]: sums over the slots
    d = g.op("Reshape", [d, _shared(g, "out_shape", out_shape)], name=prefix + "/lora/delta")
    return g.op("Add", [y, d], name=prefix + "/lora/add")


def _gather_form(g: GraphBuilder, x: str, y: str, a: str, b: str, values: LoraGraphValues, dtype: np.dtype,
                 prefix: str) -> str:
    from trtbuild.onnx_graph import NP_TO_ONNX

    def index():  # -1 → slot 0, its contribution zeroed by `valid`
        return g.op("Max", [values.task_ids, g.const(0)], name="lora/index")

    def valid():  # [batch, 1, 1]: 1 for rows with an adapter
        ok = g.op("GreaterOrEqual", [values.task_ids, g.const(0)])
        return g.op("Unsqueeze", [g.op("Cast", [ok], to=NP_TO_ONNX[dtype]), g.const([1, 2])], name="lora/valid")

    idx = _shared(g, "index", index)
    a_sel = g.op("Gather", [a, idx], axis=0, name=prefix + "/lora/A_sel")  # [batch, R, in]
    b_sel = g.op("Gather", [b, idx], axis=0, name=prefix + "/lora/B_sel")  # [batch, R, out]
    xa = g.op("MatMul", [x, g.op("Transpose", [a_sel], perm=[0, 2, 1])], name=prefix + "/lora/xA")  # [batch, seq, R]
    xa = g.op("Mul", [xa, _shared(g, "valid", valid)], name=prefix + "/lora/select")
    return g.op("Add", [y, g.op("MatMul", [xa, b_sel], name=prefix + "/lora/xAB")], name=prefix + "/lora/add")
