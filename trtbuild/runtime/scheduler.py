"""In-flight batching over the shared KV buffer: requests join and leave between steps.

Decoding requests occupy slots [0, n) of the cache, so every decode step runs one contiguous batch.
New requests are prefilled together into the next free slots; finished ones leave and the last
decoding request moves into the hole (only its filled cache positions are copied). Beyond that:

- KV cache reuse (`kv_cache_reuse`): a finished request's slot keeps its keys and values while the
  slot is free (trtbuild.runtime.prefix_cache); a new prompt that starts with the tokens of one of
  those, or of a running request, copies those rows and computes only the rest.
- Chunked prefill (`max_num_tokens`): a prompt longer than that, arriving while others decode, is
  prefilled a chunk per step (in the slot after the decoding ones), so their streams go on.
- Speculative decoding (`speculation`, trtbuild.runtime.speculation): while at most
  speculation.max_batch requests decode, each feeds its drafted tokens with its last one and keeps
  those its own sampler confirms.

onnxruntime's attention continues a sequence by several tokens (a chunk, a reused prefix's rest,
drafts) one row per call, so those steps run per request; plain decode steps stay batched.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from trtbuild.rope import longrope_switch
from trtbuild.runtime.prefix_cache import PrefixCache
from trtbuild.runtime.request import Request
from trtbuild.runtime.scheduling import SchedulerConfig
from trtbuild.runtime.speculation import DraftModel, prompt_lookup

MIN_REUSE = 16  # cached tokens worth a copy and a call of their own instead of joining the batched prefill


@dataclass
class _Prefilling:
    """A request whose prompt is being fed a chunk per step."""

    request: Request
    slot: int
    done: int = 0  # prompt tokens in its slot


class Scheduler:
    def __init__(self, runner, config: SchedulerConfig | None = None):
        self.runner = runner
        self.config = config or runner.scheduling or SchedulerConfig()
        bc = runner.config.build_config
        self.chunk = self.config.max_num_tokens or bc.max_num_tokens or bc.max_batch_size * bc.max_input_len
        spec = self.config.speculation
        if spec is not None:
            spec.validate(runner)
        self.draft = DraftModel(spec.draft) if spec is not None and spec.mode == "draft_tokens_external" else None
        self.waiting: deque[Request] = deque()
        self.active: list[Request] = []
        self.prefilling: _Prefilling | None = None  # its slot follows the decoding requests
        self.prefixes = PrefixCache(bc.max_batch_size) if self.config.kv_cache_reuse else None
        # LongRoPE: a prompt longer than this goes in one step (its keys are rotated as a whole)
        self.whole_prompt_past = longrope_switch(runner.config.pretrained_config)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.active or self.prefilling)

    # ---- admission --------------------------------------------------------------------------
    def _first_free(self) -> int:
        return len(self.active) + (self.prefilling is not None)

    def _admit(self) -> None:
        """Take waiting requests into free slots: those that can reuse cached keys and values, or
        whose prompt is longer than a chunk while others decode, one at a time; the rest prefilled
        together, as many as there are free slots and token budget."""
        bc = self.runner.config.build_config
        new: list[Request] = []
        while self.waiting and self.prefilling is None and self._first_free() + len(new) < bc.max_batch_size:
            r = self.waiting[0]
            if r.done:  # cancelled while waiting
                self.waiting.popleft()
                self._finish(r)
                continue
            whole = not self._rotated_by_position(r)
            reuse = (-1, 0) if whole else self._reusable(r)
            long = len(r.prompt_ids) - reuse[1] > self.chunk and bool(self.active or new) and not whole
            if reuse[1] or long:
                if new:
                    break  # first prefill the batch gathered so far
                self.waiting.popleft()
                self._start_alone(r, *reuse)
                continue
            longest = max([len(x.prompt_ids) for x in new] + [len(r.prompt_ids)])
            if new and longest * (len(new) + 1) > self.chunk:
                break
            new.append(self.waiting.popleft())
        if not new:
            return
        start = len(self.active)
        if self.prefixes is not None:
            self.prefixes.take(range(start, start + len(new)), start, self.runner.kv_cache.move)
        self.active.extend(new)  # before the prefill: a step that fails ends them with the others
        task_ids = np.array([r.lora_task_id for r in new], np.int64)
        logits = self.runner.prefill([r.prompt_ids for r in new], slot_start=start, lora_task_ids=task_ids)
        self.runner.accept(new, logits)

    def _reusable(self, r: Request) -> tuple[int, int]:
        """(source slot, tokens) of the longest cached prefix of r's prompt computed with r's adapter
        (at most all but its last token, whose logits are needed); (-1, 0) when none is worth it."""
        if self.prefixes is None:
            return -1, 0
        adapter = self._adapter(r)
        running = [(s, self._valid_tokens(x)) for s, x in enumerate(self.active)
                   if self._adapter(x) == adapter and self._rotated_by_position(x)]
        source, length = self.prefixes.longest(r.prompt_ids, adapter, running)
        length = min(length, len(r.prompt_ids) - 1)
        return (source, length) if length >= MIN_REUSE else (-1, 0)

    def _adapter(self, r: Request) -> object:
        """What besides its tokens makes a request's keys and values: its LoRA adapter's weights."""
        if r.lora_task_id < 0 or self.runner.lora is None:
            return None
        slot = self.runner.lora.slots[r.lora_task_id]
        return None if slot is None else slot.fingerprint

    def _rotated_by_position(self, r: Request) -> bool:
        """Whether r's keys are rotated by position (what feeding its prompt in parts gives): not
        for a LongRoPE prompt past the switch, rotated as a whole with the long set."""
        return self.whole_prompt_past is None or len(r.prompt_ids) <= self.whole_prompt_past

    @staticmethod
    def _valid_tokens(r: Request) -> list[int]:
        """The tokens a decoding request's slot holds: all but the last sampled one."""
        return (r.prompt_ids + r.output_ids)[:r.num_tokens - 1]

    def _start_alone(self, r: Request, source: int, reused: int) -> None:
        """Put r in the first free slot with `reused` tokens copied from slot `source`, then prefill
        the rest: at once, or a chunk per step while others decode."""
        slot = self._first_free()
        if self.prefixes is not None:
            self.prefixes.take([slot], slot, self.runner.kv_cache.move, keep=source)
            self.prefixes.used(source)
        if reused and source != slot:
            self.runner.kv_cache.move(source, slot, reused)
        self.prefilling = _Prefilling(r, slot, reused)
        self._prefill_chunk(whole=not self.active)

    def _prefill_chunk(self, whole: bool = False) -> None:
        """Feed the prefilling request's next chunk (or all of its prompt); on its last, it samples
        its first token and joins the decoding requests."""
        p = self.prefilling
        if p is None:
            return
        r, slot = p.request, p.slot
        if r.done:  # cancelled meanwhile
            self.prefilling = None
            self._finish(r)
            return
        end = len(r.prompt_ids) if whole else min(len(r.prompt_ids), p.done + self.chunk)
        try:
            logits = self.runner.extend(r.prompt_ids[p.done:end], slot, p.done, lora_task_id=r.lora_task_id)
        except Exception:
            self.active.append(r)  # ended with the others by the batcher
            self.prefilling = None
            raise
        p.done = end
        if end == len(r.prompt_ids):
            self.prefilling = None
            self.active.append(r)
            self.runner.accept([r], logits)

    # ---- decoding ---------------------------------------------------------------------------
    def _drafts(self) -> list[list[int]]:
        spec = self.config.speculation
        if spec is None or not 0 < len(self.active) <= spec.max_batch:
            return [[] for _ in self.active]
        max_seq = self.runner.config.build_config.max_seq_len
        drafts = []
        for slot, r in enumerate(self.active):
            room = min(spec.max_draft_len, max_seq - r.num_tokens, r.sampling.max_new_tokens - len(r.output_ids) - 1)
            if room < 1:
                drafts.append([])
            elif self.draft is not None:
                drafts.append(self.draft.propose(r, slot, room))
            else:
                drafts.append(prompt_lookup(r.prompt_ids + r.output_ids, room, spec.max_matching_ngram_size,
                                            spec.min_matching_ngram_size))
        return drafts

    def _decode(self) -> None:
        active = self.active
        if not active:
            return
        drafts = self._drafts()
        plain = [b for b, d in enumerate(drafts) if not d]
        if len(plain) == len(active):
            self._decode_rows(0, len(active))
            return
        for b, draft in enumerate(drafts):  # each drafted row alone; the others in contiguous runs
            if draft:
                r = active[b]
                logits = self.runner.extend([r.output_ids[-1], *draft], b, r.num_tokens - 1, all_logits=True,
                                            lora_task_id=r.lora_task_id)
                self.runner.accept([r], logits, [draft])
                if self.draft is not None:
                    self.draft.kept(r, r.num_tokens - 1)
        runs: list[list[int]] = []
        for b in plain:
            if runs and runs[-1][-1] == b - 1:
                runs[-1].append(b)
            else:
                runs.append([b])
        for run in runs:
            self._decode_rows(run[0], len(run))

    def _decode_rows(self, start: int, count: int) -> None:
        rows = self.active[start:start + count]
        ids = np.array([[r.output_ids[-1]] for r in rows], np.int64)
        lengths = np.array([r.num_tokens for r in rows], np.int64)
        task_ids = np.array([r.lora_task_id for r in rows], np.int64)
        logits = self.runner.step(ids, (lengths - 1)[:, None], np.zeros((count, 1), np.int64), lengths,
                                  slot_start=start, lora_task_ids=task_ids)
        self.runner.accept(rows, logits)

    # ---- leaving ----------------------------------------------------------------------------
    def _retire(self) -> None:
        slot = 0
        while slot < len(self.active):
            r = self.active[slot]
            if not r.done:
                slot += 1
                continue
            last_slot = len(self.active) - 1
            last = self.active.pop()
            # r's rows stay cached in the slot `last` leaves (not while a prompt is fed in the next)
            kept = (self.prefixes is not None and self.prefilling is None and r.num_tokens > 1
                    and self._rotated_by_position(r))
            if last is not r:
                # the cache holds every token of `last` except the one it sampled last
                if kept:
                    self.runner.kv_cache.swap(slot, last_slot, r.num_tokens - 1, last.num_tokens - 1)
                else:
                    self.runner.kv_cache.move(last_slot, slot, last.num_tokens - 1)
                if self.draft is not None:
                    self.draft.move(last, last_slot, slot)
                self.active[slot] = last
            if kept:
                self.prefixes.add(last_slot, self._valid_tokens(r), self._adapter(r))
            self._finish(r)
        p = self.prefilling
        if p is not None and p.slot != len(self.active):  # it follows the decoding requests down
            self.runner.kv_cache.move(p.slot, len(self.active), p.done)
            p.slot = len(self.active)
        first_free = self._first_free()
        # the slots holding cached prefixes are read by later copies
        self.runner.kv_cache.release(first_free, self.prefixes.slots() if self.prefixes is not None else set())

    def _finish(self, r: Request) -> None:
        if self.draft is not None:
            self.draft.forget(r)
        if r.on_done is not None:
            r.on_done(r)

    def step(self) -> None:
        """Admit waiting requests, feed a prompt chunk, run one decode step for the batch, retire
        finished requests."""
        had_prefilling = self.prefilling is not None
        self._admit()
        if had_prefilling:
            self._prefill_chunk()
        self._retire()
        self._decode()
        self._retire()
