"""The runtime: run an engine dir (onnxruntime, numpy and tokenizers only)."""

from trtbuild.runtime.batcher import InflightBatcher, RequestHandle
from trtbuild.runtime.model_runner import GenerationOutput, ModelRunner, load_tokenizer
from trtbuild.runtime.sampling import SamplingConfig

__all__ = ["InflightBatcher", "RequestHandle", "ModelRunner", "GenerationOutput", "SamplingConfig", "load_tokenizer"]
