"""Negative log-likelihood of target tokens from logits, in float64 (numerically stable)."""

from __future__ import annotations

import numpy as np

_CHUNK = 256  # positions per float64 block: bounds memory to CHUNK x vocab x 8 bytes


def token_nll(logits: np.ndarray, targets: np.ndarray | list[int]) -> np.ndarray:
    """-log softmax(logits[i])[targets[i]] for each position i, in float64.

    logits: [N, vocab] (any float dtype); targets: [N] token ids. The log-sum-exp subtracts each
    row's max before exponentiating, so large logits neither overflow nor lose precision.
    """
    targets = np.asarray(targets, dtype=np.int64)
    if logits.ndim != 2 or logits.shape[0] != targets.shape[0]:
        raise ValueError(f"logits {logits.shape} and targets {targets.shape} do not line up")
    if targets.size and (targets.min() < 0 or targets.max() >= logits.shape[1]):
        raise ValueError(f"target ids outside the vocabulary (0..{logits.shape[1] - 1})")
    out = np.empty(targets.shape[0], np.float64)
    for start in range(0, targets.shape[0], _CHUNK):
        x = logits[start:start + _CHUNK].astype(np.float64)
        t = targets[start:start + _CHUNK]
        m = x.max(axis=-1)
        lse = m + np.log(np.exp(x - m[:, None]).sum(axis=-1))
        out[start:start + _CHUNK] = lse - x[np.arange(t.shape[0]), t]
    return out
