#!/usr/bin/env python
"""Tensor parallelism on one machine: a tp-rank engine under mpiexec (one thread a rank) beside the
one-rank engine (all threads), on the same prompts, and what the collectives cost per token.

    python benchmarks/bench_ranks.py                                   # the Qwen2-0.5B shape, tp 2
    python benchmarks/bench_ranks.py --model_dir DIR --tp 2 --rounds 3 --json out.json

Engines are built from `--model_dir` (default: benchmarks/random_model.py's qwen2-0.5b, made if
missing) with the library and cached in ~/.cache/trtbuild/bench/. Each round runs the one-rank
engine, then the tp engine (`mpiexec -n TP`, this script's --worker mode: every rank steps, rank 0
times and reports), each alone on the machine: decode at batch 1 and 8 (--new_tokens after a
32-token prompt, forced), a --prefill_len prefill, medians over the rounds. The collectives' cost is
measured apart: MPI_Allreduce of one token's hidden state (2 a layer) and the gather of its logits,
timed under the same mpiexec.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def timings(engine_dir: Path, threads: int | None, new_tokens: int, prefill_len: int, batch: int) -> dict:
    """tok/s of decode b1, decode bN and prefill on this process's rank of the engine (every rank
    runs the same calls; rank 0's clock is the one reported)."""
    from trtbuild.runtime import ModelRunner, SamplingConfig

    runner = ModelRunner.from_dir(engine_dir, num_threads=threads)
    sampling = SamplingConfig(max_new_tokens=new_tokens, end_id=-1)
    vocab = min(runner.vocab_size, 30000)  # the same ids for every engine of a model
    one = [[(1000 + 7 * j) % vocab for j in range(32)]]
    many = [[(1000 + 37 * i + 7 * j) % vocab for j in range(32)] for i in range(batch)]
    long = [[(500 + 13 * j) % vocab for j in range(prefill_len)]]
    runner.generate(one, SamplingConfig(max_new_tokens=4, end_id=-1))  # warm-up

    def timed(fn) -> float:
        if runner.world is not None:
            runner.world.comm.Barrier()
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    b1 = new_tokens / timed(lambda: runner.generate(one, sampling))
    bn = batch * new_tokens / timed(lambda: runner.generate(many, sampling))
    prefill = max(prefill_len / timed(lambda: runner.prefill(long)) for _ in range(3))
    return {"b1": b1, "bN": bn, "prefill": prefill,
            "threads": runner.session.get_session_options().intra_op_num_threads}


def collective_cost(hidden: int, layers: int, vocab_per_rank: int, repeats: int = 200) -> dict:
    """µs per token of the collectives a tp engine runs: 2 AllReduce of [hidden] a layer, one
    AllGather of the logits block."""
    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    x, y = np.ones(hidden, np.float32), np.empty(hidden, np.float32)
    block = np.ones(vocab_per_rank, np.float32)
    gathered = np.empty(vocab_per_rank * comm.Get_size(), np.float32)
    for _ in range(20):
        comm.Allreduce(x, y)
    comm.Barrier()
    start = time.perf_counter()
    for _ in range(repeats):
        comm.Allreduce(x, y)
    allreduce = (time.perf_counter() - start) / repeats
    comm.Barrier()
    start = time.perf_counter()
    for _ in range(repeats // 4):
        comm.Allgather(block, gathered)
    allgather = (time.perf_counter() - start) / (repeats // 4)
    return {"allreduce_us": allreduce * 1e6, "allgather_us": allgather * 1e6,
            "per_token_us": (2 * layers * allreduce + allgather) * 1e6}


def worker(a: argparse.Namespace) -> None:
    """One rank under mpiexec: the timings, then the collectives; rank 0 writes them."""
    from trtbuild.engine import load_engine_config
    from trtbuild.runtime.world import launched_rank

    result = timings(Path(a.engine_dir), None, a.new_tokens, a.prefill_len, a.batch)
    pc = load_engine_config(Path(a.engine_dir)).pretrained_config
    tp = pc.mapping.tp_size
    result["collectives"] = collective_cost(pc.hidden_size, pc.num_hidden_layers, -(-pc.vocab_size // tp))
    if launched_rank() == 0:
        Path(a.out).write_text(json.dumps(result))


def ensure_engines(model_dir: Path, tp: int, max_input_len: int, cache_dir: Path) -> tuple[Path, Path]:
    from trtbuild.builder import build_engine
    from trtbuild.convert.converter import convert_checkpoint
    from trtbuild.engine import BuildConfig

    root = cache_dir / "bench"
    ckpt = root / f"{model_dir.name}-fp32-ckpt"
    if not (ckpt / "config.json").is_file():
        convert_checkpoint(model_dir, ckpt, "float32", force=True)
    limits = BuildConfig(max_batch_size=8, max_input_len=max_input_len, max_seq_len=2 * max_input_len)
    engines = []
    for size in (1, tp):
        engine = root / f"{model_dir.name}-fp32-tp{size}-engine"
        if not (engine / "config.json").is_file():
            build_engine(ckpt, engine, limits, force=True, tp_size=size)
        engines.append(engine)
    return engines[0], engines[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", type=Path, default=Path.home() / ".cache" / "trtbuild" / "models" / "random-qwen2-0.5b")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prefill_len", type=int, default=512)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--cache_dir", type=Path, default=Path.home() / ".cache" / "trtbuild",
                   help="where the engines are built and kept (bench/)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--engine_dir", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a)
        return 0
    from trtbuild.kernels import cpu_description

    if not (a.model_dir / "config.json").is_file():
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "random_model.py"), "qwen2-0.5b"], check=True)
    one, split = ensure_engines(a.model_dir, a.tp, max(a.prefill_len, 64), a.cache_dir)
    mpiexec = Path(sys.executable).parent / "mpiexec"
    cores = len(os.sched_getaffinity(0))
    rows: dict[str, list[dict]] = {"tp1": [], f"tp{a.tp}": []}
    for r in range(a.rounds):
        rows["tp1"].append(timings(one, cores, a.new_tokens, a.prefill_len, a.batch))
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "rank0.json"
            subprocess.run([str(mpiexec), "-n", str(a.tp), sys.executable, __file__, "--worker", "--engine_dir",
                            str(split), "--out", str(out), "--new_tokens", str(a.new_tokens), "--batch",
                            str(a.batch), "--prefill_len", str(a.prefill_len)], check=True)
            rows[f"tp{a.tp}"].append(json.loads(out.read_text()))
        print(f"round {r + 1}/{a.rounds}: " + ", ".join(
            f"{name} b1 {v[-1]['b1']:.1f} b{a.batch} {v[-1]['bN']:.1f} prefill {v[-1]['prefill']:.0f}"
            for name, v in rows.items()), flush=True)
    print(f"\n{cpu_description()}; {a.model_dir.name} fp32; tp1 with {cores} threads, tp{a.tp} with "
          f"{rows[f'tp{a.tp}'][0]['threads']} a rank; median of {a.rounds} rounds\n")
    print(f"| engine | decode b1 tok/s | decode b{a.batch} tok/s | prefill {a.prefill_len} tok/s |")
    print("|---|---|---|---|")
    med = {name: {k: statistics.median(r[k] for r in v) for k in ("b1", "bN", "prefill")} for name, v in rows.items()}
    for name, m in med.items():
        print(f"| {name} | {m['b1']:.1f} | {m['bN']:.1f} | {m['prefill']:.0f} |")
    c = rows[f"tp{a.tp}"][-1]["collectives"]
    print(f"\ncollectives at tp{a.tp}: Allreduce of a token's hidden state {c['allreduce_us']:.1f} us, the logits "
          f"gather {c['allgather_us']:.1f} us: {c['per_token_us'] / 1000:.2f} ms a decoded token "
          f"({c['per_token_us'] / 1000 / (1000 / med[f'tp{a.tp}']['b1']):.0%} of a tp{a.tp} step)")
    if a.json:
        a.json.write_text(json.dumps({"cpu": cpu_description(), "rows": rows, "median": med}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
