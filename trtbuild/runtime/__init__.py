"""The runtime: run an engine dir (onnxruntime, numpy and tokenizers only; no torch, transformers,
onnx or network writer: engine I/O names come from trtbuild.engine_io)."""

from trtbuild.runtime.batcher import InflightBatcher, RequestHandle
from trtbuild.runtime.model_runner import GenerationOutput, ModelRunner
from trtbuild.runtime.sampling import SamplingConfig
from trtbuild.tokenizer import load_tokenizer

__all__ = ["InflightBatcher", "RequestHandle", "ModelRunner", "GenerationOutput", "SamplingConfig", "load_tokenizer"]
