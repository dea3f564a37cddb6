#!/usr/bin/env python
"""What the runtime LoRA path costs: decode tokens/s of a lora-plugin engine beside the base engine.

One run builds (and caches under --work_dir) from the same checkpoint of --model_dir:
  - the base engine (no lora plugin),
  - a lora engine holding 2 PEFT adapters of rank --rank on every linear (made with peft,
    non-zero B), --max_lora_rank = --rank, for each lowering in --forms (masked: the default;
    gather: the per-row reference),
and measures decode tokens/s at batch 1 (task id 0) and batch --batch (task ids 0, 1, 0, 1, ...:
2 adapters in one batch): --new_tokens forced tokens after a --prompt_len token prompt; a run's
rate is batch / its median decode step (prefill not counted).
Engines are measured back to back in rounds; each rate is the median over --repeats rounds and each
slowdown the median of the rounds' ratios to the base engine, so that a shared machine whose speed
drifts moves every column alike. With --threads 1 (the default) time is the process's CPU time,
which other processes' load does not inflate (their pressure on caches and memory still shows).
The lora engine must give the base engine's tokens for task id -1 (checked once).

    python benchmarks/bench_lora.py                      # smollm2-135m-instruct, rank 16, batch 1 and 8
    python benchmarks/bench_lora.py --forms masked gather --repeats 7 --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from trtbuild.kernels import cpu_description

DEFAULT_MODEL = "smollm2-135m-instruct"


def log(msg: str) -> None:
    print(f"[bench_lora] {msg}", file=sys.stderr, flush=True)


def prepare(args) -> dict[str, Path]:
    """Checkpoint, adapters and engines under work_dir (reused when present)."""
    from trtbuild.builder import build_engine
    from trtbuild.engine import BuildConfig, LoraConfig

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "ckpt"
    if not (ckpt / "config.json").is_file():
        from trtbuild.convert.converter import convert_checkpoint

        log(f"converting {args.model_dir}")
        convert_checkpoint(args.model_dir, ckpt, force=True, progress=False)
    adapters = []
    for k in range(2):
        d = work / f"adapter{k}_r{args.rank}"
        if not (d / "adapter_config.json").is_file():
            import torch

            from trtbuild.convert.lora import make_peft_adapter

            torch.set_num_threads(args.threads)
            log(f"making adapter {d}")
            make_peft_adapter(args.model_dir, d, r=args.rank, lora_alpha=2 * args.rank, seed=k, b_std=0.01,
                              safe_serialization=(k == 0))
        adapters.append(str(d))

    def limits(**kw) -> BuildConfig:
        return BuildConfig(max_batch_size=args.batch, max_input_len=args.prompt_len,
                           max_seq_len=args.prompt_len + args.new_tokens, **kw)

    tag = f"b{args.batch}_i{args.prompt_len}_s{args.prompt_len + args.new_tokens}"
    engines = {"base": work / f"engine_base_{tag}"}
    if not (engines["base"] / "config.json").is_file():
        log("building the base engine")
        build_engine(ckpt, engines["base"], limits(), force=True, progress=False)
    for form in args.forms:
        out = work / f"engine_lora_{form}_r{args.rank}_{tag}"
        engines[f"lora-{form}"] = out
        if not (out / "config.json").is_file():
            log(f"building the lora engine ({form})")
            lora = LoraConfig(lora_dir=tuple(adapters), max_lora_rank=args.rank, max_loras=2, lora_form=form)
            build_engine(ckpt, out, limits(lora_config=lora), force=True, progress=False)
    return engines


def decode_rate(runner, prompts, task_ids, new_tokens: int, clock=time.perf_counter) -> float:
    """Decode tokens/s: batch / the median time of the decode steps (from the step that returns
    every prompt's first token, the prefill, to the last), timed by the streaming callback. The
    median step is robust to the odd step slowed down by other processes."""
    from trtbuild.runtime import SamplingConfig

    stamps: list[float] = []
    out = runner.generate(prompts, SamplingConfig(max_new_tokens=new_tokens), lora_task_ids=task_ids,
                          streaming_callback=lambda i, toks: stamps.append(clock()))
    assert all(len(o) == new_tokens for o in out.output_ids)
    steps = stamps[len(prompts) - 1::len(prompts)]  # one callback per prompt per step; the step's last
    return len(prompts) / statistics.median(np.diff(steps))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", default=None, help=f"HF model dir (default: the fetched {DEFAULT_MODEL})")
    p.add_argument("--work_dir", default=str(Path.home() / ".cache" / "trtbuild" / "bench_lora"))
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=["cpu", "wall"], default=None,
                   help="cpu: the process's CPU time (default with --threads 1: steady on a shared machine, "
                        "where other processes' load makes wall time drift); wall: elapsed time")
    p.add_argument("--forms", nargs="+", default=["masked"], choices=["masked", "gather"])
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.model_dir is None:
        from trtbuild.fetch import fetch_model

        args.model_dir = str(fetch_model(DEFAULT_MODEL))
    if args.clock is None:
        args.clock = "cpu" if args.threads == 1 else "wall"
    if args.clock == "cpu" and args.threads != 1:
        p.error("--clock cpu needs --threads 1 (worker threads' spinning counts as CPU time)")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    engines = prepare(args)

    from trtbuild.runtime import ModelRunner, SamplingConfig

    runners = {name: ModelRunner.from_dir(d, num_threads=args.threads) for name, d in engines.items()}
    rng = np.random.default_rng(0)
    vocab = runners["base"].vocab_size
    prompts = [rng.integers(100, vocab, args.prompt_len).tolist() for _ in range(args.batch)]
    base_tokens = runners["base"].generate(prompts[:2], SamplingConfig(max_new_tokens=8)).output_ids
    for name, r in runners.items():
        if name != "base":
            got = r.generate(prompts[:2], SamplingConfig(max_new_tokens=8), lora_task_ids=[-1, -1]).output_ids
            if got != base_tokens:
                log(f"{name}: task id -1 does not give the base engine's tokens")
                return 3
    cases = {1: ([prompts[0]], [0]), args.batch: (prompts, [k % 2 for k in range(args.batch)])}
    rates: dict[tuple[str, int], list[float]] = {}
    ratios: dict[tuple[str, int], list[float]] = {}
    for rnd in range(args.repeats):
        for batch, (ps, tasks) in cases.items():
            # engines back to back within a round; ratios to the base engine of the same round
            measured = {name: decode_rate(r, ps, tasks if name != "base" else None, args.new_tokens, clock)
                        for name, r in runners.items()}
            for name, rate in measured.items():
                rates.setdefault((name, batch), []).append(rate)
                ratios.setdefault((name, batch), []).append(rate / measured["base"] - 1)
        log(f"round {rnd + 1}/{args.repeats}")
    table = {}
    print(f"decode tokens/s ({args.clock} time), rank {args.rank}, 2 adapters, {args.threads} threads on "
          f"{cpu_description()}, "
          f"median of {args.repeats} rounds "
          f"(prompt {args.prompt_len}, {args.new_tokens} new tokens); 'vs base': median of the rounds' ratios")
    print(f"{'engine':<14}" + "".join(f"{'batch ' + str(b):>14}{'vs base':>10}" for b in cases))
    for name in runners:
        row = f"{name:<14}"
        for b in cases:
            med, rel = statistics.median(rates[(name, b)]), statistics.median(ratios[(name, b)])
            table[f"{name}/batch{b}"] = {"tokens_per_s": med, "vs_base": rel, "rates": rates[(name, b)],
                                         "ratios": ratios[(name, b)]}
            row += f"{med:>14.1f}{rel * 100:>+9.1f}%"
        print(row)
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
