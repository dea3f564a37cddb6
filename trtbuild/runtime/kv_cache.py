"""KV caches bound to the engine's past/present inputs with IO binding (no per-step copies).

Both kinds offer the runner (ModelRunner.step) one interface, KVCache: `bind` gives the IOBinding of
a step with the cache and its layout's own inputs bound, `after_run` takes in what the step wrote,
and `for_call` is the cache one generate / score call runs on.

SharedKVCache (attention plugin on): one buffer per layer and K/V, [max_batch, kv_heads, capacity,
head_size], the capacity growing with the longest sequence; a step over slots [start, start + n) runs on an
IOBinding with the same memory bound as past input and present output (the attention op writes new
keys in place), kept per row range so that a decode step only rebinds its small inputs. Its rows
are slots that requests hold across steps: the in-flight batcher (trtbuild.runtime.scheduler).
ConcatKVCache (standard attention): present = concat(past, new) is produced by the engine and
bound as the next step's past, as TensorRT's one-output Attention requires; the rows are one
call's batch (the static loop of ModelRunner.generate).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np
import onnxruntime as ort

from trtbuild.engine_io import ATTENTION_MASK, SEQLENS_K, TOTAL_SEQUENCE_LENGTH, kv_io_names

if TYPE_CHECKING:
    from trtbuild.engine import EngineConfig


class KVCache(Protocol):
    def for_call(self) -> "KVCache":
        """The cache a generate / score call runs on: the shared buffer itself, or a new concatenated
        cache (a call's rows are its own)."""

    def bind(self, session: ort.InferenceSession, slot_start: int, lengths_after: np.ndarray,
             step_len: int) -> ort.IOBinding:
        """An IOBinding of `session` for one step of `step_len` tokens a row over cache rows
        [slot_start, slot_start + len(lengths_after)), after which row b holds lengths_after[b]
        tokens: the past KV inputs, the present KV outputs and the layout's own inputs are bound;
        the caller binds the step's tokens, positions and logits, runs it, then calls after_run."""

    def after_run(self, io: ort.IOBinding) -> None:
        """After session.run_with_iobinding(io): what the step wrote becomes the cache."""


def kv_cache_for(config: EngineConfig, rank: int = 0) -> "SharedKVCache | ConcatKVCache":
    """The KV cache of an engine's rank: the shared buffer (kv_cache_layout "shared_buffer"), or an
    empty concatenated cache, whose for_call gives each call its own."""
    from trtbuild.ranks import rank_config

    pc, bc = rank_config(config.pretrained_config, rank), config.build_config
    dtype = np.int8 if pc.quantization.kv_cache_quant_algo == "INT8" else np.dtype(bc.compute_dtype)
    if config.kv_cache_layout == "shared_buffer":
        return SharedKVCache(pc.num_hidden_layers, bc.max_batch_size, pc.num_key_value_heads, bc.max_seq_len,
                             pc.head_size, dtype)
    return ConcatKVCache(pc.num_hidden_layers, pc.num_key_value_heads, pc.head_size, dtype)


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
        # positions each row holds that a later step reads: growing the buffers copies only those
        # (a row no request uses is free: copying it would make the zeros of both buffers resident)
        self.filled = np.zeros(max_batch, np.int64)
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
        live = [(row, int(n)) for row, n in enumerate(self.filled) if n > 0]
        for old in self.buffers or [None] * self.num_layers:
            pair = (np.zeros(shape, self._dtype), np.zeros(shape, self._dtype))
            if old is not None:
                for new, cached in zip(pair, old):
                    for row, n in live:
                        new[row, :, :n] = cached[row, :, :n]
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

    def for_call(self) -> "SharedKVCache":
        return self  # every call runs on the one buffer; the scheduler hands out its rows

    def bind(self, session: ort.InferenceSession, slot_start: int, lengths_after: np.ndarray,
             step_len: int) -> ort.IOBinding:
        longest = int(lengths_after.max())
        io = self.binding(session, slot_start, len(lengths_after), longest)
        self.filled[slot_start:slot_start + len(lengths_after)] = lengths_after
        io.bind_cpu_input(SEQLENS_K, (lengths_after - 1).astype(np.int32))
        io.bind_cpu_input(TOTAL_SEQUENCE_LENGTH, np.array(longest, np.int32))
        return io

    def after_run(self, io: ort.IOBinding) -> None:
        pass  # the attention op wrote the step's keys and values into the buffers

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot src's first `length` cached positions into slot dst (compaction)."""
        for k, v in self.buffers:
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]
        self.filled[dst] = length

    def swap(self, a: int, b: int, length_a: int, length_b: int) -> None:
        """Exchange slots a and b (their first length_a / length_b cached positions)."""
        n = max(length_a, length_b)
        for k, v in self.buffers:
            k[[a, b], :, :n] = k[[b, a], :, :n]
            v[[a, b], :, :n] = v[[b, a], :, :n]
        self.filled[a], self.filled[b] = length_b, length_a

    def release(self, first_free: int, keep: set[int] = frozenset()) -> None:
        """Rows from first_free on hold nothing a later step reads (their requests left), except
        the slots in `keep` (cached prefixes)."""
        for row in range(first_free, len(self.filled)):
            if row not in keep:
                self.filled[row] = 0


class ConcatKVCache:
    """Per layer, the present K and V [batch, kv_heads, cached, head_size] the last step returned,
    bound as the next step's past, and attention_mask [batch, cached]: 1 for a row's real tokens (a
    right-padded prompt leaves padding between its last token and the ones generated after it).
    Empty until its first step, whose rows make its batch."""

    def __init__(self, num_layers: int, kv_heads: int, head_size: int, dtype: np.dtype):
        self.num_layers = num_layers
        self._row_shape = (kv_heads, head_size)
        self._dtype = dtype
        self.past: list[tuple[ort.OrtValue, ort.OrtValue]] = []
        self.mask = np.zeros((0, 0), np.int64)
        self._bound_mask = self.mask  # the mask of the step bound last, the cache's once it has run

    def for_call(self) -> "ConcatKVCache":
        return ConcatKVCache(self.num_layers, *self._row_shape, self._dtype)

    def bind(self, session: ort.InferenceSession, slot_start: int, lengths_after: np.ndarray,
             step_len: int) -> ort.IOBinding:
        if slot_start != 0:
            raise ValueError(f"a concatenated KV cache holds one call's rows: slot_start {slot_start} must be 0")
        batch = len(lengths_after)
        if not self.past:
            empty = np.zeros((batch, self._row_shape[0], 0, self._row_shape[1]), self._dtype)
            self.past = [(ort.OrtValue.ortvalue_from_numpy(empty), ort.OrtValue.ortvalue_from_numpy(empty))
                         for _ in range(self.num_layers)]
            self.mask = np.zeros((batch, 0), np.int64)
        new = np.asarray(lengths_after, np.int64) - self.mask.sum(axis=1)  # each row's real tokens of the step
        self._bound_mask = np.concatenate(
            [self.mask, (np.arange(step_len)[None, :] < new[:, None]).astype(np.int64)], axis=1)
        io = session.io_binding()
        for layer, (k, v) in enumerate(self.past):
            past_k, past_v, present_k, present_v = kv_io_names(layer)
            io.bind_ortvalue_input(past_k, k)
            io.bind_ortvalue_input(past_v, v)
            io.bind_output(present_k)  # outputs 2 * layer and 2 * layer + 1 (see after_run)
            io.bind_output(present_v)
        io.bind_cpu_input(ATTENTION_MASK, self._bound_mask)
        return io

    def after_run(self, io: ort.IOBinding) -> None:
        """The presents this step produced become the next step's past (no copy)."""
        outputs = io.get_outputs()
        self.past = [(outputs[2 * i], outputs[2 * i + 1]) for i in range(self.num_layers)]
        self.mask = self._bound_mask
