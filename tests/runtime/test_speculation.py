"""Speculative decoding: prompt lookup and a draft engine give exactly plain decoding's tokens,
alone and in a mixed in-flight batch, on every tiny family, with an INT8 KV cache and with LoRA;
and it does take several tokens per engine step where the drafts are right."""

from __future__ import annotations

import numpy as np
import pytest

from trtbuild.engine import BuildConfig
from trtbuild.errors import TrtbuildError
from trtbuild.runtime import SamplingConfig
from trtbuild.runtime.request import Request
from trtbuild.runtime.scheduler import Scheduler
from trtbuild.runtime.scheduling import SchedulerConfig
from trtbuild.runtime.speculation import SpeculativeConfig, prompt_lookup

from conftest import TINY_ARCHS

LIMITS = BuildConfig(max_batch_size=4, max_input_len=64, max_seq_len=256)
NEW = 40


def prompts(seed: int = 0) -> list[list[int]]:
    """Prompts with repeated stretches (what prompt lookup finds) and one without."""
    rng = np.random.default_rng(seed)
    a, b = rng.integers(3, 120, 12).tolist(), rng.integers(3, 120, 9).tolist()
    return [a + b + a[:5], b + a + b + a[:3], rng.integers(3, 120, 30).tolist(), (a[:4] + b[:3]) * 4]


def run(runner, samplings, prompts_, config: SchedulerConfig | None = None, lora_task_ids=None):
    """Every prompt through one Scheduler together; (output ids, engine steps)."""
    steps = []
    step = runner.step

    def counted(*args, **kwargs):
        steps.append(args[0].shape)
        return step(*args, **kwargs)

    runner.step = counted
    try:
        scheduler = Scheduler(runner, config or SchedulerConfig(kv_cache_reuse=False))
        requests = [Request(list(p), s, t) for p, s, t in
                    zip(prompts_, samplings, lora_task_ids or [-1] * len(prompts_))]
        for r in requests:
            scheduler.add(r)
        while scheduler.has_work():
            scheduler.step()
    finally:
        del runner.step
    return [r.output_ids for r in requests], steps


def greedy(n: int = NEW) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=n, end_id=-1)


def lookup(max_batch: int = 1, drafts: int = 4) -> SchedulerConfig:
    return SchedulerConfig(kv_cache_reuse=False, speculation=SpeculativeConfig(
        "prompt_lookup", max_draft_len=drafts, max_matching_ngram_size=2, max_batch=max_batch,
        min_matching_ngram_size=1))


def test_prompt_lookup_finds_the_latest_longest_match():
    assert prompt_lookup([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], 3, 3) == [7, 8, 1]
    assert prompt_lookup([5, 6, 7, 5, 9, 5], 2, 2) == [9, 5]  # no 2-gram (9, 5) before: the latest 5
    assert prompt_lookup([1, 2, 3], 4, 2) == []
    assert prompt_lookup([4, 4, 4, 4], 4, 2) == [4]  # what follows the latest earlier (4, 4)
    assert prompt_lookup([5, 6, 7, 5, 9, 5], 2, 2, min_ngram=2) == []  # only a one-token match


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_prompt_lookup_alone_equals_plain_greedy(arch, tiny_models, engines):
    runner = engines.runner(tiny_models[arch], LIMITS)
    for p in prompts():
        plain, plain_steps = run(runner, [greedy()], [p])
        spec, spec_steps = run(runner, [greedy()], [p], lookup())
        assert spec == plain, arch
        assert len(spec_steps) <= len(plain_steps)


def test_prompt_lookup_takes_several_tokens_a_step(tiny_models, engines):
    """A tiny model's greedy text repeats itself, and prompt lookup finds the repeats: fewer steps."""
    runner = engines.runner(tiny_models["llama"], LIMITS)
    p = prompts()[3]
    plain, plain_steps = run(runner, [greedy(120)], [p])
    spec, spec_steps = run(runner, [greedy(120)], [p], lookup(drafts=8))
    assert spec == plain
    assert len(spec_steps) < 0.7 * len(plain_steps), (len(spec_steps), len(plain_steps))
    assert any(shape[1] > 1 for shape in spec_steps[1:])  # drafted steps fed several tokens


def test_mixed_batch_speculating_and_not(tiny_models, engines):
    """Four requests share the batch: greedy ones speculate, a sampled one (seeded) too, one
    with penalties; each equals what it gives in plain decoding, and logprobs are the same."""
    runner = engines.runner(tiny_models["qwen2"], LIMITS)
    samplings = [greedy(), SamplingConfig(max_new_tokens=NEW, end_id=-1, temperature=0.8, top_k=0, top_p=0.9,
                                          random_seed=7),
                 SamplingConfig(max_new_tokens=NEW, end_id=-1, presence_penalty=0.3, frequency_penalty=0.2,
                                logprobs=2),
                 greedy(25)]
    plain, _ = run(runner, samplings, prompts())
    spec, steps = run(runner, samplings, prompts(), lookup(max_batch=4))
    assert spec == plain
    assert any(shape[0] == 1 and shape[1] > 1 for shape in steps)  # some row verified drafts


def test_stop_conditions_inside_accepted_drafts(tiny_models, engines):
    """An end id, a stop word or max_new_tokens met among accepted drafts ends the request there."""
    runner = engines.runner(tiny_models["llama"], LIMITS)
    p = prompts()[3]
    plain, _ = run(runner, [greedy(60)], [p])
    out = plain[0]
    end = out[30]
    stop = out[20:22]
    cases = [SamplingConfig(max_new_tokens=60, end_id=end), SamplingConfig(max_new_tokens=60, end_id=-1,
                                                                         stop_words=[stop]),
             SamplingConfig(max_new_tokens=17, end_id=-1)]
    for s in cases:
        assert run(runner, [s], [p], lookup(drafts=8))[0] == run(runner, [s], [p])[0]


@pytest.mark.parametrize("quant", [("--int8_kv_cache",), ("--use_weight_only", "--weight_only_precision", "int4")])
def test_prompt_lookup_on_quantized_engines(quant, tiny_models, engines):
    runner = engines.runner(tiny_models["llama"], LIMITS, quant=quant)
    for p in prompts()[:2]:
        assert run(runner, [greedy()], [p], lookup())[0] == run(runner, [greedy()], [p])[0]


def test_prompt_lookup_with_lora(tiny_models, engines, tmp_path):
    from trtbuild.convert.lora import make_peft_adapter
    from trtbuild.engine import LoraConfig

    adapter = make_peft_adapter(tiny_models["llama"], tmp_path / "adapter", r=4, seed=3)
    build = BuildConfig(max_batch_size=4, max_input_len=64, max_seq_len=256,
                        lora_config=LoraConfig(lora_dir=(str(adapter),), max_lora_rank=4))
    runner = engines.runner(tiny_models["llama"], build)
    ps, tasks = prompts()[:2], [0, -1]
    plain, _ = run(runner, [greedy()] * 2, ps, lora_task_ids=tasks)
    assert run(runner, [greedy()] * 2, ps, lookup(max_batch=2), lora_task_ids=tasks)[0] == plain
    assert plain[0] != run(runner, [greedy()], ps[:1])[0][0]  # the adapter mattered


def test_a_draft_engine_equals_plain_greedy(tiny_models, engines):
    """The draft: an int8 weight-only engine of the same model (close, not equal); the target's
    tokens are plain decoding's whatever the draft proposes."""
    target = engines.runner(tiny_models["gemma3"], LIMITS)
    draft = engines.runner(tiny_models["gemma3"], LIMITS, quant=("--use_weight_only",))
    config = SchedulerConfig(kv_cache_reuse=False, speculation=SpeculativeConfig(
        "draft_tokens_external", max_draft_len=3, max_batch=4, draft=draft))
    samplings = [greedy(), greedy(30), greedy(), greedy(12)]
    plain, plain_steps = run(target, samplings, prompts())
    spec, spec_steps = run(target, samplings, prompts(), config)
    assert spec == plain
    alone, alone_steps = run(target, [greedy(60)], prompts()[:1], config)
    assert alone == run(target, [greedy(60)], prompts()[:1])[0]
    assert len(alone_steps) < 40  # the draft is mostly right: well under 60 target steps


def test_bad_speculation_settings_are_one_line(tiny_models, engines):
    runner = engines.runner(tiny_models["llama"], LIMITS)
    small = engines.runner(tiny_models["llama"], BuildConfig(max_batch_size=2, max_input_len=64, max_seq_len=256))
    cases = [(SpeculativeConfig("medusa"), "speculative_decoding_mode 'medusa'"),
             (SpeculativeConfig(max_draft_len=0), "max_draft_len 0"),
             (SpeculativeConfig(min_matching_ngram_size=4), "matching n-gram sizes 4..3"),
             (SpeculativeConfig("draft_tokens_external"), "needs a draft engine"),
             (SpeculativeConfig("draft_tokens_external", draft=small), "max_batch_size 2, below the target")]
    for spec, message in cases:
        with pytest.raises(TrtbuildError, match=message):
            Scheduler(runner, SchedulerConfig(speculation=spec))


def read_csv(path) -> list[list[int]]:
    return [[int(x) for x in line.split(",")] for line in path.read_text().split()]


def test_run_py_flags_and_the_engines_default(tiny_models, engines, tmp_path, capsys):
    """run.py --prompt_lookup_num_tokens / --draft_engine_dir print what plain run.py prints; an
    engine built with trt-build --speculative_decoding_mode prompt_lookup speculates by default."""
    from trtbuild.cli import build as build_cli
    from trtbuild.cli import run as run_cli
    from trtbuild.runtime import ModelRunner
    from trtbuild.runtime.scheduling import scheduling_config

    engine = engines.engine(tiny_models["llama"], LIMITS)
    draft = engines.engine(tiny_models["llama"], LIMITS, quant=("--use_weight_only",))
    common = ["--engine_dir", str(engine), "--input_text", "the the cat sat on the the cat", "a b a b a b",
              "--max_output_len", "40", "--end_id", "-1"]
    outs = {}
    for name, extra in (("plain", []), ("lookup", ["--prompt_lookup_num_tokens", "5"]),
                        ("draft", ["--draft_engine_dir", str(draft), "--max_draft_len", "3",
                                   "--speculative_max_batch_size", "2"])):
        run_cli.main([*common, *extra, "--output_csv", str(tmp_path / f"{name}.csv")])
        outs[name] = read_csv(tmp_path / f"{name}.csv")
    capsys.readouterr()
    assert outs["lookup"] == outs["plain"] and outs["draft"] == outs["plain"]

    built = tmp_path / "spec_engine"
    build_cli.main(["--checkpoint_dir", str(engines.checkpoint(tiny_models["llama"])), "--output_dir", str(built),
                    "--max_batch_size", "4", "--max_input_len", "64", "--max_seq_len", "256",
                    "--speculative_decoding_mode", "prompt_lookup", "--max_draft_len", "6"])
    runner = ModelRunner.from_dir(built, num_threads=1)
    spec = scheduling_config(runner).speculation
    assert spec.mode == "prompt_lookup" and spec.max_draft_len == 6
    assert scheduling_config(runner, speculative_decoding_mode="none").speculation is None


def test_build_refuses_speculation_without_the_shared_cache(tiny_models, engines, tmp_path, capsys):
    from trtbuild.cli import build as build_cli

    with pytest.raises(SystemExit) as e:
        build_cli.main(["--checkpoint_dir", str(engines.checkpoint(tiny_models["llama"])), "--output_dir",
                        str(tmp_path / "e"), "--gpt_attention_plugin", "disable",
                        "--speculative_decoding_mode", "prompt_lookup"])
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "--speculative_decoding_mode needs" in err[0]
    assert not (tmp_path / "e").exists()
