#!/usr/bin/env python
"""Where the time of a trtbuild engine goes (and, with --ortgenai, a peer's), on this CPU.

Prints, for decode steps (batch --batch, after a 32-token prompt):
  - the wall time of a step without the profiler, split into session.run, sampling (logits row →
    token) and the rest of Python (inputs, binding, scheduler);
  - the weights a token reads at the measured read bandwidth against the step (the rest is
    everything but reading weights: kernels' compute, the graph's small ops, the If, threads);
  - the step with onnxruntime's intra-op threads spinning between kernels (the default) and not;
  - onnxruntime's per-operator time for decode steps, summed by op type and for the heaviest nodes;
and the same per-operator table for one --prefill_len-token prefill (attention, GEMMs, quantize
kernels). With --ortgenai DIR, the decode table for an onnxruntime-genai model dir (its own
profiler, switched on through genai_config's session options), to compare the graphs op by op.

    python benchmarks/profile_runtime.py --engine_dir E [--batch 1] [--new_tokens 64] [--threads 2]
        [--prefill_len 512] [--ortgenai ~/.cache/trtbuild/peers/ortgenai-smollm2-135m-instruct-int4]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_engines, beside this file


CONTAINER_OPS = ("If", "Loop", "Scan")


def summarize_profile(path: Path, min_run: int, top: int, max_run: int | None = None) -> tuple[dict, list, float, int]:
    """Sum node kernel times of model runs number min_run .. max_run - 1 (skips warm-up and prefill)."""
    events = json.loads(Path(path).read_text())
    runs = sorted([e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"],
                  key=lambda e: e["ts"])
    runs = runs[min_run:max_run]
    if not runs:
        return {}, [], 0.0, 0
    start, end = runs[0]["ts"], runs[-1]["ts"] + runs[-1]["dur"]
    run_total = sum(e["dur"] for e in runs)
    by_op: dict[str, float] = collections.defaultdict(float)
    by_node: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or not start <= e["ts"] <= end:
            continue
        op = e.get("args", {}).get("op_name", "?")
        if op in CONTAINER_OPS:  # its time is its subgraph's nodes, which are listed themselves
            continue
        by_op[op] += e["dur"]
        by_node[f"{e['name'][:-len('_kernel_time')]} ({op})"] += e["dur"]
    nodes = sorted(by_node.items(), key=lambda kv: -kv[1])[:top]
    return dict(by_op), nodes, run_total, len(runs)


def print_table(title: str, by_op: dict, nodes: list, run_total: float, nruns: int, what: str = "decode") -> None:
    kernel = sum(by_op.values())
    print(f"\n## {title}: {nruns} {what} runs, {run_total / nruns / 1000:.2f} ms per run in onnxruntime "
          f"({kernel / nruns / 1000:.2f} ms in kernels, {(run_total - kernel) / nruns / 1000:.2f} ms between them)")
    print("| op type | ms per step | share of kernel time |\n|---|---|---|")
    for op, t in sorted(by_op.items(), key=lambda kv: -kv[1]):
        print(f"| {op} | {t / nruns / 1000:.3f} | {t / kernel * 100:.1f}% |")
    print("\nheaviest nodes (ms per step):")
    for name, t in nodes:
        print(f"  {t / nruns / 1000:7.3f}  {name}")


def open_runner(engine_dir: Path, threads: int, profile_prefix: Path | None = None, spinning: bool = True):
    """A ModelRunner whose session is opened as the runtime opens it, optionally with onnxruntime's
    profiler on or its intra-op threads not spinning between kernels."""
    import onnxruntime as ort

    from trtbuild.backends import onnxruntime_backend as backend
    from trtbuild.kernels import register
    from trtbuild.runtime import ModelRunner

    real_open = backend.open_session

    def open_session(engine_path, num_threads=None, kernels=False, spinning=True):
        so = ort.SessionOptions()
        if kernels:
            register(so)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.intra_op_num_threads = num_threads or backend.default_num_threads()
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        if not spinning:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if profile_prefix is not None:
            so.enable_profiling = True
            so.profile_file_prefix = str(profile_prefix)
        return ort.InferenceSession(str(engine_path), so, providers=["CPUExecutionProvider"])

    backend.open_session = open_session
    try:
        return ModelRunner.from_dir(engine_dir, num_threads=threads, spinning=spinning)
    finally:
        backend.open_session = real_open


def time_decode(runner, prompts: list[list[int]], new_tokens: int) -> dict[str, float]:
    """ms per decode step: wall, inside session.run, sampling (Request.sample: logits row → token),
    and the rest of Python (inputs, binding, scheduler)."""
    from trtbuild.runtime import SamplingConfig
    from trtbuild.runtime.request import Request

    session = runner.session
    inner, sample = session.run_with_iobinding, Request.sample
    spent = {"run": 0.0, "sampling": 0.0, "steps": 0}

    def timed_run(io, *a):
        t = time.perf_counter()
        inner(io, *a)
        spent["run"] += time.perf_counter() - t
        spent["steps"] += 1

    def timed_sample(request, logits):
        t = time.perf_counter()
        token = sample(request, logits)
        spent["sampling"] += time.perf_counter() - t
        return token

    session.run_with_iobinding, Request.sample = timed_run, timed_sample
    try:
        start = time.perf_counter()
        runner.generate(prompts, SamplingConfig(max_new_tokens=new_tokens, end_id=None))
        wall = time.perf_counter() - start
    finally:
        session.run_with_iobinding, Request.sample = inner, sample
    n = spent["steps"]
    return {"wall": wall * 1000 / n, "run": spent["run"] * 1000 / n, "sampling": spent["sampling"] * 1000 / n,
            "python": (wall - spent["run"] - spent["sampling"]) * 1000 / n,
            "tok_s": len(prompts) * new_tokens / wall}


def profile_trtbuild(engine_dir: Path, batch: int, new_tokens: int, threads: int, top: int, prefill_len: int) -> None:
    from bench_engines import onnx_weight_bytes, read_bandwidth

    from trtbuild.kernels import cpu_description
    from trtbuild.runtime import SamplingConfig

    print(f"# trtbuild engine {engine_dir}, batch {batch}, {new_tokens} new tokens, {threads} threads, "
          f"{cpu_description()}")
    # 1. a decode step without the profiler: where the wall time goes, and what the weights' read costs
    times = {}
    for spinning in (True, False):
        runner = open_runner(engine_dir, threads, spinning=spinning)
        prompts = [[(1000 + 37 * i + j) % runner.vocab_size for j in range(32)] for i in range(batch)]
        runner.generate(prompts, SamplingConfig(max_new_tokens=4, end_id=None))  # warm-up
        times[spinning] = min((time_decode(runner, prompts, new_tokens) for _ in range(3)), key=lambda t: t["wall"])
        del runner
    t = times[True]
    weight_bytes = onnx_weight_bytes(engine_dir / "rank0.engine")
    bandwidth = read_bandwidth(threads, 256 << 20)
    read_ms = weight_bytes / bandwidth * 1000
    print(f"decode step {t['wall']:.2f} ms ({t['tok_s']:.1f} tok/s, best of 3): session.run {t['run']:.2f} ms, "
          f"sampling {t['sampling']:.3f} ms, other Python (inputs, binding, scheduler) {t['python']:.3f} ms")
    print(f"weights read per token {weight_bytes / 1e6:.1f} MB at {bandwidth / 1e9:.1f} GB/s = {read_ms:.2f} ms: "
          f"{read_ms / t['wall'] * 100:.0f}% of the step; everything else {t['wall'] - read_ms:.2f} ms")
    print(f"intra-op threads spinning between kernels (the default): {t['wall']:.2f} ms a step; not spinning "
          f"(wake-up on every kernel): {times[False]['wall']:.2f} ms")

    # 2. onnxruntime's profile of decode steps and of one prefill
    # the profile files go in a temporary dir, removed however the profile ends
    with tempfile.TemporaryDirectory(prefix="trtbuild-prof-", ignore_cleanup_errors=True) as tmp:
        prof_dir = Path(tmp)
        runner = open_runner(engine_dir, threads, profile_prefix=prof_dir / "trtbuild")
        prompts = [[(1000 + 37 * i + j) % runner.vocab_size for j in range(32)] for i in range(batch)]
        runner.generate(prompts, SamplingConfig(max_new_tokens=4, end_id=None))  # warm-up: 4 runs
        warm_runs = 4
        runner.generate(prompts, SamplingConfig(max_new_tokens=new_tokens, end_id=None))
        decode_runs = new_tokens
        long_prompt = [(2000 + 13 * j) % runner.vocab_size for j in range(prefill_len)]
        runner.prefill([long_prompt])  # warm-up of the prefill shapes
        runner.prefill([long_prompt])
        path = Path(runner.session.end_profiling())
        first = warm_runs + 1  # +1: the generation's prefill
        by_op, nodes, run_total, nruns = summarize_profile(path, first, top, first + decode_runs - 1)
        print_table("trtbuild onnxruntime profile, decode", by_op, nodes, run_total, nruns)
        if nruns:
            print(f"(the profiler's own cost: {run_total / nruns / 1000 - t['run']:.2f} ms a step over session.run "
                  f"without it, spread over every node: small nodes' figures are inflated most)")
        by_op, nodes, run_total, nruns = summarize_profile(path, -1, top)  # the last run: the second prefill
        print_table(f"trtbuild onnxruntime profile, one {prefill_len}-token prefill", by_op, nodes, run_total, nruns,
                    "prefill")


def profile_ortgenai(model_dir: Path, batch: int, new_tokens: int, threads: int, top: int) -> None:
    import onnxruntime_genai as og

    # the profile files go in a temporary dir, removed however the profile ends
    with tempfile.TemporaryDirectory(prefix="ortgenai-prof-", ignore_cleanup_errors=True) as tmp:
        prof_dir = Path(tmp)
        config = og.Config(str(model_dir))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1,
            "enable_profiling": str(prof_dir / "ortgenai")}}}}))
        model = og.Model(config)
        prompts = np.array([[(1000 + 37 * i + j) % 49152 for j in range(32)] for i in range(batch)], np.int32)

        def run(n):
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=32 + n, min_length=32 + n, batch_size=batch, do_sample=False)
            gen = og.Generator(model, params)
            gen.append_tokens(prompts)
            while not gen.is_done():
                gen.generate_next_token()

        run(4)
        start = time.perf_counter()
        run(new_tokens)
        total = time.perf_counter() - start
        print(f"\n# onnxruntime-genai {model_dir}: {batch * new_tokens / total:.1f} tok/s (profiler on)")
        del model  # the profile file is written when the session closes
        import gc

        gc.collect()
        files = sorted(prof_dir.glob("*.json"), key=os.path.getmtime)
        if not files:
            print("(no profile written)")
        else:
            by_op, nodes, run_total, nruns = summarize_profile(files[-1], 4 + 1, top)
            print_table("onnxruntime-genai profile", by_op, nodes, run_total, nruns)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine_dir", type=Path, required=True)
    p.add_argument("--ortgenai", type=Path, help="an onnxruntime-genai model dir to profile the same way")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--prefill_len", type=int, default=512, help="tokens of the profiled prefill")
    a = p.parse_args(argv)
    profile_trtbuild(a.engine_dir, a.batch, a.new_tokens, a.threads, a.top, a.prefill_len)
    if a.ortgenai:
        profile_ortgenai(a.ortgenai, a.batch, a.new_tokens, a.threads, a.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
