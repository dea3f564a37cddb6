"""KV cache reuse and chunked prefill: a prompt that starts with cached tokens (a finished request's
prompt and answer, a running request's prefix) computes only the rest, with a fresh prefill's
logits; cached prefixes live in free slots and are evicted least recently used; a long prompt
arriving while others decode is fed in chunks between their steps, with one-shot results."""

from __future__ import annotations

import numpy as np
import pytest

from trtbuild.engine import BuildConfig
from trtbuild.runtime import SamplingConfig
from trtbuild.runtime.prefix_cache import PrefixCache, common_prefix
from trtbuild.runtime.request import Request
from trtbuild.runtime.scheduler import MIN_REUSE, Scheduler
from trtbuild.runtime.scheduling import SchedulerConfig

LIMITS = BuildConfig(max_batch_size=4, max_input_len=128, max_seq_len=256)
ATOL = 2e-4


class Spy:
    """Wraps runner.step and runner.accept: the shape of every step's input ids, and the first
    logits each request sampled from."""

    def __init__(self, runner):
        self.runner, self.shapes, self.first_logits = runner, [], {}
        step, accept = runner.step, runner.accept

        def counted(*args, **kwargs):
            self.shapes.append(args[0].shape)
            return step(*args, **kwargs)

        def seen(requests, logits, drafts=None):
            for r, rows in zip(requests, logits):
                self.first_logits.setdefault(id(r), rows[0].copy())
            return accept(requests, logits, drafts)

        runner.step, runner.accept = counted, seen

    def close(self) -> None:
        del self.runner.step, self.runner.accept

    def fed(self) -> int:
        return sum(int(np.prod(s)) for s in self.shapes)


def tokens(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 120, n).tolist()


def greedy(n: int) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=n, end_id=-1)


def run_all(scheduler: Scheduler, requests: list[Request]) -> None:
    for r in requests:
        scheduler.add(r)
    while scheduler.has_work():
        scheduler.step()


def fresh_logits(runner, prompt: list[int]) -> np.ndarray:
    return runner.prefill([prompt])[0, 0]


def test_common_prefix_and_lru_eviction():
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2 and common_prefix([], [1]) == 0
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    cache, moves = PrefixCache(4), []
    cache.add(2, [1, 2, 3])  # older
    cache.add(3, [4, 5, 6])
    cache.used(2)  # now 3 is the least recently used
    cache.add(1, [7, 8])
    cache.take([1], 1, lambda s, d, n: moves.append((s, d, n)))  # slot 1 needed: its entry evicts slot 3's
    assert moves == [(1, 3, 2)] and cache.entries[3].tokens == [7, 8] and cache.slots() == {2, 3}
    assert cache.longest([1, 2, 9]) == (2, 2) and cache.longest([9]) == (-1, 0)
    cache.take([2, 3], 2, lambda *a: moves.append(a))  # no room left: both dropped
    assert cache.slots() == set() and len(moves) == 1


def test_a_finished_requests_prompt_and_answer_are_reused(tiny_models, engines):
    """Request B = A's prompt + A's answer + a new turn: B's prefill feeds only the new turn, and
    its logits equal a fresh prefill's; its output equals the output without reuse."""
    runner = engines.runner(tiny_models["llama"], LIMITS)
    a = Request(tokens(1, 40), greedy(20))
    spy = Spy(runner)
    try:
        scheduler = Scheduler(runner, SchedulerConfig())
        run_all(scheduler, [a])
        b_prompt = a.prompt_ids + a.output_ids + tokens(2, 12)
        fed_before = spy.fed()
        b = Request(list(b_prompt), greedy(10))
        run_all(scheduler, [b])
        b_prefill = spy.shapes[len(spy.shapes) - 10]  # B's first step, then 9 decode steps
        assert b_prefill == (1, len(b_prompt) - (len(a.prompt_ids) + len(a.output_ids) - 1))
        assert spy.fed() - fed_before == b_prefill[1] + 9
        got = spy.first_logits[id(b)]
    finally:
        spy.close()
    np.testing.assert_allclose(got, fresh_logits(runner, b_prompt), atol=ATOL, rtol=0)
    plain = Request(list(b_prompt), greedy(10))
    run_all(Scheduler(runner, SchedulerConfig(kv_cache_reuse=False)), [plain])
    assert b.output_ids == plain.output_ids


def test_a_running_requests_prefix_is_reused(tiny_models, engines):
    """Two requests with a shared 50-token system prompt: the second, arriving while the first
    decodes, copies the first's rows and computes only its own part."""
    runner = engines.runner(tiny_models["qwen2"], LIMITS)
    system = tokens(3, 50)
    a, b = Request(system + tokens(4, 6), greedy(30)), Request(system + tokens(5, 9), greedy(8))
    spy = Spy(runner)
    try:
        scheduler = Scheduler(runner, SchedulerConfig())
        scheduler.add(a)
        for _ in range(3):
            scheduler.step()
        run_all(scheduler, [b])
        assert (1, 9) in spy.shapes  # b fed its own 9 tokens only
        got = spy.first_logits[id(b)]
    finally:
        spy.close()
    np.testing.assert_allclose(got, fresh_logits(runner, b.prompt_ids), atol=ATOL, rtol=0)
    for r in (a, b):
        plain = Request(list(r.prompt_ids), r.sampling)
        run_all(Scheduler(runner, SchedulerConfig(kv_cache_reuse=False)), [plain])
        assert r.output_ids == plain.output_ids


def test_reuse_off_and_short_matches_feed_the_whole_prompt(tiny_models, engines):
    runner = engines.runner(tiny_models["llama"], LIMITS)
    a = Request(tokens(6, 40), greedy(4))
    for config, prompt in ((SchedulerConfig(kv_cache_reuse=False), a.prompt_ids + [7, 8]),
                           (SchedulerConfig(), a.prompt_ids[:MIN_REUSE - 1] + [7, 8])):
        scheduler = Scheduler(runner, config)
        run_all(scheduler, [Request(list(a.prompt_ids), greedy(4))])
        spy = Spy(runner)
        try:
            run_all(scheduler, [Request(list(prompt), greedy(1))])
        finally:
            spy.close()
        assert spy.shapes == [(1, len(prompt))]


def test_cached_prefixes_stay_within_the_slots_and_evict_the_oldest(tiny_models, engines):
    """Six finished conversations through a 4-slot engine: at most 4 prefixes stay cached (the
    latest), each still giving a fresh prefill's logits when its conversation goes on."""
    runner = engines.runner(tiny_models["llama"], LIMITS)
    scheduler = Scheduler(runner, SchedulerConfig())
    done = []
    for i in range(6):
        r = Request(tokens(10 + i, 30), greedy(5))
        run_all(scheduler, [r])
        done.append(r)
    assert len(scheduler.prefixes.slots()) <= LIMITS.max_batch_size
    for r in (done[-1], done[-2]):
        follow = r.prompt_ids + r.output_ids + [9, 10, 11]
        spy = Spy(runner)
        try:
            run_all(scheduler, [Request(list(follow), greedy(1))])
            got = list(spy.first_logits.values())[0]
            assert spy.shapes[0][1] < len(follow) - 20  # reused
        finally:
            spy.close()
        np.testing.assert_allclose(got, fresh_logits(runner, follow), atol=ATOL, rtol=0)
    follow = done[0].prompt_ids + done[0].output_ids + [9]
    spy = Spy(runner)
    try:
        run_all(scheduler, [Request(list(follow), greedy(1))])
    finally:
        spy.close()
    assert spy.shapes[0] == (1, len(follow))  # the oldest was evicted


def test_chunked_prefill_between_decode_steps(tiny_models, engines):
    """max_num_tokens 16: a 100-token prompt arriving while two requests decode is fed in chunks
    of 16, one between each of their steps; every output equals one-shot prefill's."""
    runner = engines.runner(tiny_models["mistral"], LIMITS)
    decoding = [Request(tokens(20, 10), greedy(30)), Request(tokens(21, 12), greedy(30))]
    long = Request(tokens(22, 100), greedy(10))
    spy = Spy(runner)
    try:
        scheduler = Scheduler(runner, SchedulerConfig(kv_cache_reuse=False, max_num_tokens=16))
        for r in decoding:
            scheduler.add(r)
        while len(scheduler.active) < 2:
            scheduler.step()
        scheduler.add(long)
        added = len(spy.shapes)
        while scheduler.has_work():
            scheduler.step()
        got = spy.first_logits[id(long)]
    finally:
        spy.close()
    chunks = [s for s in spy.shapes[added:] if s[0] == 1 and s[1] > 1]
    assert [c[1] for c in chunks] == [16] * 6 + [4]
    between = [i for i, s in enumerate(spy.shapes[added:]) if s == (2, 1)]
    assert len(between) >= 6  # the two kept decoding while the prompt went in
    np.testing.assert_allclose(got, fresh_logits(runner, long.prompt_ids), atol=ATOL, rtol=0)
    for r in [*decoding, long]:
        plain = Request(list(r.prompt_ids), r.sampling)
        run_all(Scheduler(runner, SchedulerConfig(kv_cache_reuse=False)), [plain])
        assert r.output_ids == plain.output_ids


def test_chunked_prefill_survives_requests_leaving_meanwhile(tiny_models, engines):
    """A decoding request that ends while a prompt is fed in chunks: the prompt's slot moves down
    with the batch, and every result still equals one-shot's (with reuse on as well)."""
    runner = engines.runner(tiny_models["llama"], LIMITS)
    short = Request(tokens(30, 8), greedy(2))
    stays = Request(tokens(31, 8), greedy(25))
    long = Request(tokens(32, 90), greedy(6))
    scheduler = Scheduler(runner, SchedulerConfig(max_num_tokens=8))
    for r in (stays, short):
        scheduler.add(r)
    scheduler.step()
    run_all(scheduler, [long])
    for r in (short, stays, long):
        plain = Request(list(r.prompt_ids), r.sampling)
        run_all(Scheduler(runner, SchedulerConfig(kv_cache_reuse=False)), [plain])
        assert r.output_ids == plain.output_ids


@pytest.mark.parametrize("quant", [("--int8_kv_cache",)])
def test_reuse_with_an_int8_kv_cache(quant, tiny_models, engines):
    runner = engines.runner(tiny_models["llama"], LIMITS, quant=quant)
    scheduler = Scheduler(runner, SchedulerConfig())
    a = Request(tokens(40, 40), greedy(10))
    run_all(scheduler, [a])
    b = Request(a.prompt_ids + a.output_ids + [5, 6, 7], greedy(10))
    run_all(scheduler, [b])
    plain = Request(list(b.prompt_ids), b.sampling)
    run_all(Scheduler(runner, SchedulerConfig(kv_cache_reuse=False)), [plain])
    assert b.output_ids == plain.output_ids


def test_longrope_prompts_past_the_switch_go_in_one_step(tiny_models, engines):
    """Phi-3's LongRoPE rotates a prompt longer than original_max_position_embeddings (64 here) as a
    whole with its long set: such a prompt is neither chunked nor reused, so it equals one-shot;
    and a row's decode steps no longer depend on the rows beside it (keys rotated by position)."""
    runner = engines.runner(tiny_models["phi3"], LIMITS)
    first = Request(tokens(50, 20), greedy(40))
    long = Request(first.prompt_ids + tokens(51, 60), greedy(10))  # 80 tokens, sharing 20 with `first`
    spy = Spy(runner)
    try:
        scheduler = Scheduler(runner, SchedulerConfig(max_num_tokens=16))
        scheduler.add(first)
        scheduler.step()
        run_all(scheduler, [long])
    finally:
        spy.close()
    assert (1, 80) in spy.shapes  # one step, nothing reused or chunked
    short = Request(long.prompt_ids[:50] + [7], greedy(6))  # within the switch: rotated by position, so
    spy = Spy(runner)  # the long prompt's rows (rotated as a whole) are not its prefix
    try:
        run_all(scheduler, [short])
    finally:
        spy.close()
    assert spy.shapes[0] == (1, 51 - 20)  # `first`'s 20 prompt tokens reused, not the long prompt's 50
    for r in (first, long, short):
        alone = Request(list(r.prompt_ids), r.sampling)
        run_all(Scheduler(runner, SchedulerConfig(kv_cache_reuse=False)), [alone])
        assert r.output_ids == alone.output_ids


def test_prefixes_are_reused_only_under_the_same_adapter(tiny_models, engines, tmp_path):
    """A LoRA adapter changes keys and values: a finished request's prefix is reused by a request
    of the same adapter, never by the base model or another adapter."""
    from trtbuild.convert.lora import make_peft_adapter
    from trtbuild.engine import LoraConfig

    adapter = make_peft_adapter(tiny_models["llama"], tmp_path / "adapter", r=4, seed=5)
    build = BuildConfig(max_batch_size=4, max_input_len=128, max_seq_len=256,
                        lora_config=LoraConfig(lora_dir=(str(adapter),), max_lora_rank=4))
    runner = engines.runner(tiny_models["llama"], build)
    scheduler = Scheduler(runner, SchedulerConfig())
    first = Request(tokens(60, 40), greedy(6), lora_task_id=0)
    run_all(scheduler, [first])
    follow = first.prompt_ids + first.output_ids + [5, 6]
    for task_id, reused in ((-1, False), (0, True)):
        r = Request(list(follow), greedy(4), lora_task_id=task_id)
        spy = Spy(runner)
        try:
            run_all(scheduler, [r])
        finally:
            spy.close()
        assert (spy.shapes[0][1] < len(follow)) == reused, task_id
        plain = Request(list(follow), greedy(4), lora_task_id=task_id)
        run_all(Scheduler(runner, SchedulerConfig(kv_cache_reuse=False)), [plain])
        assert r.output_ids == plain.output_ids
