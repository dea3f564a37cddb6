"""Speculative decoding, KV cache reuse and chunked prefill on the default real model
(SmolLM2-135M-Instruct): the same tokens as plain decoding, on summarize.py's chat prompts."""

from __future__ import annotations

import numpy as np
import pytest

from trtbuild.engine import BuildConfig
from trtbuild.evaluate.dataset import load_records, select
from trtbuild.evaluate.summarize import make_samples
from trtbuild.runtime import SamplingConfig
from trtbuild.runtime.request import Request
from trtbuild.runtime.scheduler import Scheduler
from trtbuild.runtime.scheduling import SchedulerConfig
from trtbuild.runtime.speculation import SpeculativeConfig

from conftest import SHARED

pytestmark = pytest.mark.slow

LIMITS = BuildConfig(max_batch_size=4, max_input_len=512, max_seq_len=1024)
NEW = 48


@pytest.fixture(scope="module")
def setup(real_model_dir, engines):
    runner = engines.runner(real_model_dir, LIMITS, num_threads=2)
    records = select(load_records(dataset_file=SHARED / "data" / "summarize.jsonl"), 3, 3)
    samples = make_samples(records, runner.tokenizer, real_model_dir, 300, True, False)
    return runner, [s.prompt_ids for s in samples]


def run(runner, prompts, config: SchedulerConfig, new: int = NEW) -> tuple[list[list[int]], int]:
    requests = [Request(list(p), SamplingConfig(max_new_tokens=new, end_id=-1)) for p in prompts]
    scheduler, steps = Scheduler(runner, config), 0
    for r in requests:
        scheduler.add(r)
    while scheduler.has_work():
        scheduler.step()
        steps += 1
    return [r.output_ids for r in requests], steps


def plain() -> SchedulerConfig:
    return SchedulerConfig(kv_cache_reuse=False)


def test_prompt_lookup_and_a_draft_engine_equal_plain_greedy(setup, real_model_dir, engines):
    runner, prompts = setup
    draft = engines.runner(real_model_dir, LIMITS, quant=("--use_weight_only", "--weight_only_precision", "int4"),
                           num_threads=2)
    modes = {"prompt_lookup": SpeculativeConfig("prompt_lookup", max_draft_len=4, max_batch=4),
             "draft_tokens_external": SpeculativeConfig("draft_tokens_external", max_draft_len=3, max_batch=4,
                                                        draft=draft)}
    want, plain_steps = run(runner, prompts[:1], plain())
    for name, spec in modes.items():
        got, steps = run(runner, prompts[:1], SchedulerConfig(kv_cache_reuse=False, speculation=spec))
        assert got == want, name
        assert steps < plain_steps, name  # drafts were accepted
    mixed = prompts + [prompts[0][:40]]  # four requests in one batch, all speculating
    want_all = [run(runner, [p], plain())[0][0] for p in mixed]
    for name, spec in modes.items():
        assert run(runner, mixed, SchedulerConfig(kv_cache_reuse=False, speculation=spec))[0] == want_all, name


def test_reuse_and_chunks_equal_plain(setup):
    """A second turn reuses the first's rows; a long prompt arriving while others decode goes in
    chunks of 64: every output equals plain decoding's, the second turn's first logits a fresh
    prefill's."""
    runner, prompts = setup
    first = Request(list(prompts[0]), SamplingConfig(max_new_tokens=16, end_id=-1))
    scheduler = Scheduler(runner, SchedulerConfig(max_num_tokens=64))
    scheduler.add(first)
    while scheduler.has_work():
        scheduler.step()
    second_turn = first.prompt_ids + first.output_ids + runner.tokenizer.encode(" Shorter, please.").ids
    seen = {}
    accept = runner.accept

    def spy(requests, logits, drafts=None):
        for r, rows in zip(requests, logits):
            seen.setdefault(id(r), rows[0].copy())
        return accept(requests, logits, drafts)

    runner.accept = spy
    try:
        followers = [Request(list(second_turn), SamplingConfig(max_new_tokens=NEW, end_id=-1)),
                     Request(list(prompts[1][:30]), SamplingConfig(max_new_tokens=NEW, end_id=-1))]
        scheduler.add(followers[1])
        scheduler.step()  # it decodes while the others arrive
        long = Request(list(prompts[2]), SamplingConfig(max_new_tokens=NEW, end_id=-1))
        for r in (followers[0], long):
            scheduler.add(r)
        while scheduler.has_work():
            scheduler.step()
    finally:
        del runner.accept
    fresh = runner.prefill([second_turn])[0, 0]
    np.testing.assert_allclose(seen[id(followers[0])], fresh, atol=2e-3, rtol=0)
    for r in (*followers, long):
        assert r.output_ids == run(runner, [r.prompt_ids], plain())[0][0]
