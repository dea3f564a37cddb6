"""RoPE variants shared by the network and the torch reference model: LongRoPE (Phi-3: two sets of
rotary frequencies, the short one while a sequence is within `original_max_position_embeddings`
and the long one past it, cos / sin scaled by an attention factor) and the RoPE of sliding-window
layers (Gemma 3: their own base, no scaling)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from trtbuild.checkpoint import PretrainedConfig


def longrope_inv_freq(config: PretrainedConfig, long: bool) -> np.ndarray:
    """Inverse frequencies [rotary_dim / 2] (float32) with the short or the long factors."""
    sc = config.rotary_scaling or {}
    dim = config.rotary_dim or config.head_size
    factors = np.asarray(sc["long_factor" if long else "short_factor"], np.float32)
    shape = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (np.float32(1.0) / (factors * np.float32(config.rotary_base) ** shape)).astype(np.float32)


def longrope_switch(config: PretrainedConfig) -> int | None:
    """LongRoPE's original_max_position_embeddings (None for other RoPE): a token at a position
    from there on is rotated with the long set; a prompt longer than it is rotated as a whole with
    the long set (as one transformers forward does), which no split of it into steps reproduces."""
    sc = config.rotary_scaling or {}
    return int(sc["original_max_position_embeddings"]) if sc.get("type") == "longrope" else None


def longrope_attention_factor(config: PretrainedConfig) -> float:
    """The scale of cos and sin: given, or sqrt(1 + ln(factor) / ln(original max)) as transformers."""
    sc = config.rotary_scaling or {}
    if sc.get("attention_factor") is not None:
        return float(sc["attention_factor"])
    original = sc["original_max_position_embeddings"]
    factor = sc.get("factor") or sc["max_position_embeddings"] / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def local_rope(config: PretrainedConfig) -> PretrainedConfig:
    """The config whose RoPE the sliding-window layers use: rotary_base_local, no scaling."""
    return dataclasses.replace(config, rotary_base=config.rotary_base_local, rotary_scaling=None)
