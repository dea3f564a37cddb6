"""A small ONNX graph writer whose weights stream to an external data file.

Initializers never sit in the protobuf: each is appended to `<model>.data` (aligned, so that
onnxruntime can memory-map it) and referenced by offset, so models of any size stay under
protobuf's 2 GB limit and are never held twice in memory while the network is written.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Sequence, TypeVar

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper

OPSET = 23  # Attention, RMSNormalization and RotaryEmbedding are opset 23
MS_OPSET = 1
ALIGN = 4096

NP_TO_ONNX = {
    np.dtype("float32"): TensorProto.FLOAT, np.dtype("float16"): TensorProto.FLOAT16,
    np.dtype("int64"): TensorProto.INT64, np.dtype("int32"): TensorProto.INT32,
    np.dtype("int8"): TensorProto.INT8, np.dtype("uint8"): TensorProto.UINT8, np.dtype("bool"): TensorProto.BOOL,
    np.dtype(ml_dtypes.bfloat16): TensorProto.BFLOAT16,
}
T = TypeVar("T")

ONNX_FLOAT = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}


def append_external_data(tensor: TensorProto, raw: bytes, data_file: BinaryIO, location: str) -> None:
    """Make `raw` the external data of `tensor`: appended to the open `data_file` (named `location`,
    beside the model) at the next ALIGN boundary, so that onnxruntime can memory-map it."""
    offset = data_file.tell()
    pad = (-offset) % ALIGN
    if pad:
        data_file.write(b"\0" * pad)
        offset += pad
    data_file.write(raw)
    tensor.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(len(raw)))):
        entry = tensor.external_data.add()
        entry.key, entry.value = k, v


class GraphBuilder:
    """Collects nodes, graph inputs/outputs and initializers; `save()` writes the model."""

    def __init__(self, model_path: str | os.PathLike, name: str = "trtbuild_decoder",
                 metadata: dict[str, str] | None = None):
        self.model_path = Path(model_path)
        self.metadata = dict(metadata or {})  # the model's metadata_props
        self.data_name = self.model_path.name + ".data"
        self._data = open(self.model_path.parent / self.data_name, "wb")
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.initializers: list[TensorProto] = []
        self._counter: dict[str, int] = {}
        self._consts: dict[tuple, str] = {}
        self._shared: dict[object, object] = {}
        self._weights: dict[str, tuple[int, tuple[int, ...]]] = {}
        self.opsets = {"": OPSET}

    def fresh(self, base: str) -> str:
        n = self._counter.get(base, 0)
        self._counter[base] = n + 1
        return base if n == 0 else f"{base}_{n}"

    # ---- values -------------------------------------------------------------------------------
    def input(self, name: str, elem_type: int, shape: Sequence[int | str | None]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def output(self, name: str, elem_type: int, shape: Sequence[int | str | None]) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def weight(self, name: str, array: np.ndarray) -> str:
        """An initializer stored in the external data file."""
        array = np.asarray(array)
        if self._written(name, NP_TO_ONNX[array.dtype], array.shape):
            return name
        # (np.ascontiguousarray makes a 0-d array 1-d: the shape is taken from the array as given)
        return self.raw_weight(name, np.ascontiguousarray(array).tobytes(), NP_TO_ONNX[array.dtype], array.shape)

    def raw_weight(self, name: str, raw: bytes, data_type: int, dims: Sequence[int]) -> str:
        """An initializer from raw bytes (packed int4/uint4, whose numpy form has no dtype). A name
        already written is reused (both branches of an If read one copy of the layer weights)."""
        if self._written(name, data_type, dims):
            return name
        self._weights[name] = (data_type, tuple(dims))
        t = TensorProto(name=name, data_type=data_type, dims=list(dims))
        append_external_data(t, raw, self._data, self.data_name)
        self.initializers.append(t)
        return name

    def _written(self, name: str, data_type: int, dims: Sequence[int]) -> bool:
        """Whether weight `name` is already in the data file (with this type and shape, or an error)."""
        if name not in self._weights:
            return False
        if self._weights[name] != (data_type, tuple(dims)):
            raise ValueError(f"weight {name} written twice with different types or shapes")
        return True

    def const(self, value, dtype=np.int64) -> str:
        """A small constant (shape vectors, axes, scalars), stored inline and shared."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = self.fresh("const")
            self.initializers.append(onnx.numpy_helper.from_array(arr, name))
            self._consts[key] = name
        return self._consts[key]

    def shared(self, key: object, make: Callable[[], T]) -> T:
        """Values computed once per graph (or If branch) by `make()`, reused by every caller of `key`."""
        if key not in self._shared:
            self._shared[key] = make()
        return self._shared[key]  # type: ignore[return-value]

    # ---- nodes --------------------------------------------------------------------------------
    def op(self, op_type: str, inputs: Sequence[str], num_outputs: int = 1, name: str | None = None,
           domain: str = "", outputs: Sequence[str] | None = None, **attrs) -> str | list[str]:
        """Append a node; returns its output name (or names when num_outputs > 1)."""
        base = self.fresh(name or op_type)
        if outputs is None:
            outputs = [base if num_outputs == 1 else f"{base}/out{i}" for i in range(num_outputs)]
        if domain and domain not in self.opsets:
            self.opsets[domain] = MS_OPSET
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(helper.make_node(op_type, list(inputs), list(outputs), name=base, domain=domain, **attrs))
        return outputs[0] if num_outputs == 1 else list(outputs)

    @contextmanager
    def subgraph(self) -> Iterator[list[onnx.NodeProto]]:
        """Nodes added inside the `with` go to the yielded list (an If branch) instead of the graph;
        weights and constants stay in the outer graph, where the branch reads them."""
        saved = self.nodes, self._shared
        self.nodes, self._shared = [], {}
        try:
            yield self.nodes
        finally:
            self.nodes, self._shared = saved

    def if_op(self, cond: str, branches: Sequence[tuple[list[onnx.NodeProto], Sequence[str]]],
              outputs: Sequence[tuple[str, int, Sequence[int | str]]], name: str) -> list[str]:
        """If(cond) over two (nodes, output names) branches (then, else); `outputs` gives the If's
        output names, element types and shapes, in the branches' output order."""
        graphs = []
        for label, (nodes, names) in zip(("then", "else"), branches):
            infos = [helper.make_tensor_value_info(n, t, list(shape)) for n, (_, t, shape) in zip(names, outputs)]
            graphs.append(helper.make_graph(nodes, f"{name}_{label}", [], infos))
        self.nodes.append(helper.make_node("If", [cond], [o[0] for o in outputs], name=self.fresh(name),
                                           then_branch=graphs[0], else_branch=graphs[1]))
        return [o[0] for o in outputs]

    # ---- output -------------------------------------------------------------------------------
    def save(self) -> Path:
        """Write the model protobuf (weights are already in the data file)."""
        self._data.close()
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        opset_imports = [helper.make_opsetid(d, v) for d, v in self.opsets.items()]
        model = helper.make_model(graph, opset_imports=opset_imports, producer_name="trtbuild")
        model.ir_version = 10
        if self.metadata:
            helper.set_model_props(model, self.metadata)
        onnx.save_model(model, str(self.model_path))
        return self.model_path

    def close(self) -> None:
        if not self._data.closed:
            self._data.close()
