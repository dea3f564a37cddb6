"""ModelRunner on a TensorRT engine: the onnxruntime IO-binding surface over TensorRTSession.

`ModelRunner._step` drives its session through onnxruntime's IO binding (`session.io_binding()`,
`bind_cpu_input`, `bind_ortvalue_input`, `bind_output`, `session.run_with_iobinding(io)`,
`io.get_outputs()`), and `ConcatKVCache` keeps each step's present KV as the next step's past.
`TensorRTStepSession` offers exactly that surface over `TensorRTSession` (which runs a serialized
engine on an NVIDIA GPU), so a TensorRT engine - always the standard form: `attention_mask`
input, KV concatenated outside Attention - runs with the same `_step` feeds, generation
(`_generate_static`), sampling, stop words and scoring as the standard-form onnxruntime path.

Kept simple on purpose: every step copies its inputs to the GPU and its outputs (logits and the
present KV) back to host memory, so that ConcatKVCache works unchanged. Correct, not fast: the
next step for speed is to keep the KV on the device between steps.

What is verified without a GPU (tests/test_tensorrt_pipeline.py): the binding plumbing, with an
onnxruntime session over the engine's own ONNX standing in for the GPU session; and the one-line
refusal. Running a real engine needs an NVIDIA GPU, its driver, the TensorRT package that built
the engine (same version) and cuda-python (or torch with CUDA) for device memory.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from trtbuild.errors import TrtbuildError


class _Runs(Protocol):
    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: dict[str, np.ndarray], output_names: list[str] | None = None) -> dict[str, np.ndarray]: ...


class _Binding:
    """What one `_step` bound: host inputs, and the outputs in binding order."""

    def __init__(self) -> None:
        self.inputs: dict[str, np.ndarray] = {}
        self.outputs: list[tuple[str, Any, Any, int | None]] = []  # name, dtype, shape, host pointer
        self.results: list[np.ndarray] = []

    def bind_cpu_input(self, name: str, value: np.ndarray) -> None:
        self.inputs[name] = np.asarray(value)

    def bind_ortvalue_input(self, name: str, value: ort.OrtValue) -> None:
        self.inputs[name] = value.numpy()

    def bind_output(self, name: str, device_type: str = "cpu", device_id: int = 0, element_type: Any = None,
                    shape: Any = None, buffer_ptr: int | None = None) -> None:
        self.outputs.append((name, element_type, shape, buffer_ptr))

    def bind_ortvalue_output(self, name: str, value: ort.OrtValue) -> None:
        raise TrtbuildError("TensorRT engines use the standard attention form (concatenated KV); the shared "
                            "KV buffer of the fused attention plugin is an onnxruntime feature")

    def get_outputs(self) -> list[ort.OrtValue]:
        return [ort.OrtValue.ortvalue_from_numpy(r) for r in self.results]


class TensorRTStepSession:
    """An onnxruntime-session look-alike for ModelRunner, running a TensorRT engine."""

    def __init__(self, inner: _Runs):
        self.inner = inner

    @classmethod
    def open(cls, engine_dir: Path, engine_path: Path, config) -> "TensorRTStepSession":
        """Open rank{N}.engine on GPU 0; without a GPU (or TensorRT), one TrtbuildError line."""
        from trtbuild.backends.tensorrt_backend import TensorRTSession, can_run_tensorrt

        built = (config.built_by.get("tensorrt") or {}).get(engine_path.stem) or {}
        what = f"{built.get('package', 'TensorRT')} {built.get('version', '')}".strip()
        ok, why = can_run_tensorrt()
        if not ok:
            raise TrtbuildError(f"{engine_dir} is a TensorRT engine ({what}) and cannot run here: {why}. It needs an "
                                f"NVIDIA GPU with its driver, {what} and cuda-python; to run on this machine, build "
                                "the checkpoint with trt-build --backend onnxruntime (CPU)")
        if config.kv_cache_layout != "concat":
            raise TrtbuildError(f"{engine_dir}: a TensorRT engine must use the standard attention form; rebuild it "
                                "with trt-build --backend tensorrt")
        return cls(TensorRTSession(engine_path))

    def io_binding(self) -> _Binding:
        return _Binding()

    def run_with_iobinding(self, io: _Binding) -> None:
        wanted = [name for name, *_ in io.outputs]
        results = self.inner.run(io.inputs, wanted)
        io.results = []
        for name, dtype, shape, ptr in io.outputs:
            arr = results[name]
            if ptr is not None:  # the caller's preallocated host buffer (the logits)
                want_shape = tuple(int(d) for d in shape)
                if arr.shape != want_shape:
                    raise TrtbuildError(f"engine output {name!r} has shape {arr.shape}, expected {want_shape}")
                arr = np.ascontiguousarray(arr, dtype=np.dtype(dtype))
                dst = np.frombuffer((ctypes.c_char * arr.nbytes).from_address(ptr), dtype=arr.dtype)
                np.copyto(dst.reshape(arr.shape), arr)
            io.results.append(arr)


__all__ = ["TensorRTStepSession"]
