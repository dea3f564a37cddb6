"""trtbuild: a TensorRT-LLM-style engine build pipeline for Hugging Face causal LMs."""

from trtbuild.version import __version__

__all__ = ["__version__"]
