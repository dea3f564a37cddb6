"""The shared KV buffer grows by copying only what later steps read: the positions each row's
request has cached; rows whose requests left are not copied (their zeros stay untouched memory)."""

from __future__ import annotations

import numpy as np

from trtbuild.runtime.kv_cache import SharedKVCache


def test_growing_copies_only_the_positions_requests_hold():
    cache = SharedKVCache(num_layers=2, max_batch=4, kv_heads=1, max_seq_len=1024, head_size=2, dtype=np.float32)
    assert cache.capacity == SharedKVCache.MIN_CAPACITY
    for k, v in cache.buffers:  # every row written, as earlier requests left them
        k[:], v[:] = 1.0, 2.0
    cache.filled[:] = [5, 3, 7, 9]
    cache.move(3, 1, 9)  # compaction: row 3's request moves into row 1
    cache.release(3)  # rows 3.. are free
    assert cache.filled.tolist() == [5, 9, 7, 0]
    cache.reserve(600)
    assert cache.capacity == 1024
    for k, v in cache.buffers:
        for row, n in enumerate([5, 9, 7, 0]):
            assert (k[row, :, :n] == 1).all() and (v[row, :, :n] == 2).all()
            assert not k[row, :, n:].any() and not v[row, :, n:].any()
