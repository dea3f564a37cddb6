"""Speculative decoding: draft tokens that one engine step then checks together.

A decode step is memory-bound on CPU, so checking a few drafted tokens costs little more than
one (../shared/DESIGN.md, "Speculative decoding"). Two drafters, as TensorRT-LLM names them:

- "prompt_lookup": the tokens that followed the last occurrence of the sequence's final n-gram
  (n from max_matching_ngram_size down to min_matching_ngram_size) in the prompt and the output so
  far; no second model. A match of one token is a poor guess: on summaries of the shared data
  (SmolLM2-135M, 4 drafts) n >= 2 kept 5% more of the speed-up than n >= 1.
- "draft_tokens_external": a smaller engine of the same tokenizer (an int4 engine of the same
  model, or a smaller model of its family) generates them greedily, with a KV cache of its own.

The target engine's step feeds a request's last token and its drafts; the scheduler samples each
position in turn with the request's own sampler and keeps going while the pick equals the draft.
Every kept token is what plain decoding would have picked from the same logits (greedy), or drawn
from the same distribution with the same random numbers (sampling), so the output does not change;
rejected positions are rolled back by the request's length (later steps overwrite them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from trtbuild.engine import DEFAULT_MAX_DRAFT_LEN, SPECULATIVE_MODES
from trtbuild.errors import TrtbuildError

if TYPE_CHECKING:
    from trtbuild.runtime.model_runner import ModelRunner
    from trtbuild.runtime.request import Request


@dataclass
class SpeculativeConfig:
    """What drafts the tokens and how many. `max_batch`: speculate only while at most this many
    requests decode (onnxruntime's attention continues a sequence by several tokens one row per
    call, so each speculating row costs an engine call of its own: worth it at small batches)."""

    mode: str = "prompt_lookup"
    max_draft_len: int = DEFAULT_MAX_DRAFT_LEN  # TensorRT-LLM's prompt_lookup_num_tokens / max_draft_len
    max_matching_ngram_size: int = 3
    max_batch: int = 1
    draft: "ModelRunner | None" = None  # draft_tokens_external: the draft engine's runner
    min_matching_ngram_size: int = 2

    def validate(self, target: "ModelRunner") -> None:
        if self.mode not in SPECULATIVE_MODES:
            raise TrtbuildError(f"speculative_decoding_mode {self.mode!r}: expected one of {', '.join(SPECULATIVE_MODES)}")
        if self.max_draft_len < 1:
            raise TrtbuildError(f"max_draft_len {self.max_draft_len} must be at least 1")
        if not 1 <= self.min_matching_ngram_size <= self.max_matching_ngram_size:
            raise TrtbuildError(f"matching n-gram sizes {self.min_matching_ngram_size}..{self.max_matching_ngram_size}: "
                                "need 1 <= min_matching_ngram_size <= max_matching_ngram_size")
        if self.max_batch < 1:
            raise TrtbuildError(f"speculative max_batch {self.max_batch} must be at least 1")
        if not target.shared_cache:
            raise TrtbuildError(f"{target.engine_dir}: speculative decoding needs the attention plugin's shared KV "
                                "buffer; rebuild with --gpt_attention_plugin auto")
        if self.mode == "draft_tokens_external":
            draft = self.draft
            if draft is None:
                raise TrtbuildError("speculative_decoding_mode draft_tokens_external needs a draft engine "
                                    "(--draft_engine_dir)")
            if target.world is not None or draft.world is not None:
                raise TrtbuildError("a draft engine runs with one-rank engines only; use prompt lookup on ranks")
            if not draft.shared_cache:
                raise TrtbuildError(f"draft engine {draft.engine_dir}: needs the attention plugin's shared KV "
                                    "buffer; rebuild it with --gpt_attention_plugin auto")
            if draft.vocab_size > target.vocab_size:
                raise TrtbuildError(f"draft engine {draft.engine_dir} has a vocabulary of {draft.vocab_size} tokens, "
                                    f"more than the target's {target.vocab_size}: it needs the same tokenizer")
            for name in ("max_batch_size", "max_seq_len"):
                have, need = getattr(draft.config.build_config, name), getattr(target.config.build_config, name)
                if have < need:
                    raise TrtbuildError(f"draft engine {draft.engine_dir} has {name} {have}, below the target "
                                        f"engine's {need}; rebuild it with --{name} {need}")


def prompt_lookup(tokens: list[int], num_tokens: int, max_ngram: int, min_ngram: int = 1) -> list[int]:
    """Up to num_tokens tokens that followed the most recent earlier occurrence of the final n-gram
    of `tokens` (the longest min_ngram <= n <= max_ngram that occurs), or [] when none does."""
    arr = np.asarray(tokens, np.int64)
    for n in range(min(max_ngram, len(tokens) - 1), min_ngram - 1, -1):
        tail = arr[-n:]
        # windows starting at 0 .. len-n-1 (the final n-gram itself excluded)
        windows = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)
        hits = np.flatnonzero((windows == tail).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return [int(t) for t in arr[start:start + num_tokens]]
    return []


class DraftModel:
    """A draft engine's runner whose KV cache rows mirror the target's slots: slot s of its cache
    holds the first `cached[id(request)]` tokens of the request in the target's slot s."""

    def __init__(self, runner: "ModelRunner"):
        self.runner = runner
        self.cached: dict[int, int] = {}  # id(request) → its tokens in the draft cache

    def propose(self, request: "Request", slot: int, num_tokens: int) -> list[int]:
        """Greedy draft of num_tokens tokens after the request's tokens so far."""
        tokens = request.prompt_ids + request.output_ids
        have = min(self.cached.get(id(request), 0), len(tokens) - 1)
        feed = tokens[have:]
        logits = self.runner.extend(feed, slot, have)
        drafts = [int(np.argmax(logits[0, -1]))]
        fed = len(tokens)
        while len(drafts) < num_tokens:
            logits = self.runner.extend([drafts[-1]], slot, fed)
            fed += 1
            drafts.append(int(np.argmax(logits[0, -1])))
        self.cached[id(request)] = fed  # tokens + drafts[:-1]; trimmed to what the target kept by `kept`
        return drafts

    def kept(self, request: "Request", valid: int) -> None:
        """After a verification: the draft cache holds at most the request's first `valid` tokens."""
        if id(request) in self.cached:
            self.cached[id(request)] = min(self.cached[id(request)], valid)

    def move(self, request: "Request", src: int, dst: int) -> None:
        """The target moved the request from slot src to dst: move its draft rows too."""
        n = self.cached.get(id(request), 0)
        if n:
            self.runner.kv_cache.move(src, dst, n)

    def forget(self, request: "Request") -> None:
        self.cached.pop(id(request), None)
