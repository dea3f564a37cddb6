"""Which free slots of the shared KV buffer still hold a finished request's keys and values.

A slot a request left keeps its rows until another request needs the slot; a new prompt that
starts with those tokens copies them instead of computing them again (KV cache reuse). The
entries live within the buffer's own slots (the KV budget), and when a slot is needed its entry
moves to another free slot, evicting the least recently used one, or is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import count
from typing import Callable, Iterable

import numpy as np


@dataclass
class CachedPrefix:
    tokens: list[int]  # what the slot's first len(tokens) positions hold
    last_used: int
    adapter: object = None  # what computed them besides the tokens (a LoRA adapter): reused only alike


def common_prefix(a: list[int], b: list[int]) -> int:
    """The number of leading tokens a and b share."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if differ.size else n


class PrefixCache:
    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self.entries: dict[int, CachedPrefix] = {}
        self._clock = count()

    def slots(self) -> set[int]:
        return set(self.entries)

    def add(self, slot: int, tokens: list[int], adapter: object = None) -> None:
        self.entries[slot] = CachedPrefix(list(tokens), next(self._clock), adapter)

    def used(self, slot: int) -> None:
        if slot in self.entries:
            self.entries[slot].last_used = next(self._clock)

    def longest(self, prompt: list[int], adapter: object = None,
                running: Iterable[tuple[int, list[int]]] = ()) -> tuple[int, int]:
        """(slot, tokens) of the cached entry of the same adapter, or running slot (of the same
        adapter: the caller's to pick), sharing the longest prefix with prompt."""
        best = (-1, 0)
        cached = [(s, e.tokens) for s, e in self.entries.items() if e.adapter == adapter]
        for slot, tokens in [*cached, *running]:
            n = common_prefix(prompt, tokens)
            if n > best[1]:
                best = (slot, n)
        return best

    def take(self, slots: Iterable[int], first_free: int, move: Callable[[int, int, int], None],
             keep: int = -1) -> None:
        """Slots about to hold new requests: an entry there moves to a free slot (from first_free on,
        not among `slots`), evicting the least recently used entry older than itself, or is dropped.
        The entry in slot `keep` (a copy's source) stays where it is."""
        taken = set(slots)
        for slot in sorted(taken):
            entry = self.entries.pop(slot, None)
            if entry is None or slot == keep:
                continue
            spare = [s for s in range(first_free, self.num_slots) if s not in taken and s != keep]
            empty = [s for s in spare if s not in self.entries]
            if empty:
                dst = empty[0]
            else:
                older = [s for s in spare if self.entries[s].last_used < entry.last_used]
                if not older:
                    continue  # every other entry is newer: this one goes
                dst = min(older, key=lambda s: self.entries[s].last_used)
            move(slot, dst, len(entry.tokens))
            self.entries[dst] = entry
