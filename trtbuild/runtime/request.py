"""One generation request's state: its tokens, its sampler, and when it is finished."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from trtbuild.runtime.sampling import Sampler, SamplingConfig, TokenLogprob, token_logprob


@dataclass
class Request:
    prompt_ids: list[int]
    sampling: SamplingConfig
    lora_task_id: int = -1
    on_tokens: Callable[["Request", list[int]], None] | None = None  # streaming: called per step
    on_done: Callable[["Request"], None] | None = None  # called once the request leaves the batch
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprob] = field(default_factory=list)  # per output token, when sampling.logprobs is set
    finish_reason: str | None = None  # "end_id" | "stop_words" | "length" | "cancelled"
    sampler: Sampler | None = None
    request_id: int = -1  # a multi-rank engine's batcher: the same request on every rank

    def __post_init__(self) -> None:
        self.sampler = Sampler(self.sampling)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_tokens(self) -> int:
        """Tokens whose keys/values are in the cache once the last sampled token is fed back."""
        return len(self.prompt_ids) + len(self.output_ids)

    def sample(self, logits: np.ndarray) -> int | tuple[int, TokenLogprob] | None:
        """The next token from this request's logits row (None once it is done), with its
        log-probabilities when the request asks for them."""
        if self.done:
            return None
        wanted = self.sampling.logprobs
        row = logits.copy() if wanted is not None and self.sampling.penalized else logits  # penalties edit it
        token = self.sampler.next_token(logits, self.prompt_ids + self.output_ids, len(self.output_ids))
        return token if wanted is None else (token, token_logprob(row, token, wanted))

    def take(self, sampled: int | tuple[int, TokenLogprob] | None) -> None:
        """Append a sampled token (None: the request is done) and update the request's state."""
        if self.done or sampled is None:
            return
        token, logprob = sampled if isinstance(sampled, tuple) else (sampled, None)
        c = self.sampling
        if c.end_id is not None and token == c.end_id:
            self.finish("end_id")
            return
        self.output_ids.append(token)
        if logprob is not None:
            self.output_logprobs.append(logprob)
        if self.on_tokens is not None:
            self.on_tokens(self, [token])
        if any(w and self.output_ids[-len(w):] == w for w in c.stop_words):
            self.finish("stop_words")
        elif len(self.output_ids) >= c.max_new_tokens:
            self.finish("length")

    def finish(self, reason: str) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason
