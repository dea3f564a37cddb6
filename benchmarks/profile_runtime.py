#!/usr/bin/env python
"""Where a decode step of a trtbuild engine spends its time (and, with --ortgenai, a peer's).

Runs a greedy generation with onnxruntime's profiler on and prints:
  - per decode step: wall time, time inside session.run, and the rest (Python: binding, sampling,
    scheduling);
  - onnxruntime's per-operator time for decode steps (prefill excluded), summed by op type and
    for the heaviest single nodes.
With --ortgenai DIR, the same operator table for an onnxruntime-genai model dir (its own
profiler, switched on through genai_config's session options), so that the two graphs can be
compared op by op.

    python benchmarks/profile_runtime.py --engine_dir E [--batch 1] [--new_tokens 64] [--threads 2]
        [--ortgenai ~/.cache/trtbuild/peers/ortgenai-smollm2-135m-instruct-fp32]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def summarize_profile(path: Path, min_run: int, top: int) -> tuple[dict, list, float, int]:
    """Sum node kernel times of model runs number >= min_run (skips warm-up and prefill)."""
    events = json.loads(Path(path).read_text())
    runs = sorted([e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"],
                  key=lambda e: e["ts"])
    runs = runs[min_run:]
    if not runs:
        return {}, [], 0.0, 0
    start = runs[0]["ts"]
    run_total = sum(e["dur"] for e in runs)
    by_op: dict[str, float] = collections.defaultdict(float)
    by_node: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < start:
            continue
        op = e.get("args", {}).get("op_name", "?")
        by_op[op] += e["dur"]
        by_node[f"{e['name'][:-len('_kernel_time')]} ({op})"] += e["dur"]
    nodes = sorted(by_node.items(), key=lambda kv: -kv[1])[:top]
    return dict(by_op), nodes, run_total, len(runs)


def print_table(title: str, by_op: dict, nodes: list, run_total: float, nruns: int, tokens_per_run: int) -> None:
    kernel = sum(by_op.values())
    print(f"\n## {title}: {nruns} decode runs, {run_total / nruns / 1000:.2f} ms per run in onnxruntime "
          f"({kernel / nruns / 1000:.2f} ms in kernels, {(run_total - kernel) / nruns / 1000:.2f} ms between them)")
    print("| op type | ms per step | share of kernel time |\n|---|---|---|")
    for op, t in sorted(by_op.items(), key=lambda kv: -kv[1]):
        print(f"| {op} | {t / nruns / 1000:.3f} | {t / kernel * 100:.1f}% |")
    print("\nheaviest nodes (ms per step):")
    for name, t in nodes:
        print(f"  {t / nruns / 1000:7.3f}  {name}")


def profile_trtbuild(engine_dir: Path, batch: int, new_tokens: int, threads: int, top: int) -> None:
    import onnxruntime as ort

    from trtbuild.backends import onnxruntime_backend as backend
    from trtbuild.kernels import register
    from trtbuild.runtime import ModelRunner, SamplingConfig

    prof_dir = Path(tempfile.mkdtemp(prefix="trtbuild-prof-"))
    real_open = backend.open_session

    def open_profiled(engine_path, num_threads=None, kernels=False):
        so = ort.SessionOptions()
        if kernels:
            register(so)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.intra_op_num_threads = num_threads or backend.default_num_threads()
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        so.enable_profiling = True
        so.profile_file_prefix = str(prof_dir / "trtbuild")
        return ort.InferenceSession(str(engine_path), so, providers=["CPUExecutionProvider"])

    backend.open_session = open_profiled
    try:
        runner = ModelRunner.from_dir(engine_dir, num_threads=threads)
    finally:
        backend.open_session = real_open
    prompts = [[(1000 + 37 * i + j) % runner.vocab_size for j in range(32)] for i in range(batch)]
    runner.generate(prompts, SamplingConfig(max_new_tokens=4, end_id=None))  # warm-up: 4 runs
    warm_runs = 4

    # wall time per step, split into session.run and everything else
    session = runner.session
    inner = session.run_with_iobinding
    spent = {"run": 0.0, "n": 0}

    def timed_run(io, *a):
        t = time.perf_counter()
        inner(io, *a)
        spent["run"] += time.perf_counter() - t
        spent["n"] += 1

    session.run_with_iobinding = timed_run
    start = time.perf_counter()
    runner.generate(prompts, SamplingConfig(max_new_tokens=new_tokens, end_id=None))
    total = time.perf_counter() - start
    session.run_with_iobinding = inner
    n = spent["n"]
    print(f"# trtbuild engine {engine_dir}, batch {batch}, {new_tokens} new tokens, {threads} threads")
    print(f"wall {total * 1000 / n:.2f} ms per step ({batch * new_tokens / total:.1f} tok/s, profiler on); "
          f"session.run {spent['run'] * 1000 / n:.2f} ms; outside it (Python: inputs, binding, sampling, "
          f"scheduler) {(total - spent['run']) * 1000 / n:.2f} ms")
    path = session.end_profiling()
    by_op, nodes, run_total, nruns = summarize_profile(Path(path), warm_runs + 1, top)  # +1: prefill
    print_table("trtbuild onnxruntime profile", by_op, nodes, run_total, nruns, batch)


def profile_ortgenai(model_dir: Path, batch: int, new_tokens: int, threads: int, top: int) -> None:
    import onnxruntime_genai as og

    prof_dir = Path(tempfile.mkdtemp(prefix="ortgenai-prof-"))
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
        return
    by_op, nodes, run_total, nruns = summarize_profile(files[-1], 4 + 1, top)
    print_table("onnxruntime-genai profile", by_op, nodes, run_total, nruns, batch)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine_dir", type=Path, required=True)
    p.add_argument("--ortgenai", type=Path, help="an onnxruntime-genai model dir to profile the same way")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--top", type=int, default=12)
    a = p.parse_args(argv)
    profile_trtbuild(a.engine_dir, a.batch, a.new_tokens, a.threads, a.top)
    if a.ortgenai:
        profile_ortgenai(a.ortgenai, a.batch, a.new_tokens, a.threads, a.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
