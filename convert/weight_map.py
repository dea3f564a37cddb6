"""HF tensor name → checkpoint tensor name: each family's table lives in its module
(trtbuild.models); this module keeps the names the converter and LoRA reader import."""

from __future__ import annotations

from trtbuild.models.base import WeightRow, rows_for

# HF tensors that carry no weights of the model (buffers saved by old transformers versions).
IGNORED_SUFFIXES = (".rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")

__all__ = ["IGNORED_SUFFIXES", "WeightRow", "rows_for"]
