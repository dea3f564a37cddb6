"""ModelRunner on a TensorRT engine: the onnxruntime IO-binding surface over TensorRTSession.

`ModelRunner._step` drives its session through onnxruntime's IO binding (`session.io_binding()`,
`bind_cpu_input`, `bind_ortvalue_input`, `bind_output`, `session.run_with_iobinding(io)`,
`io.get_outputs()`), and `ConcatKVCache` keeps each step's present KV as the next step's past.
`TensorRTStepSession` offers exactly that surface over `TensorRTSession` (below: runs a serialized
engine on an NVIDIA GPU), so a TensorRT engine - always the standard form: `attention_mask`
input, KV concatenated outside Attention - runs with the same `_step` feeds, generation
(`_generate_static`), sampling, stop words and scoring as the standard-form onnxruntime path.

Kept simple on purpose: every step copies its inputs to the GPU and its outputs (logits and the
present KV) back to host memory, so that ConcatKVCache works unchanged. Correct, not fast: the
next step for speed is to keep the KV on the device between steps.

What is verified without a GPU (tests/tensorrt/test_tensorrt_pipeline.py): the binding plumbing, with an
onnxruntime session over the engine's own ONNX standing in for the GPU session; and the one-line
refusal. Running a real engine needs an NVIDIA GPU, its driver, the TensorRT package that built
the engine (same version) and cuda-python (or torch with CUDA) for device memory.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import onnxruntime as ort

from trtbuild.backends.tensorrt.engine_info import engine_header_info
from trtbuild.backends.tensorrt.errors import first_line
from trtbuild.backends.tensorrt.logs import LogCapture, make_logger
from trtbuild.backends.tensorrt.probe import can_run_tensorrt, require_trt
from trtbuild.errors import TrtbuildError

if TYPE_CHECKING:
    from trtbuild.engine import EngineConfig


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
    def open(cls, engine_dir: Path, engine_path: Path, config: EngineConfig) -> "TensorRTStepSession":
        """Open rank{N}.engine on GPU 0; without a GPU (or TensorRT), one TrtbuildError line."""
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


class TensorRTSession:
    """Run a serialized engine with numpy inputs on an NVIDIA GPU.

    Device memory comes from cuda-python (`pip install cuda-python`), else from torch.cuda when
    torch has CUDA (the runtime does not otherwise import torch). Each run's buffers are freed after
    its outputs are copied back. Without a GPU the constructor raises TrtbuildError with one line.
    """

    def __init__(self, engine_path: str | os.PathLike, device: int = 0):
        self.engine_path = Path(engine_path)
        ok, why = can_run_tensorrt()
        if not ok:
            raise TrtbuildError(f"cannot run TensorRT engine {self.engine_path}: {why}; "
                                "use --backend onnxruntime on this machine")
        trt, package = require_trt()
        if not self.engine_path.is_file():
            raise TrtbuildError(f"engine file {self.engine_path} does not exist")
        head = engine_header_info(self.engine_path)
        if head["package"] == "tensorrt_rtx" and package != "tensorrt_rtx":
            raise TrtbuildError(f"{self.engine_path} was built by tensorrt_rtx {head['version']}, but {package} is "
                                "the TensorRT importable here: pip install tensorrt_rtx")
        if head["package"] == "tensorrt_rtx" and head["version"] != trt.__version__:
            raise TrtbuildError(f"{self.engine_path} was built by tensorrt_rtx {head['version']} and this is "
                                f"{trt.__version__}: rebuild the engine (trt-build) with this version")
        self._trt = trt
        self._capture = LogCapture(False)
        self._logger = make_logger(trt, self._capture)
        self._runtime = trt.Runtime(self._logger)
        self._mem = _DeviceMemory(device)
        self.engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self.engine is None:
            raise TrtbuildError(f"cannot load {self.engine_path}: {first_line(self._capture.real_errors())} "
                                "(an engine runs only on the GPU targets and TensorRT version it was built for)")
        self.context = self.engine.create_execution_context()
        self.input_names, self.output_names = [], []
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            mode = self.engine.get_tensor_mode(name)
            (self.input_names if mode == trt.TensorIOMode.INPUT else self.output_names).append(name)

    def _np_dtype(self, name: str):
        return np.dtype(self._trt.nptype(self.engine.get_tensor_dtype(name)))

    def run(self, feeds: dict[str, np.ndarray], output_names: list[str] | None = None) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise TrtbuildError(f"missing engine inputs: {', '.join(missing)}")
        keep = []
        for name in self.input_names:
            arr = np.ascontiguousarray(feeds[name], dtype=self._np_dtype(name))
            if not self.context.set_input_shape(name, arr.shape):
                raise TrtbuildError(f"input {name!r} shape {arr.shape} is outside the engine's optimization profile "
                                    f"{self.engine.get_tensor_profile_shape(name, 0)}")
            buf = self._mem.upload(arr)
            keep.append(buf)
            self.context.set_tensor_address(name, self._mem.ptr(buf))
        outs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise TrtbuildError(f"output {name!r} has a data-dependent shape {shape}, not supported here")
            buf = self._mem.empty(shape, self._np_dtype(name))
            outs[name] = (buf, shape)
            self.context.set_tensor_address(name, self._mem.ptr(buf))
        if not self.context.execute_async_v3(self._mem.stream_handle()):
            raise TrtbuildError(f"TensorRT failed to run {self.engine_path}: {first_line(self._capture.real_errors())}")
        self._mem.synchronize()
        wanted = output_names or self.output_names
        try:
            return {n: self._mem.download(outs[n][0], outs[n][1], self._np_dtype(n)) for n in wanted}
        finally:
            keep.clear()
            outs.clear()
            self._mem.free_all()

    def close(self) -> None:
        self.context = None
        self.engine = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _DeviceMemory:
    """Device buffers and a stream through cuda-python, else torch.cuda."""

    def __init__(self, device: int):
        self.torch = None
        self._allocs: list[int] = []
        try:
            try:
                from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
            except ImportError:
                from cuda import cudart  # type: ignore[no-redef]
        except ImportError:
            cudart = None
        if cudart is None:
            try:
                import torch

                if torch.cuda.is_available():
                    self.torch = torch
                    torch.cuda.set_device(device)
                    self.stream = torch.cuda.Stream()
                    return
            except ImportError:
                pass
            raise TrtbuildError("running a TensorRT engine needs device memory from cuda-python (pip install "
                                "cuda-python) or torch with CUDA")
        self.cudart = cudart
        self._check(cudart.cudaSetDevice(device))
        self.stream = self._check(cudart.cudaStreamCreate())

    def _check(self, result):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            raise TrtbuildError(f"CUDA error {err}")
        return rest[0] if len(rest) == 1 else rest

    def stream_handle(self) -> int:
        if self.torch is not None:
            return self.stream.cuda_stream
        return int(self.stream)

    def upload(self, arr: np.ndarray):
        if self.torch is not None:
            return self.torch.from_numpy(arr.view(np.uint8).reshape(-1) if arr.dtype == np.bool_ else arr).cuda()
        ptr = self._check(self.cudart.cudaMalloc(max(arr.nbytes, 1)))
        self._allocs.append(ptr)
        if arr.nbytes:
            self._check(self.cudart.cudaMemcpy(ptr, arr.ctypes.data, arr.nbytes,
                                               self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice))
        return ptr

    def empty(self, shape, dtype: np.dtype):
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if self.torch is not None:
            return self.torch.empty(max(nbytes, 1), dtype=self.torch.uint8, device="cuda")
        ptr = self._check(self.cudart.cudaMalloc(max(nbytes, 1)))
        self._allocs.append(ptr)
        return ptr

    def ptr(self, buf) -> int:
        return buf.data_ptr() if self.torch is not None else int(buf)

    def synchronize(self) -> None:
        if self.torch is not None:
            self.stream.synchronize()
        else:
            self._check(self.cudart.cudaStreamSynchronize(self.stream))

    def download(self, buf, shape, dtype: np.dtype) -> np.ndarray:
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if self.torch is not None:
            return buf[:nbytes].cpu().numpy().view(dtype).reshape(shape)
        out = np.empty(shape, dtype)
        if nbytes:
            self._check(self.cudart.cudaMemcpy(out.ctypes.data, int(buf), nbytes,
                                               self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost))
        return out

    def free_all(self) -> None:
        """Free this run's buffers (torch's caching allocator takes back its tensors by itself)."""
        if getattr(self, "cudart", None) is not None:
            for p in getattr(self, "_allocs", []):
                self.cudart.cudaFree(p)
        self._allocs = []

    def __del__(self):
        self.free_all()


__all__ = ["TensorRTSession", "TensorRTStepSession"]
