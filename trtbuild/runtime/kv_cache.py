"""KV caches bound to the engine's past/present inputs with IO binding (no per-step copies).

SharedKVCache (attention plugin on): one buffer per layer and K/V, [max_batch, kv_heads, capacity,
head_size], the capacity growing with the longest sequence; a step over slots [start, start + n) runs on an
IOBinding with the same memory bound as past input and present output (the attention op writes new
keys in place), kept per row range so that a decode step only rebinds its small inputs.
ConcatKVCache (standard attention): present = concat(past, new) is produced by the engine and
bound as the next step's past, as TensorRT's one-output Attention requires.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from trtbuild.engine_io import kv_io_names


class SharedKVCache:
    """Per layer, K and V buffers [max_batch, kv_heads, capacity, head_size]. The capacity (positions
    per row) grows on demand, doubling from MIN_CAPACITY up to max_seq_len: onnxruntime's attention
    touches a row's whole capacity, so a buffer of max_seq_len would make every prompt cost the
    memory of the longest sequence the engine allows (8 rows × 2048 positions: 755 MB for the
    default model, against the peers' caches sized to the request)."""

    MIN_CAPACITY = 256

    def __init__(self, num_layers: int, max_batch: int, kv_heads: int, max_seq_len: int, head_size: int,
                 dtype: np.dtype):
        self.num_layers = num_layers
        self.max_seq_len = max_seq_len
        self._row_shape = (max_batch, kv_heads, head_size)
        self._dtype = dtype
        self.capacity = 0
        self.buffers: list[tuple[np.ndarray, np.ndarray]] = []
        # per row range: the IOBinding and the OrtValues (numpy views of the buffers) bound in it
        self._bindings: dict[tuple[int, int], tuple[ort.IOBinding, list[ort.OrtValue]]] = {}
        self.reserve(min(self.MIN_CAPACITY, max_seq_len))

    def reserve(self, positions: int) -> None:
        """Make room for `positions` cached positions per row (keeping what is cached)."""
        if positions <= self.capacity:
            return
        if positions > self.max_seq_len:
            raise ValueError(f"{positions} positions exceed the cache's max_seq_len {self.max_seq_len}")
        capacity = max(self.capacity, min(self.MIN_CAPACITY, self.max_seq_len))
        while capacity < positions:
            capacity = min(2 * capacity, self.max_seq_len)
        batch, heads, head_size = self._row_shape
        shape = (batch, heads, capacity, head_size)
        grown = []
        for old in self.buffers or [None] * self.num_layers:
            pair = (np.zeros(shape, self._dtype), np.zeros(shape, self._dtype))
            if old is not None:
                for new, cached in zip(pair, old):
                    new[:, :, :self.capacity] = cached
            grown.append(pair)
        self.buffers, self.capacity = grown, capacity
        self._bindings.clear()  # they point into the old buffers

    def binding(self, session: ort.InferenceSession, start: int, count: int, positions: int) -> ort.IOBinding:
        """An IOBinding of `session` with rows [start, start + count) of every layer's cache bound as
        past input and present output, with room for `positions` positions a row. Made once per row
        range (and capacity): rebinding 2 × layers tensors every decode step cost ~0.4 ms, 5% of an
        int4 step of the default model."""
        self.reserve(positions)
        key = (start, count)
        if key not in self._bindings:
            io, values = session.io_binding(), []
            for layer, (k, v) in enumerate(self.buffers):
                k_view = ort.OrtValue.ortvalue_from_numpy(k[start:start + count])  # shares the buffer's memory
                v_view = ort.OrtValue.ortvalue_from_numpy(v[start:start + count])
                past_k, past_v, present_k, present_v = kv_io_names(layer)
                io.bind_ortvalue_input(past_k, k_view)
                io.bind_ortvalue_input(past_v, v_view)
                io.bind_ortvalue_output(present_k, k_view)
                io.bind_ortvalue_output(present_v, v_view)
                values += [k_view, v_view]
            self._bindings[key] = (io, values)
        return self._bindings[key][0]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot src's first `length` cached positions into slot dst (compaction)."""
        for k, v in self.buffers:
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]


class ConcatKVCache:
    def __init__(self, num_layers: int, batch: int, kv_heads: int, head_size: int, dtype: np.dtype):
        empty = np.zeros((batch, kv_heads, 0, head_size), dtype)
        self.num_layers = num_layers
        self.past = [(ort.OrtValue.ortvalue_from_numpy(empty), ort.OrtValue.ortvalue_from_numpy(empty))
                     for _ in range(num_layers)]

    def bind(self, io: ort.IOBinding) -> None:
        for layer, (k, v) in enumerate(self.past):
            past_k, past_v, present_k, present_v = kv_io_names(layer)
            io.bind_ortvalue_input(past_k, k)
            io.bind_ortvalue_input(past_v, v)
            io.bind_output(present_k)
            io.bind_output(present_v)

    def update(self, io: ort.IOBinding) -> None:
        """The presents this step produced become the next step's past (no copy)."""
        outputs = io.get_outputs()
        self.past = [(outputs[1 + 2 * i], outputs[2 + 2 * i]) for i in range(self.num_layers)]
