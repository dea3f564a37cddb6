"""In-flight batching over the shared KV buffer: requests join and leave between steps.

Active requests occupy slots [0, n) of the cache. New requests are prefilled together into the
next free slots; finished ones leave and the last active request moves into the hole (only its
filled cache positions are copied), so every decode step runs one contiguous batch.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from trtbuild.runtime.request import Request


class Scheduler:
    def __init__(self, runner):
        self.runner = runner
        self.waiting: deque[Request] = deque()
        self.active: list[Request] = []

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.active)

    def _admit(self) -> None:
        """Prefill as many waiting requests as there are free slots and token budget."""
        bc = self.runner.config.build_config
        budget = bc.max_num_tokens or bc.max_batch_size * bc.max_input_len
        new: list[Request] = []
        while self.waiting and len(self.active) + len(new) < bc.max_batch_size:
            r = self.waiting[0]
            if r.done:  # cancelled while waiting
                self.waiting.popleft()
                self._finish(r)
                continue
            longest = max([len(x.prompt_ids) for x in new] + [len(r.prompt_ids)])
            if new and longest * (len(new) + 1) > budget:
                break
            new.append(self.waiting.popleft())
        if not new:
            return
        start = len(self.active)
        self.active.extend(new)  # before the prefill: a step that fails ends them with the others
        task_ids = np.array([r.lora_task_id for r in new], np.int64)
        logits = self.runner.prefill([r.prompt_ids for r in new], slot_start=start, lora_task_ids=task_ids)
        self.runner.accept(new, logits)

    def _decode(self) -> None:
        active = self.active
        if not active:
            return
        ids = np.array([[r.output_ids[-1]] for r in active], np.int64)
        lengths = np.array([r.num_tokens for r in active], np.int64)
        task_ids = np.array([r.lora_task_id for r in active], np.int64)
        logits = self.runner.step(ids, (lengths - 1)[:, None], np.zeros((len(active), 1), np.int64), lengths,
                                  slot_start=0, lora_task_ids=task_ids)
        self.runner.accept(active, logits)

    def _retire(self) -> None:
        slot = 0
        while slot < len(self.active):
            r = self.active[slot]
            if not r.done:
                slot += 1
                continue
            last = self.active.pop()
            if last is not r:
                # the cache holds every token of `last` except the one it sampled last
                self.runner.kv_cache.move(len(self.active), slot, last.num_tokens - 1)
                self.active[slot] = last
            self._finish(r)
        self.runner.kv_cache.release(len(self.active))

    def _finish(self, r: Request) -> None:
        if r.on_done is not None:
            r.on_done(r)

    def step(self) -> None:
        """Admit waiting requests, run one decode step for the batch, retire finished requests."""
        self._admit()
        self._retire()
        self._decode()
        self._retire()
