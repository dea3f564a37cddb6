"""The sampler's penalties and log-probabilities against their formulas (OpenAI's presence and
frequency penalties over the generated tokens, TensorRT-LLM's repetition penalty over all), and a
generation with them through the runner."""

from __future__ import annotations

import numpy as np
import pytest

from trtbuild.errors import TrtbuildError
from trtbuild.runtime import ModelRunner, SamplingConfig
from trtbuild.runtime.request import Request
from trtbuild.runtime.sampling import Sampler, token_logprob

VOCAB = 50


def logits_row(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=VOCAB).astype(np.float32)


def test_presence_and_frequency_penalties_count_only_generated_tokens():
    prompt, generated = [3, 3, 4], [7, 7, 7, 9]
    row = logits_row()
    want = row.copy()
    want[7] -= 0.5 + 0.25 * 3
    want[9] -= 0.5 + 0.25 * 1  # the prompt's 3 and 4 keep their logits
    cfg = SamplingConfig(presence_penalty=0.5, frequency_penalty=0.25, temperature=0)
    got = Sampler(cfg)._penalize(row.copy(), prompt + generated, generated)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    # greedy picks the best token after the penalties: make 7 the best before them and not after
    row[7] = row.max() + 0.5
    assert Sampler(cfg).next_token(row.copy(), prompt + generated, len(generated)) != 7
    assert Sampler(SamplingConfig(temperature=0)).next_token(row.copy(), prompt + generated, len(generated)) == 7


def test_negative_penalties_favour_repeats():
    row = logits_row(1)
    row[5] = row.max() - 0.1
    cfg = SamplingConfig(frequency_penalty=-1.0, temperature=0)
    assert Sampler(cfg).next_token(row, [1, 5], 1) == 5


def test_token_logprob_is_log_softmax_and_its_top_is_sorted():
    row = logits_row(2)
    log_softmax = row.astype(np.float64) - np.log(np.exp(row.astype(np.float64)).sum())
    entry = token_logprob(row, 11, top=5)
    assert entry.logprob == pytest.approx(log_softmax[11], abs=1e-9)
    assert [t for t, _ in entry.top] == list(np.argsort(-log_softmax)[:5])
    assert [lp for _, lp in entry.top] == pytest.approx(sorted(log_softmax, reverse=True)[:5], abs=1e-9)
    assert token_logprob(row, 11, top=0).top == []
    assert len(token_logprob(row, 11, top=VOCAB + 10).top) == VOCAB


def test_a_request_reports_the_models_logprobs_not_the_penalized_ones():
    """Log-probabilities are of the model's distribution: penalties and temperature change which
    token is picked, not what is reported."""
    row = logits_row(3)
    r = Request([1, 2], SamplingConfig(max_new_tokens=4, temperature=0, presence_penalty=2.0, logprobs=2))
    r.output_ids = [int(np.argmax(row))]
    r.take(r.sample(row.copy()))
    token = r.output_ids[-1]
    assert token != int(np.argmax(row))  # the penalty moved the pick
    want = token_logprob(row, token, 2)
    assert r.output_logprobs[-1].logprob == pytest.approx(want.logprob) and r.output_logprobs[-1].top == want.top


def test_bad_logprobs_is_one_line():
    with pytest.raises(TrtbuildError, match="logprobs -1 must be >= 0"):
        Sampler(SamplingConfig(logprobs=-1))


def test_generation_with_penalties_equals_the_formula_step_by_step(tiny_models, engines):
    """Greedy generation with presence / frequency penalties on a tiny engine equals picking, at
    every step, the argmax of the runner's own logits minus the penalties of the tokens so far."""
    runner = ModelRunner.from_dir(engines.engine(tiny_models["llama"]), num_threads=1)
    prompt = [5, 6, 7, 8, 5, 6, 7, 8]
    cfg = SamplingConfig(max_new_tokens=12, end_id=-1, temperature=0, presence_penalty=1.5, frequency_penalty=0.7,
                         logprobs=3)
    got = runner.generate([prompt], cfg).output_ids[0]
    out: list[int] = []
    for _ in range(12):
        logits = runner.score([prompt + out])[0, -1].astype(np.float64)
        ids, counts = np.unique(np.array(out, np.int64), return_counts=True)
        logits[ids] -= 1.5 + 0.7 * counts
        out.append(int(np.argmax(logits)))
    assert got == out
    assert got != runner.generate([prompt], SamplingConfig(max_new_tokens=12, end_id=-1)).output_ids[0]
