"""Load on the real tritonserver: output tokens/s and p50/p99 time to first token at concurrency 1, 4, 8.

    python benchmarks/bench_triton.py [--engine_dir E] [--requests 16] [--max_tokens 64]

Streams token ids from the decoupled `tensorrt_llm` model over HTTP `generate_stream` (SSE);
each concurrency level runs the same prompts. Needs the triton venv (trtbuild-install-triton,
scripts/install_triton.sh in a checkout).
"""

from __future__ import annotations

import argparse
import http.client
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "triton_repo"), str(REPO / "triton_repo" / "client")]

from generate_stream import next_event, open_generate_stream  # noqa: E402
from launch_triton_server import TritonServer  # noqa: E402

from trtbuild.kernels import cpu_description  # noqa: E402

PROMPTS = ["The capital of France is", "Write a short poem about autumn leaves.",
           "Explain how a refrigerator works.", "List three uses of copper.",
           "What is the difference between weather and climate?", "Once upon a time, in a quiet village,",
           "Describe the water cycle in simple terms.", "Why is the sky blue?"]


def stream_one(port: int, prompt_ids: list[int], max_tokens: int) -> tuple[float, int, float]:
    """(time to first token, tokens, total seconds) of one streaming request."""
    body = {"input_ids": prompt_ids, "request_output_len": max_tokens, "streaming": True, "end_id": -1}
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    resp = open_generate_stream(conn, "tensorrt_llm", body)
    first, tokens = None, 0
    while (event := next_event(resp)) is not None:
        if "error" in event:
            raise RuntimeError(event["error"])
        n = int(event.get("sequence_length", 0) or 0)
        if n and first is None:
            first = time.perf_counter() - start
        tokens += n
    conn.close()
    return first or 0.0, tokens, time.perf_counter() - start


def run_level(port: int, prompts: list[list[int]], concurrency: int, requests: int, max_tokens: int) -> dict:
    jobs = [prompts[i % len(prompts)] for i in range(requests)]
    results: list[tuple[float, int, float]] = []
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if not jobs:
                    return
                p = jobs.pop()
            r = stream_one(port, p, max_tokens)
            with lock:
                results.append(r)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttfts = sorted(r[0] for r in results)
    p99 = ttfts[min(len(ttfts) - 1, int(round(0.99 * (len(ttfts) - 1))))]
    return {"concurrency": concurrency, "requests": len(results), "tokens": sum(r[1] for r in results),
            "tokens_per_s": sum(r[1] for r in results) / wall, "ttft_p50": statistics.median(ttfts), "ttft_p99": p99}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine_dir", default=None, help="default: build the fetched default model (fp32)")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max_tokens", type=int, default=64)
    p.add_argument("--levels", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--num_threads", type=int, default=2)
    args = p.parse_args()
    from trtbuild.tokenizer import load_tokenizer
    from trtbuild.serving import make_model_repo

    with tempfile.TemporaryDirectory() as tmp:
        engine = Path(args.engine_dir) if args.engine_dir else None
        if engine is None:
            from trtbuild.builder import build_engine
            from trtbuild.convert.converter import convert_checkpoint
            from trtbuild.engine import BuildConfig
            from trtbuild.fetch import fetch_model

            convert_checkpoint(fetch_model("smollm2-135m-instruct"), Path(tmp) / "ckpt", progress=False)
            engine = Path(tmp) / "engine"
            build_engine(Path(tmp) / "ckpt", engine, BuildConfig(max_batch_size=8, max_input_len=256,
                                                                 max_seq_len=512), progress=False)
        tok = load_tokenizer(engine / "tokenizer")
        prompts = [tok.encode(t).ids for t in PROMPTS]
        repo = make_model_repo(engine, Path(tmp) / "repo", decoupled=True, num_threads=args.num_threads)
        with TritonServer(repo, timeout=300) as server:
            stream_one(server.http_port, prompts[0], 4)  # warm up
            rows = [run_level(server.http_port, prompts, c, args.requests, args.max_tokens) for c in args.levels]
    print(f"CPU: {cpu_description()}")
    print("| concurrency | requests | output tokens/s | TTFT p50 s | TTFT p99 s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['requests']} | {r['tokens_per_s']:.1f} | {r['ttft_p50']:.3f} | "
              f"{r['ttft_p99']:.3f} |")
    base = rows[0]["tokens_per_s"]
    print(f"throughput at concurrency {rows[-1]['concurrency']} = {rows[-1]['tokens_per_s'] / base:.2f}x "
          f"concurrency {rows[0]['concurrency']}")


if __name__ == "__main__":
    main()
