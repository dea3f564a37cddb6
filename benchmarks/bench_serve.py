#!/usr/bin/env python
"""Our OpenAI-compatible server beside llama-cpp-python's, on the same streamed chat requests.

Every server is started as a subprocess on a free port, one at a time (never two together: they
would share the cores), warmed up with one request, then sent the same chat completions at each
concurrency level (default 1, 4, 8, 16; each level runs max(16, 2 x concurrency) requests with
that many in flight, a new one sent as soon as one ends), then stopped:
  - ours: `trtbuild-serve ENGINE_DIR --served_model_name NAME --num_threads T` for each
    `--engine NAME=DIR` (default: the int4 g32 and fp32 SmolLM2-135M engines of bench/ in the cache);
  - llama.cpp: `python -m llama_cpp.server --model FILE --n_threads T --chat_format
    chat_template.default ...` for each `--gguf NAME=FILE` (default: the q4_0 and f32 GGUFs of peers/),
    so that it applies the chat template of the GGUF's own metadata, as ours applies the engine's.

Each request is one user message, "Summarize this article in a few sentences:" and an article of
../shared/data/summarize.jsonl cut after --words words (default 250: 330-500 prompt tokens,
median 390, with SmolLM2's tokenizer and chat template), streamed over SSE with temperature 0 and
--max_tokens (default 64). Every server gets the same requests in the same order; each article is
sent once in a run (the warm-up gets the first, then each level the next ones), so no request
finds its prompt in a server's cache.

Figures per level: output tokens/s (all output tokens / the level's wall time), time to first token
(first chunk with content) p50 / p99, inter-token latency (the gaps between later content chunks,
per token) p50 / p99. Output tokens come from the final usage chunk (stream_options.include_usage)
when the server sends one (ours does), else max_tokens when finish_reason is "length", else the
number of content chunks (llama_cpp.server sends one token a chunk and no usage).

Things to know when reading the table: llama_cpp.server runs one request at a time (a lock around
its one Llama object), so at concurrency > 1 requests queue and their time to first token grows;
it is started with --interrupt_requests false (by default a waiting request cuts the streaming one
short) and --logits_all false (its default computes the lm_head over every prompt token, for
logprobs, which no request here asks for). Our engines batch up to their max_batch_size (8 for the
default ones): at concurrency 16, 8 run and 8 queue. The client (this process) runs on the same
cores as the server.

    python benchmarks/bench_serve.py                      # default engines and GGUFs, 1,4,8,16
    python benchmarks/bench_serve.py --quick              # smoke run: concurrency 1,2, 2 requests, 8 tokens
    python benchmarks/bench_serve.py --engine int4=/path/to/engine --gguf q4_0=/path/to/x.gguf --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import asyncio
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from trtbuild.kernels import cpu_description

CACHE = Path.home() / ".cache" / "trtbuild"
DEFAULT_ENGINES = {"int4": CACHE / "bench" / "int4_g32", "fp32": CACHE / "bench" / "smollm2-135m-instruct-fp32-engine"}
DEFAULT_GGUFS = {"q4_0": CACHE / "peers" / "smollm2-135m-instruct-q4_0.gguf",
                 "f32": CACHE / "peers" / "smollm2-135m-instruct-f32.gguf"}
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "summarize.jsonl"
INSTRUCTION = "Summarize this article in a few sentences:\n\n"
LLAMA_SERVER_MODULES = ("llama_cpp", "sse_starlette", "starlette_context", "pydantic_settings")
LLAMA_SERVER_INSTALL = "pip install llama-cpp-python==0.3.36 sse-starlette starlette-context pydantic-settings"
OURS, LLAMACPP = "trtbuild-serve", "llama_cpp.server"
# The issue's target: our int4 at concurrency 8 >= 1.5x llama.cpp q4_0's output tokens/s, TTFT no worse.
TARGET = ("int4", "q4_0", 8, 1.5)


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ requests

@dataclass
class Prompt:
    article_id: str
    text: str


def truncate_words(text: str, words: int) -> str:
    """`text` up to the end of its `words`-th word, its own whitespace (paragraph breaks) kept."""
    ends = [m.end() for m in re.finditer(r"\S+", text)]
    return text if len(ends) <= words else text[:ends[words - 1]]


def load_prompts(path: Path, words: int) -> list[Prompt]:
    """Every article of summarize.jsonl as a user message, cut after `words` words."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [Prompt(r["id"], INSTRUCTION + truncate_words(r["article"], words)) for r in rows]


def plan_requests(prompts: list[Prompt], counts: dict[int, int]) -> tuple[Prompt, dict[int, list[Prompt]]]:
    """The warm-up's prompt, then each level's, each article used once in the whole run (cycling,
    with a warning, only when there are fewer articles than requests). llama.cpp keeps the KV cache
    of the last prompt it ran and skips the prefill of a prompt that starts with it: a level that
    repeated an earlier level's article could get its first token for free."""
    need = 1 + sum(counts.values())
    if need > len(prompts):
        log(f"{need} requests but {len(prompts)} articles: some articles are sent twice")
    order = [prompts[i % len(prompts)] for i in range(need)]
    plan, k = {}, 1
    for c, n in counts.items():
        plan[c], k = order[k:k + n], k + n
    return order[0], plan


# ------------------------------------------------------------------------------------------ servers

@dataclass
class Server:
    """One server to measure: our engine dir or a GGUF for llama_cpp.server."""

    kind: str  # OURS or LLAMACPP
    name: str  # what the precision column shows, and the model name requests send
    path: Path
    detail: str = ""  # the engine's quant_algo / the GGUF's file name
    max_batch_size: int | None = None  # ours: the engine's; llama_cpp.server: 1 request at a time
    extra: tuple[str, ...] = ()  # ours: more trtbuild-serve flags (--serve_flags)

    def command(self, port: int, threads: int, n_ctx: int) -> list[str]:
        if self.kind == OURS:
            exe = Path(sys.executable).with_name("trtbuild-serve")
            head = [str(exe)] if exe.is_file() else (
                [shutil.which("trtbuild-serve")] if shutil.which("trtbuild-serve")
                else [sys.executable, "-m", "trtbuild.serve.cli"])
            return head + [str(self.path), "--port", str(port), "--served_model_name", self.name,
                           "--num_threads", str(threads), *self.extra]
        return [sys.executable, "-m", "llama_cpp.server", "--model", str(self.path), "--model_alias", self.name,
                "--host", "127.0.0.1", "--port", str(port), "--n_threads", str(threads),
                "--n_threads_batch", str(threads), "--n_ctx", str(n_ctx), "--chat_format", "chat_template.default",
                "--interrupt_requests", "false", "--logits_all", "false"]

    @property
    def ready_path(self) -> str:
        return "/health" if self.kind == OURS else "/v1/models"


def engine_server(name: str, engine_dir: Path) -> Server:
    """Our engine, its precision read from its config.json (quant_algo, else the dtype)."""
    config = json.loads((engine_dir / "config.json").read_text())
    pc, bc = config["pretrained_config"], config.get("build_config", {})
    q = pc.get("quantization") or {}
    if q.get("quant_algo"):
        detail = q["quant_algo"] + (f" g{q['group_size']}" if q.get("per_group") and q.get("group_size") else "")
    else:
        detail = str(pc.get("dtype", "?")).replace("float", "fp")
    if q.get("kv_cache_quant_algo"):
        detail += f" + {q['kv_cache_quant_algo']} KV"
    return Server(OURS, name, engine_dir, detail, bc.get("max_batch_size"))


def gguf_server(name: str, file: Path) -> Server:
    return Server(LLAMACPP, name, file, file.name, 1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(cmd: list[str], log_file) -> subprocess.Popen:
    """The server in a session (process group) of its own, so that stop_server also ends what it
    starts (our engine's ranks)."""
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_engines.py: spin-waiting OpenMP on 2 shared cores
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def log_tail(log_file, lines: int = 30) -> str:
    log_file.flush()
    log_file.seek(0)
    return "\n".join(log_file.read().decode(errors="replace").splitlines()[-lines:])


def wait_ready(proc: subprocess.Popen, url: str, timeout: float, log_file) -> float:
    """Seconds until GET `url` answers 200; raises if the server exits or the time runs out."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}:\n{log_tail(log_file)}")
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return time.perf_counter() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"server not ready after {timeout:.0f} s:\n{log_tail(log_file)}")


def stop_server(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM (a clean shutdown), SIGKILL to its process group after `timeout`; then SIGKILL to
    whatever of that group is still there."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log(f"server {proc.pid} did not stop in {timeout:.0f} s: killing it")
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ------------------------------------------------------------------------------------------ one request

@dataclass
class RequestResult:
    article_id: str
    ttft: float  # s, to the first chunk with content
    duration: float  # s, to the end of the stream
    tokens: int
    counted_by: str  # "usage", "length" (finish_reason length: max_tokens) or "chunks"
    chunks: int  # content chunks
    finish_reason: str | None
    prompt_tokens: int | None
    text: str
    itls: list[float] = field(default_factory=list)  # s per token, after the first chunk


def per_token_gaps(times: list[float], texts: list[str], tokens: int) -> list[float]:
    """Inter-token latencies from the arrival times of the content chunks: each gap once per token
    of its chunk, divided by them. A chunk's tokens are 1 when there are as many tokens as chunks,
    else the tokens apportioned by characters (a server that fell behind sends several at once)."""
    if len(times) < 2:
        return []
    if tokens == len(texts):
        counts = [1.0] * len(texts)
    else:
        chars = sum(len(t) for t in texts)
        counts = [max(1e-9, tokens * len(t) / chars) for t in texts]
    out: list[float] = []
    for k in range(1, len(times)):
        gap = (times[k] - times[k - 1]) / counts[k]
        out += [gap] * max(1, round(counts[k]))
    return out


async def stream_chat(client: httpx.AsyncClient, model: str, prompt: Prompt, max_tokens: int) -> RequestResult:
    """One streamed chat completion: the arrival time of each content chunk, the usage if sent."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt.text}], "stream": True,
            "stream_options": {"include_usage": True}, "temperature": 0, "max_tokens": max_tokens}
    times: list[float] = []
    texts: list[str] = []
    usage, finish = None, None
    start = time.perf_counter()
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:500]}")
        async for line in resp.aiter_lines():
            now = time.perf_counter()
            if not line.startswith("data:"):
                continue  # blank separators, ": ping" comments
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(f"server error: {event['error']}")
            usage = event.get("usage") or usage
            for choice in event.get("choices") or []:
                content = (choice.get("delta") or {}).get("content")
                if content:
                    times.append(now)
                    texts.append(content)
                finish = choice.get("finish_reason") or finish
    end = time.perf_counter()
    if usage and usage.get("completion_tokens") is not None:
        tokens, how = int(usage["completion_tokens"]), "usage"
    elif finish == "length":
        tokens, how = max_tokens, "length"
    else:
        tokens, how = len(texts), "chunks"
    return RequestResult(prompt.article_id, (times[0] if times else end) - start, end - start, tokens, how,
                         len(texts), finish, (usage or {}).get("prompt_tokens"), "".join(texts),
                         per_token_gaps(times, texts, tokens))


# ------------------------------------------------------------------------------------------ one level

def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100), linear between the closest ranks (numpy's default)."""
    if not values:
        return None
    v = sorted(values)
    pos = (len(v) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def ms(x: float | None) -> float | None:
    return None if x is None else 1000 * x


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    wall_s: float
    output_tokens: int
    tokens_per_s: float
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    itl_p50_ms: float | None
    itl_p99_ms: float | None
    latency_p50_ms: float | None  # request start to stream end
    counted_by: dict[str, int]
    prompt_tokens_mean: float | None  # when the server reports it
    per_request: list[dict]


def summarize_level(concurrency: int, wall: float, results: list[RequestResult]) -> LevelResult:
    tokens = sum(r.tokens for r in results)
    ttfts = [r.ttft for r in results]
    itls = [x for r in results for x in r.itls]
    prompt_tokens = [r.prompt_tokens for r in results if r.prompt_tokens is not None]
    per_request = [{"article_id": r.article_id, "ttft_ms": ms(r.ttft), "duration_ms": ms(r.duration),
                    "tokens": r.tokens, "counted_by": r.counted_by, "chunks": r.chunks,
                    "finish_reason": r.finish_reason, "prompt_tokens": r.prompt_tokens, "text": r.text}
                   for r in results]
    return LevelResult(concurrency, len(results), wall, tokens, tokens / wall, ms(percentile(ttfts, 50)),
                       ms(percentile(ttfts, 99)), ms(percentile(itls, 50)), ms(percentile(itls, 99)),
                       ms(percentile([r.duration for r in results], 50)), dict(Counter(r.counted_by for r in results)),
                       sum(prompt_tokens) / len(prompt_tokens) if prompt_tokens else None, per_request)


async def run_level(base_url: str, model: str, prompts: list[Prompt], concurrency: int, max_tokens: int,
                    timeout: float) -> LevelResult:
    """`len(prompts)` requests, `concurrency` in flight at once (each worker sends its next request
    as soon as its last one ends); the wall time runs from the first send to the last end."""
    jobs = iter(enumerate(prompts))
    results: list[RequestResult | None] = [None] * len(prompts)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(timeout), limits=limits) as client:

        async def worker() -> None:
            for i, prompt in jobs:
                results[i] = await stream_chat(client, model, prompt, max_tokens)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return summarize_level(concurrency, wall, [r for r in results if r is not None])


# ------------------------------------------------------------------------------------------ one server

def measure_server(server: Server, a: argparse.Namespace, prompts: dict[int, list[Prompt]], warm: Prompt) -> dict:
    """Start `server`, warm it up, run every level, stop it (also on error). Its JSON record."""
    port = free_port()
    cmd = server.command(port, a.num_threads, a.n_ctx)
    record = {"kind": server.kind, "name": server.name, "path": str(server.path), "precision": server.detail,
              "max_batch_size": server.max_batch_size, "command": cmd, "levels": []}
    base = f"http://127.0.0.1:{port}"
    if a.log_dir:
        a.log_dir.mkdir(parents=True, exist_ok=True)
    with (open(a.log_dir / f"{server.kind}-{server.name}.log", "w+b") if a.log_dir
          else tempfile.TemporaryFile()) as log_file:
        log(f"starting {server.kind} {server.name}: {' '.join(cmd)}")
        proc = start_server(cmd, log_file)
        try:
            record["startup_s"] = wait_ready(proc, base + server.ready_path, a.start_timeout, log_file)
            log(f"  ready in {record['startup_s']:.1f} s; warming up")
            warm_up = asyncio.run(run_level(base, server.name, [warm], 1, min(a.max_tokens, 8), a.timeout))
            record["warm_up_ms"] = warm_up.per_request[0]["duration_ms"]
            for c in a.levels:
                time.sleep(a.pause)
                level = asyncio.run(run_level(base, server.name, prompts[c], c, a.max_tokens, a.timeout))
                record["levels"].append(asdict(level))
                log(f"  concurrency {c}: {level.tokens_per_s:.1f} tok/s, TTFT p50 {fmt(level.ttft_p50_ms, 0)} ms, "
                    f"ITL p50 {fmt(level.itl_p50_ms)} ms ({level.requests} requests, {level.output_tokens} tokens)")
        except Exception as e:  # noqa: BLE001 - recorded; the other servers still run
            record["error"] = f"{type(e).__name__}: {e}"
            log(f"  {server.kind} {server.name} failed: {record['error']}")
        finally:
            stop_server(proc)
            record["exit_code"] = proc.returncode
    return record


# ------------------------------------------------------------------------------------------ report

def fmt(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def table(records: list[dict]) -> list[str]:
    lines = [("| server | precision | concurrency | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms "
              "| requests |"), "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        for lv in r["levels"]:
            lines.append(f"| {r['kind']} | {r['name']} | {lv['concurrency']} | {lv['tokens_per_s']:.1f} | "
                         f"{fmt(lv['ttft_p50_ms'], 0)} | {fmt(lv['ttft_p99_ms'], 0)} | {fmt(lv['itl_p50_ms'])} | "
                         f"{fmt(lv['itl_p99_ms'])} | {lv['requests']} |")
    return lines


def ratios(records: list[dict], pairs: list[tuple[str, str]]) -> tuple[list[str], list[dict]]:
    """Ours / peer's output tok/s, TTFT p50 and p99 at each concurrency both ran, for each pair."""
    by_name = {(r["kind"], r["name"]): r for r in records}
    lines, rows = [], []
    for ours, peer in pairs:
        a, b = by_name.get((OURS, ours)), by_name.get((LLAMACPP, peer))
        if not a or not b:
            continue
        peer_levels = {lv["concurrency"]: lv for lv in b["levels"]}
        for lv in a["levels"]:
            pl = peer_levels.get(lv["concurrency"])
            if pl is None:
                continue
            row = {"ours": ours, "peer": peer, "concurrency": lv["concurrency"],
                   "throughput": lv["tokens_per_s"] / pl["tokens_per_s"],
                   "ttft_p50": lv["ttft_p50_ms"] / pl["ttft_p50_ms"] if pl["ttft_p50_ms"] else None,
                   "ttft_p99": lv["ttft_p99_ms"] / pl["ttft_p99_ms"] if pl["ttft_p99_ms"] else None}
            rows.append(row)
            lines.append(f"{ours} vs {peer} at concurrency {row['concurrency']}: output tok/s "
                         f"{fmt(row['throughput'], 2)}x, TTFT p50 {fmt(row['ttft_p50'], 2)}x, "
                         f"TTFT p99 {fmt(row['ttft_p99'], 2)}x")
    return lines, rows


def target_line(rows: list[dict]) -> str:
    ours, peer, c, factor = TARGET
    row = next((r for r in rows if (r["ours"], r["peer"], r["concurrency"]) == (ours, peer, c)), None)
    if row is None:
        return (f"target ({ours} at concurrency {c} >= {factor:g}x {peer} tok/s, TTFT no worse): "
                "not measured in this run")
    ok = (row["throughput"] >= factor and row["ttft_p50"] is not None and row["ttft_p50"] <= 1.0
          and row["ttft_p99"] is not None and row["ttft_p99"] <= 1.0)
    return (f"target: {ours} at concurrency {c} = {row['throughput']:.2f}x {peer}'s output tok/s "
            f"(want >= {factor:g}x), TTFT p50 {fmt(row['ttft_p50'], 2)}x / p99 {fmt(row['ttft_p99'], 2)}x "
            f"(want <= 1x) {'✓' if ok else '✗'}")


# ------------------------------------------------------------------------------------------ main

def named_paths(values: list[str], defaults: dict[str, Path], flag: str) -> list[tuple[str, Path]]:
    """NAME=PATH pairs of a repeatable flag; its defaults that exist when not given; none for 'none'."""
    if not values:
        return [(n, p) for n, p in defaults.items() if p.exists()]
    if values == ["none"]:
        return []
    out = []
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"{flag} {v!r}: want NAME=PATH")
        if not Path(path).expanduser().exists():
            raise SystemExit(f"{flag} {v!r}: {path} does not exist")
        out.append((name, Path(path).expanduser()))
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", action="append", default=[], metavar="NAME=DIR",
                   help="our engine dir to serve (repeatable; 'none' for none); default: "
                        + ", ".join(f"{n}={d}" for n, d in DEFAULT_ENGINES.items()) + " where they exist")
    p.add_argument("--gguf", action="append", default=[], metavar="NAME=FILE",
                   help="a GGUF for llama_cpp.server (repeatable; 'none' for none); default: "
                        + ", ".join(f"{n}={f}" for n, f in DEFAULT_GGUFS.items()) + " where they exist")
    p.add_argument("--compare", action="append", default=[], metavar="OURS=PEER",
                   help="print our NAME's figures over the GGUF NAME's (repeatable; default int4=q4_0, fp32=f32)")
    p.add_argument("--levels", default=None, help="comma-separated concurrencies (default 1,4,8,16; 1,2 with --quick)")
    p.add_argument("--requests", type=int, default=None,
                   help="requests per level (default max(16, 2 x concurrency); 2 with --quick)")
    p.add_argument("--max_tokens", type=int, default=None, help="output tokens a request asks for (default 64; "
                   "8 with --quick)")
    p.add_argument("--words", type=int, default=250, help="each article is cut after this many words")
    p.add_argument("--data", type=Path, default=DATA, help="the articles (summarize.jsonl)")
    p.add_argument("--num_threads", type=int, default=2, help="threads of each server")
    p.add_argument("--n_ctx", type=int, default=2048, help="llama_cpp.server's context size")
    p.add_argument("--start_timeout", type=float, default=300.0, help="seconds a server may take to be ready")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds one request may take")
    p.add_argument("--pause", type=float, default=1.0, help="seconds of rest before each level")
    p.add_argument("--serve_flags", default="", help="more flags for our servers, e.g. \"--max_num_tokens 128\" "
                                                     "(chunked prefill) or \"--prompt_lookup_num_tokens 4\"")
    p.add_argument("--quick", action="store_true", help="concurrency 1,2, 2 requests, 8 tokens: a smoke run")
    p.add_argument("--log_dir", type=Path, help="keep each server's log here (default: a temporary file, deleted)")
    p.add_argument("--json", type=Path, help="also write every figure, every request and the settings here")
    a = p.parse_args(argv)
    levels = (a.levels or ("1,2" if a.quick else "1,4,8,16")).split(",")
    a.levels = list(dict.fromkeys(int(x) for x in levels if x.strip()))
    a.max_tokens = a.max_tokens or (8 if a.quick else 64)
    a.requests_per_level = {c: a.requests or (2 if a.quick else max(16, 2 * c)) for c in a.levels}
    a.pairs = [tuple(x.split("=", 1)) for x in a.compare] if a.compare else [("int4", "q4_0"), ("fp32", "f32")]
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    engines = [dataclasses.replace(engine_server(n, d), extra=tuple(shlex.split(a.serve_flags)))
               for n, d in named_paths(a.engine, DEFAULT_ENGINES, "--engine")]
    ggufs = [gguf_server(n, f) for n, f in named_paths(a.gguf, DEFAULT_GGUFS, "--gguf")]
    missing = [m for m in LLAMA_SERVER_MODULES if importlib.util.find_spec(m) is None]
    if ggufs and missing:
        log(f"skipping llama_cpp.server ({', '.join(missing)} not installed): {LLAMA_SERVER_INSTALL}")
        ggufs = []
    # ours and llama.cpp's in turns (int4, q4_0, fp32, f32), so that a compared pair runs close in time
    servers = [s for pair in zip(engines, ggufs) for s in pair] + engines[len(ggufs):] + ggufs[len(engines):]
    if not servers:
        print("nothing to measure: no engine dir nor GGUF found (see --engine, --gguf)")
        return 2
    warm, prompts = plan_requests(load_prompts(a.data, a.words), a.requests_per_level)
    cpu = cpu_description()
    log(f"CPU: {cpu}; {len(servers)} servers, concurrency {a.levels}, {a.max_tokens} output tokens a request")
    records = [measure_server(s, a, prompts, warm) for s in servers]

    ratio_lines, ratio_rows = ratios(records, a.pairs)
    print(f"CPU: {cpu}")
    print(f"Requests: chat summaries of {a.data.name} articles cut after {a.words} words, temperature 0, "
          f"max_tokens {a.max_tokens}, streamed; {a.num_threads} threads each; servers one at a time.")
    print()
    print("\n".join(table(records)))
    print()
    for r in records:
        note = (f"max batch {r['max_batch_size']}" if r["kind"] == OURS else "one request at a time")
        print(f"- {r['name']}: {r['kind']} {r['path']} ({r['precision']}; {note})"
              + (f" FAILED: {r['error']}" if "error" in r else ""))
    over = sorted({c for c in a.levels for r in records if r["kind"] == OURS and r["max_batch_size"]
                   and c > r["max_batch_size"]})
    if over:
        print(f"- at concurrency {', '.join(map(str, over))} our engines run max_batch_size requests at once; "
              "the rest queue")
    if ratio_lines:
        print()
        print("\n".join(ratio_lines))
        print(target_line(ratio_rows))
    if a.json:
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
        settings["requests_per_level"] = {str(c): n for c, n in a.requests_per_level.items()}
        a.json.write_text(json.dumps({"cpu": cpu, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "settings": settings,
                                      "servers": records, "ratios": ratio_rows}, indent=1))
        log(f"wrote {a.json}")
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
