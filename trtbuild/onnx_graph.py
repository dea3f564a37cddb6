"""A small ONNX graph writer whose weights stream to an external data file.

Initializers never sit in the protobuf: each is appended to `<model>.data` (aligned, so that
onnxruntime can memory-map it) and referenced by offset, so models of any size stay under
protobuf's 2 GB limit and are never held twice in memory while the network is written.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

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
ONNX_FLOAT = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}


class GraphBuilder:
    """Collects nodes, graph inputs/outputs and initializers; `save()` writes the model."""

    def __init__(self, model_path: str | os.PathLike, name: str = "trtbuild_decoder"):
        self.model_path = Path(model_path)
        self.data_name = self.model_path.name + ".data"
        self._data = open(self.model_path.parent / self.data_name, "wb")
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.initializers: list[TensorProto] = []
        self._counter: dict[str, int] = {}
        self._consts: dict[tuple, str] = {}
        self._shared: dict[str, str] = {}
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
        array = np.ascontiguousarray(array)
        return self.raw_weight(name, array.tobytes(), NP_TO_ONNX[array.dtype], array.shape)

    def raw_weight(self, name: str, raw: bytes, data_type: int, dims: Sequence[int]) -> str:
        """An initializer from raw bytes (packed int4/uint4, whose numpy form has no dtype)."""
        offset = self._data.tell()
        pad = (-offset) % ALIGN
        if pad:
            self._data.write(b"\0" * pad)
            offset += pad
        self._data.write(raw)
        t = TensorProto(name=name, data_type=data_type, dims=list(dims))
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.data_name), ("offset", str(offset)), ("length", str(len(raw)))):
            entry = t.external_data.add()
            entry.key, entry.value = k, v
        self.initializers.append(t)
        return name

    def const(self, value, dtype=np.int64) -> str:
        """A small constant (shape vectors, axes, scalars), stored inline and shared."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = self.fresh("const")
            self.initializers.append(onnx.numpy_helper.from_array(arr, name))
            self._consts[key] = name
        return self._consts[key]

    def shared(self, key: str, make: Callable[[], str]) -> str:
        """A value computed once per graph by `make()` and reused by every caller asking for `key`."""
        if key not in self._shared:
            self._shared[key] = make()
        return self._shared[key]

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

    # ---- output -------------------------------------------------------------------------------
    def save(self) -> Path:
        """Write the model protobuf (weights are already in the data file)."""
        self._data.close()
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        opset_imports = [helper.make_opsetid(d, v) for d, v in self.opsets.items()]
        model = helper.make_model(graph, opset_imports=opset_imports, producer_name="trtbuild")
        model.ir_version = 10
        onnx.save_model(model, str(self.model_path))
        return self.model_path

    def close(self) -> None:
        if not self._data.closed:
            self._data.close()
