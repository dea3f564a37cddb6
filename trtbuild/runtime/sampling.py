"""Per-request sampling: greedy, temperature / top-k / top-p, repetition / presence / frequency
penalties, bad words, and the log-probabilities of what was picked."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from trtbuild.errors import TrtbuildError


@dataclass
class SamplingConfig:
    """TensorRT-LLM's sampling knobs. Greedy when top_k=1 (the default), when top_k=0 and top_p=0
    (TensorRT-LLM's meaning of "no sampling limits set"), or when temperature is 0."""

    max_new_tokens: int = 32
    end_id: int | None = None
    pad_id: int | None = None
    temperature: float = 1.0
    top_k: int = 1
    top_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0  # subtracted once from the logit of every token generated so far
    frequency_penalty: float = 0.0  # subtracted per occurrence among the tokens generated so far
    random_seed: int | None = None
    stop_words: list[list[int]] = field(default_factory=list)
    bad_words: list[list[int]] = field(default_factory=list)
    logprobs: int | None = None  # report each picked token's log-probability and this many top ones

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise TrtbuildError(f"max_new_tokens {self.max_new_tokens} must be at least 1")
        if self.temperature < 0:
            raise TrtbuildError(f"temperature {self.temperature} must be >= 0")
        if self.top_k < 0:
            raise TrtbuildError(f"top_k {self.top_k} must be >= 0")
        if not 0.0 <= self.top_p <= 1.0:
            raise TrtbuildError(f"top_p {self.top_p} must be within [0, 1]")
        if self.repetition_penalty <= 0:
            raise TrtbuildError(f"repetition_penalty {self.repetition_penalty} must be > 0")
        if self.logprobs is not None and self.logprobs < 0:
            raise TrtbuildError(f"logprobs {self.logprobs} must be >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1 or (self.top_k == 0 and self.top_p == 0.0)

    @property
    def penalized(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or bool(self.bad_words))


@dataclass
class TokenLogprob:
    """A picked token's log-probability under the model (its raw logits: before penalties,
    temperature or truncation, as vLLM reports), and the `top` most likely tokens' [(id, logprob)]."""

    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


def token_logprob(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    """log_softmax(logits)[token] and the `top` largest entries, in float64."""
    x = logits.astype(np.float64)
    logz = x.max() + np.log(np.exp(x - x.max()).sum())
    best = np.argpartition(-x, top - 1)[:top] if 0 < top < x.shape[0] else np.arange(x.shape[0] if top else 0)
    best = best[np.argsort(-x[best], kind="stable")]
    return TokenLogprob(float(x[token] - logz), [(int(t), float(x[t] - logz)) for t in best])


class Sampler:
    """Picks each next token of one request; owns that request's random generator."""

    def __init__(self, config: SamplingConfig):
        config.validate()
        self.config = config
        self.rng = np.random.default_rng(config.random_seed)

    def _penalize(self, logits: np.ndarray, history: list[int], generated: list[int]) -> np.ndarray:
        c = self.config
        if (c.presence_penalty or c.frequency_penalty) and generated:  # OpenAI's: over the generated tokens
            ids, counts = np.unique(np.asarray(generated, dtype=np.int64), return_counts=True)
            keep = ids < logits.shape[0]
            logits[ids[keep]] -= (c.presence_penalty + c.frequency_penalty * counts[keep]).astype(logits.dtype)
        if c.repetition_penalty != 1.0 and history:
            ids = np.unique(np.asarray(history, dtype=np.int64))
            ids = ids[ids < logits.shape[0]]
            vals = logits[ids]
            logits[ids] = np.where(vals > 0, vals / c.repetition_penalty, vals * c.repetition_penalty)
        for words in c.bad_words:
            # a bad word's last token is banned when the tokens before it were just produced
            if words and (len(words) == 1 or history[-(len(words) - 1):] == words[:-1]):
                logits[words[-1]] = -np.inf
        return logits

    def next_token(self, logits: np.ndarray, history: list[int], num_generated: int = 0) -> int:
        """logits: [vocab] float32 for this request's last position (modified in place); history:
        the prompt and the tokens generated so far (its last `num_generated`)."""
        c = self.config
        if c.penalized:
            logits = self._penalize(logits, history, history[len(history) - num_generated:])
        if c.greedy:
            return int(np.argmax(logits))
        logits = logits.astype(np.float64) / max(c.temperature, 1e-6)
        if 0 < c.top_k < logits.shape[0]:
            kth = np.partition(logits, -c.top_k)[-c.top_k]
            logits = np.where(logits < kth, -np.inf, logits)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        if 0.0 < c.top_p < 1.0:
            order = np.argsort(-probs)
            cumulative = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cumulative, c.top_p)) + 1]
            mask = np.zeros_like(probs)
            mask[keep] = probs[keep]
            probs = mask / mask.sum()
        return int(self.rng.choice(probs.shape[0], p=probs))
