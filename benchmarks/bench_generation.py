"""Speculative decoding, KV cache reuse and chunked prefill, measured on one engine in one run.

    python benchmarks/bench_generation.py [--engine_dir E] [--draft_engine_dir D] [--samples 8] [--json out.json]

1. Prompt lookup on summaries: summarize.py's prompts (../shared/data/summarize.jsonl, chat template,
   articles cut to --max_input_length tokens), --output_len greedy tokens each, batch 1, with and
   without prompt lookup: decode tok/s (after the first token), ROUGE (identical outputs, so
   identical ROUGE: checked), drafted tokens accepted.
2. The same with a draft engine (default: the int4 g32 engine of the same model, if in the cache).
3. KV cache reuse: time to first token of a request whose chat shares a --system_len-token system
   prompt with an earlier one, with reuse on and off (median of --questions questions).
4. Chunked prefill: inter-token latency p50 / p99 of --streams (8) running streams while a
   --long_len-token prompt arrives, with --max_num_tokens --chunk and without chunking (on an
   engine with a slot for each: built from the cached fp32 checkpoint when not given).

Defaults: the SmolLM2-135M fp32 engine bench_engines.py builds (~/.cache/trtbuild/bench), 2 threads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CACHE = Path.home() / ".cache" / "trtbuild" / "bench"

from trtbuild.evaluate.dataset import load_records, select  # noqa: E402
from trtbuild.evaluate.summarize import make_samples, rouge_scores  # noqa: E402
from trtbuild.kernels import cpu_description  # noqa: E402
from trtbuild.runtime import ModelRunner, SamplingConfig  # noqa: E402
from trtbuild.runtime.chat import apply_chat_template  # noqa: E402
from trtbuild.runtime.request import Request  # noqa: E402
from trtbuild.runtime.scheduler import Scheduler  # noqa: E402
from trtbuild.runtime.scheduling import SchedulerConfig, scheduling_config  # noqa: E402


def timed_run(runner: ModelRunner, requests: list[Request], config: SchedulerConfig) -> tuple[int, dict[int, list[float]]]:
    """Run the requests together; (engine steps, id(request) → the time of each token)."""
    times: dict[int, list[float]] = {id(r): [] for r in requests}
    for r in requests:
        r.on_tokens = lambda r, toks: times[id(r)].extend([time.perf_counter()] * len(toks))
    steps = 0
    scheduler = Scheduler(runner, config)
    for r in requests:
        scheduler.add(r)
    while scheduler.has_work():
        scheduler.step()
        steps += 1
    return steps, times


def summaries(runner: ModelRunner, prompts: list[list[int]], new_tokens: int, config: SchedulerConfig) -> dict:
    """Greedy summaries one at a time: decode tok/s (tokens after the first / their time), outputs."""
    outputs, decode_tokens, decode_s, steps = [], 0, 0.0, 0
    for p in prompts:
        r = Request(list(p), SamplingConfig(max_new_tokens=new_tokens, end_id=runner.config.pretrained_config.eos_token_id))
        n, times = timed_run(runner, [r], config)
        t = times[id(r)]
        steps += n
        outputs.append(r.output_ids)
        if len(t) > 1:
            decode_tokens += len(t) - 1
            decode_s += t[-1] - t[0]
    return {"outputs": outputs, "decode_tok_s": decode_tokens / decode_s, "decode_tokens": decode_tokens,
            "engine_steps": steps}


def bench_speculation(args, runner: ModelRunner, tokenizer_dir: Path) -> dict:
    records = select(load_records(dataset_file=args.dataset_file), 0, args.samples)
    samples = make_samples(records, runner.tokenizer, tokenizer_dir, args.max_input_length, True, True)
    prompts = [s.prompt_ids for s in samples]
    refs = [s.record.highlights for s in samples]
    summaries(runner, prompts[:1], 8, SchedulerConfig())  # warm-up
    plain_cfg = SchedulerConfig(kv_cache_reuse=False)
    runs = {"plain": (runner, plain_cfg)}
    for k in args.max_draft_len:
        runs[f"prompt_lookup_{k}"] = (runner, scheduling_config(runner, kv_cache_reuse=False, max_draft_len=k,
                                                                speculative_decoding_mode="prompt_lookup"))
    if args.draft_engine_dir:  # the target and its draft take turns: neither's threads spin
        target = ModelRunner.from_dir(args.engine_dir, num_threads=args.threads, spinning=False)
        runs["draft_engine"] = (target, scheduling_config(target, kv_cache_reuse=False, max_draft_len=args.draft_len,
                                                          draft_engine_dir=args.draft_engine_dir,
                                                          num_threads=args.threads))
    out = {}
    for name, (side, cfg) in runs.items():
        res = summaries(side, prompts, args.output_len, cfg)
        texts = [runner.tokenizer.decode(o, skip_special_tokens=True).strip() for o in res["outputs"]]
        res["rouge"] = rouge_scores(texts, refs)
        out[name] = res
        print(f"  {name}: decode {res['decode_tok_s']:.1f} tok/s, {res['engine_steps']} engine steps, "
              f"rouge1 {res['rouge'].get('rouge1', 0):.3f}", flush=True)
    for name in runs:
        out[name]["identical_to_plain"] = out[name]["outputs"] == out["plain"]["outputs"]
        out[name]["speedup"] = out[name]["decode_tok_s"] / out["plain"]["decode_tok_s"]
    for res in out.values():
        del res["outputs"]
    return out


def bench_reuse(args, runner: ModelRunner, tokenizer_dir: Path) -> dict:
    records = select(load_records(dataset_file=args.dataset_file), 1, args.questions + 1)
    system_ids = runner.tokenizer.encode(records[0].article, add_special_tokens=False).ids[:args.system_len]
    system = runner.tokenizer.decode(system_ids)
    questions = [f"Question {i}: what does the text say about {r.highlights.split()[0]}?" for i, r in
                 enumerate(records[1:])]

    def prompt(q: str) -> list[int]:
        text = apply_chat_template(tokenizer_dir, [{"role": "system", "content": system}, {"role": "user", "content": q}])
        return runner.tokenizer.encode(text, add_special_tokens=False).ids

    out = {}
    for name, reuse in (("without_reuse", False), ("with_reuse", True)):
        cfg = SchedulerConfig(kv_cache_reuse=reuse)
        scheduler = Scheduler(runner, cfg)
        first = Request(prompt("Summarize the text."), SamplingConfig(max_new_tokens=8, end_id=-1))
        scheduler.add(first)
        while scheduler.has_work():
            scheduler.step()
        ttfts = []
        for q in questions:
            r = Request(prompt(q), SamplingConfig(max_new_tokens=4, end_id=-1))
            seen: list[float] = []
            r.on_tokens = lambda r, toks: seen.append(time.perf_counter())
            start = time.perf_counter()
            scheduler.add(r)
            while scheduler.has_work():
                scheduler.step()
            ttfts.append(seen[0] - start)
        out[name] = {"ttft_ms_median": 1000 * statistics.median(ttfts), "prompt_tokens": len(prompt(questions[0]))}
        print(f"  {name}: TTFT {out[name]['ttft_ms_median']:.1f} ms ({out[name]['prompt_tokens']} prompt tokens)",
              flush=True)
    out["ratio"] = out["with_reuse"]["ttft_ms_median"] / out["without_reuse"]["ttft_ms_median"]
    return out


def chunk_engine(args) -> Path:
    """An engine with room for the streams and the long prompt (--streams + 1 slots), built from the
    fp32 checkpoint bench_engines.py caches when none is given."""
    if args.chunk_engine_dir:
        return Path(args.chunk_engine_dir)
    out = CACHE / f"smollm2-135m-instruct-fp32-b{args.streams + 1}-engine"
    if not (out / "config.json").is_file():
        from trtbuild.builder import build_engine
        from trtbuild.engine import BuildConfig

        build_engine(CACHE / "smollm2-135m-instruct-fp32-ckpt", out,
                     BuildConfig(max_batch_size=args.streams + 1, max_input_len=1024), progress=False)
    return out


def bench_chunking(args) -> dict:
    runner = ModelRunner.from_dir(chunk_engine(args), num_threads=args.threads)
    rng = np.random.default_rng(0)
    vocab = runner.vocab_size
    out = {}
    for name, chunk in (("one_shot", None), (f"chunked_{args.chunk}", args.chunk)):
        cfg = SchedulerConfig(kv_cache_reuse=False, max_num_tokens=chunk)
        streams = [Request(rng.integers(100, vocab - 1, 16).tolist(), SamplingConfig(max_new_tokens=400, end_id=-1))
                   for _ in range(args.streams)]
        long = Request(rng.integers(100, vocab - 1, args.long_len).tolist(), SamplingConfig(max_new_tokens=4, end_id=-1))
        times: dict[int, list[float]] = {id(r): [] for r in streams}
        for r in streams:
            r.on_tokens = lambda r, toks: times[id(r)].append(time.perf_counter())
        scheduler = Scheduler(runner, cfg)
        for r in streams:
            scheduler.add(r)
        for _ in range(20):  # the streams are running
            scheduler.step()
        arrived = time.perf_counter()
        scheduler.add(long)
        long_first: list[float] = []
        long.on_tokens = lambda r, toks: long_first.append(time.perf_counter())
        while not long_first:
            scheduler.step()
        for _ in range(20):  # and a while after
            scheduler.step()
        gaps = [b - a for t in times.values() for a, b in zip(t, t[1:]) if b >= arrived]
        out[name] = {"itl_ms_p50": 1000 * float(np.percentile(gaps, 50)), "itl_ms_p99": 1000 * float(np.percentile(gaps, 99)),
                     "itl_ms_max": 1000 * max(gaps), "long_ttft_ms": 1000 * (long_first[0] - arrived)}
        print(f"  {name}: ITL p50 {out[name]['itl_ms_p50']:.1f} ms, p99 {out[name]['itl_ms_p99']:.1f} ms, the long "
              f"prompt's TTFT {out[name]['long_ttft_ms']:.0f} ms", flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine_dir", default=str(CACHE / "smollm2-135m-instruct-fp32-engine"))
    p.add_argument("--draft_engine_dir", default=str(CACHE / "int4_g32") if (CACHE / "int4_g32").is_dir() else None)
    p.add_argument("--dataset_file", default=str(SHARED / "data" / "summarize.jsonl"))
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--max_input_length", type=int, default=700)
    p.add_argument("--output_len", type=int, default=100)
    p.add_argument("--max_draft_len", type=int, nargs="+", default=[4], help="prompt lookup's drafts per step")
    p.add_argument("--draft_len", type=int, default=3, help="the draft engine's drafts per step")
    p.add_argument("--system_len", type=int, default=500)
    p.add_argument("--questions", type=int, default=5)
    p.add_argument("--long_len", type=int, default=1000)
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--chunk_engine_dir", default=None, help="default: a --streams + 1 slot engine of the default model")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", default="speculation,reuse,chunking")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    runner = ModelRunner.from_dir(args.engine_dir, num_threads=args.threads)
    tokenizer_dir = Path(args.engine_dir) / "tokenizer"
    results = {"cpu": cpu_description(), "engine_dir": args.engine_dir, "settings": vars(args)}
    print(f"CPU: {results['cpu']}; engine {args.engine_dir}; {args.threads} threads", flush=True)
    only = args.only.split(",")
    if "speculation" in only:
        print("speculative decoding on summaries (batch 1):", flush=True)
        results["speculation"] = bench_speculation(args, runner, tokenizer_dir)
    if "reuse" in only:
        print(f"KV cache reuse ({args.system_len}-token system prompt):", flush=True)
        results["reuse"] = bench_reuse(args, runner, tokenizer_dir)
    if "chunking" in only:
        print(f"chunked prefill ({args.streams} streams, a {args.long_len}-token prompt arrives):", flush=True)
        results["chunking"] = bench_chunking(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    spec = results.get("speculation", {})
    if spec and not all(r["identical_to_plain"] for r in spec.values()):
        print("ERROR: speculative outputs differ from plain decoding", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
