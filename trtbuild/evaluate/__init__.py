"""Evaluation: perplexity and summarization (ROUGE) of an engine beside its Hugging Face model.

The engine side needs only the runtime (onnxruntime, numpy, tokenizers); torch and transformers
are imported only when the transformers side is asked for.
"""

from trtbuild.evaluate.nll import token_nll
from trtbuild.evaluate.perplexity import (PerplexityResult, conditional_nll, engine_perplexity, hf_perplexity,
                                          perplexity, read_text, windows)

__all__ = ["PerplexityResult", "conditional_nll", "engine_perplexity", "hf_perplexity", "perplexity",
           "read_text", "token_nll", "windows"]
