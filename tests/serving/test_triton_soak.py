"""Soak of the real tritonserver: hundreds of streams, a third of them dropped by the client
mid-way (issue 16: a stub of the BLS model crashed with "malloc(): unaligned fastbin chunk
detected" under cancelled streams, and the next requests found "Stub process
'tensorrt_llm_bls_0_0' is not healthy").

The streams come from triton_repo/client/stream_soak_client.py (tritonclient gRPC and HTTP
generate_stream, run in the triton venv) at a bounded concurrency, in two halves, each bounded in
time; clients go away in each of the DROPS ways. After each half: nothing crashed (no crash sign
in the server log, the server live and ready), every stream that was not dropped has the
runner's greedy answer, every dropped stream that had started was cancelled in tensorrt_llm (its
batch slot freed) and the engine is idle. Then the case reported by hand (a long BLS stream on
every instance, all dropped after 2 s: each cancelled), and a full batch of new requests on
every tensorrt_llm slot and every BLS instance completes at once. The server's memory
(tritonserver and its stubs) must not grow from the middle to the end.

Before the fix the threaded BLS model crashed in the first half; gRPC connections closed
mid-stream also crashed tritonserver 2.51 itself in most runs until the final flag of a
cancelled request went out late (trtbuild.serving.GuardedSender). On the tiny engine about 40 s;
`slow`, as the other real-server soak-like tests.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import subprocess
import time
from pathlib import Path

import pytest

from test_triton import PROMPTS, TINY_BUILD, TINY_MODEL, Served, _cancel_lines, triton_venv  # noqa: F401
from trtbuild.serving import make_model_repo

from conftest import REPO

SOAK_CLIENT = REPO / "triton_repo" / "client" / "stream_soak_client.py"

pytestmark = pytest.mark.slow

REQUESTS = 600          # in two halves; the memory is compared between their ends
CONCURRENCY = 8         # twice the engine's batch slots: requests queue and join running batches
DROP_FRACTION = 1 / 3
KEPT_TOKENS = (8, 24, 48)
MODELS = (("tensorrt_llm_bls", 0.6), ("tensorrt_llm", 0.25), ("ensemble", 0.15))
# Triton's ensemble does not pass a client's cancellation to a step that is already running
# (only to the steps it schedules next; triton-inference-server/server#6739, also in its current
# ensemble_scheduler.cc), so a dropped ensemble stream runs its tensorrt_llm request to the end:
# ensemble streams here are read to the end.
DROPPED_MODELS = ("tensorrt_llm_bls", "tensorrt_llm")
# How a client goes away: tritonclient's stop_stream(cancel_requests=True), the gRPC connection
# closed under the stream, an HTTP generate_stream connection closed (the way of
# test_client_disconnect_frees_the_slot, where issue 16 was seen first).
DROPS = (("grpc", "cancel"), ("grpc", "close"), ("http", "close"))
HTTP_FRACTION = 0.25    # of the streams read to the end
CRASH_SIGNS = ("fastbin", "not healthy", "Segmentation fault", "malloc()", "double free",
               "corrupted", "Signal (11)", "Signal (6)", "core dumped", "Stub process")
RSS_GROWTH_MB = 64      # allowed growth from the middle to the end, besides 10%
HALF_SECONDS = 300      # each half must end by then (about 10 s on the tiny engine)
FINAL_BATCH_SECONDS = 30


@pytest.fixture(scope="module")
def soak_served(tiny_models, engines, tmp_path_factory, triton_venv):
    from trtbuild.runtime import ModelRunner

    root = tmp_path_factory.mktemp("soak")  # the repository (a few kB) and the server's log
    engine = engines.engine(tiny_models[TINY_MODEL], TINY_BUILD)
    runner = ModelRunner.from_dir(engine, num_threads=1)
    eos = runner.config.pretrained_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    repo = make_model_repo(engine, root / "repo", decoupled=True, num_threads=1)
    from launch_triton_server import TritonServer

    with TritonServer(repo, timeout=300, log_file=root / "server.log") as server:  # kept for a failure
        yield Served("tiny", engine, runner, server, eos)


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants (tritonserver and its stubs), MB."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def make_plan(served, n: int, seed: int) -> list[dict]:
    """n requests over PROMPTS x KEPT_TOKENS and MODELS. A third of them (tensorrt_llm_bls and
    tensorrt_llm only: see DROPPED_MODELS) ask for nearly max_seq_len tokens without an end id and
    are dropped after 0 to 8 responses, in each of the DROPS ways: so a drop is mid-stream, and a
    request that was not cancelled would keep the engine busy for seconds. The others are read
    to the end, over gRPC or (HTTP_FRACTION) HTTP."""
    rng = random.Random(seed)
    droppable = sum(w for m, w in MODELS if m in DROPPED_MODELS)
    plan = []
    for _ in range(n):
        prompt = rng.choice(PROMPTS)
        model = rng.choices([m for m, _ in MODELS], weights=[w for _, w in MODELS])[0]
        req = {"model": model, "prompt": prompt, "drop_after": None}
        if model == "tensorrt_llm":
            req["input_ids"] = served.encode(prompt)
        else:
            req["text"] = prompt
        if model in DROPPED_MODELS and rng.random() < DROP_FRACTION / droppable:
            req["max_tokens"] = served.max_seq_len - len(served.encode(prompt)) - 1
            req["end_id"] = -1
            req["drop_after"] = rng.choice([0, 1, 1, 2, 3, 5, 8])
            req["protocol"], req["drop"] = rng.choice(DROPS)
        else:
            req["protocol"] = "http" if rng.random() < HTTP_FRACTION else "grpc"
            req["max_tokens"] = rng.choice(KEPT_TOKENS)
            if model == "tensorrt_llm":
                req["end_id"] = served.eos
        plan.append(req)
    return plan


def run_plan(served, triton_venv, plan, tmp_path: Path, name: str, concurrency=CONCURRENCY) -> list[dict]:
    plan_path, results_path = tmp_path / f"{name}.json", tmp_path / f"{name}.jsonl"
    plan_path.write_text(json.dumps(plan))
    proc = subprocess.run([str(triton_venv / "bin" / "python"), str(SOAK_CLIENT), "-u", served.server.grpc_url,
                           "--http_url", served.server.http_url, "--plan", str(plan_path), "--results", str(results_path),
                           "--concurrency", str(concurrency), "--timeout", "60"],
                          capture_output=True, text=True, timeout=HALF_SECONDS)
    assert results_path.exists(), f"{proc.stdout}\n{proc.stderr}\n{served.server.log_tail(60)}"
    print(f"{name}: {proc.stdout.strip()}")
    return [json.loads(line) for line in results_path.read_text().splitlines()]


def check_results(served, plan, results, expected) -> tuple[int, int]:
    """Every request that was not dropped has its greedy answer. Returns (dropped requests that
    had streamed tokens, dropped requests): tensorrt_llm must log a cancellation for each of the
    first (its request was running) and for none beyond the second (a stream dropped before its
    first response may never have reached a model: gRPC cancels it first)."""
    problems, started, dropped = [], 0, 0
    for req, res in zip(plan, results):
        if req["drop_after"] is not None:
            assert res["dropped"], res  # asked for ~4000 tokens: cannot have finished first
            dropped += 1
            started += res["responses"] > 0
            continue
        want = expected[(req["prompt"], req["max_tokens"])]
        if res["error"] or not res["final"]:
            problems.append((req, res["error"] or "no final response"))
        elif req["model"] == "tensorrt_llm" and res["ids"] != want:
            problems.append((req, f"ids {res['ids']} != {want}"))
        elif req["model"] == "tensorrt_llm_bls" and res["text"] != served.decode(want):
            problems.append((req, f"text {res['text']!r} != {served.decode(want)!r}"))
        elif req["model"] == "ensemble" and res["responses"] != len(want):
            # the ensemble detokenizes each token alone: compare the token count
            problems.append((req, f"{res['responses']} responses for {len(want)} tokens"))
    assert not problems, f"{len(problems)} requests went wrong, e.g. {problems[:3]}"
    return started, dropped


def assert_healthy(served, where: str) -> None:
    log = served.server.log()
    signs = [ln for ln in log.splitlines() if any(s in ln for s in CRASH_SIGNS)]
    assert not signs, f"{where}: the server log shows a crash:\n" + "\n".join(signs[:20])
    assert served.server.proc.poll() is None, f"{where}: tritonserver exited\n{served.server.log_tail(60)}"
    assert served.http.ready(), f"{where}: not ready\n{served.server.log_tail(60)}"
    conn = http.client.HTTPConnection(served.http.host, served.http.port, timeout=10)
    try:
        conn.request("GET", "/v2/health/live")
        assert conn.getresponse().status == 200, f"{where}: not live"
    finally:
        conn.close()


def assert_cancelled(served, before: int, started: int, dropped: int, where: str) -> int:
    """tensorrt_llm logged one cancellation per dropped request that had started (at most one
    per dropped request); returns the count."""
    deadline = time.monotonic() + 60
    while _cancel_lines(served) - before < started and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)  # a late one beyond `started` would be a drop that had reached the model
    got = _cancel_lines(served) - before
    assert started <= got <= dropped, (where, started, got, dropped, served.server.log_tail(40))
    return got


def llm_stub_cpu_seconds(server_pid: int) -> float:
    """CPU time used so far by the tensorrt_llm model's stub process (the engine runs there)."""
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == server_pid and any(c.endswith(b"/tensorrt_llm/1/model.py") for c in cmd):
            return (int(fields[11]) + int(fields[12])) / tick
    raise AssertionError("no tensorrt_llm stub under the server")


def assert_engine_idle(served, where: str, window=2.0) -> float:
    """With no stream open, the engine computes nothing: a dropped request that was not
    cancelled would decode its ~4000 tokens (seconds of CPU)."""
    t0 = llm_stub_cpu_seconds(served.server.proc.pid)
    time.sleep(window)
    used = llm_stub_cpu_seconds(served.server.proc.pid) - t0
    assert used < 0.25 * window, f"{where}: the tensorrt_llm stub used {used:.2f} s of CPU in {window} s idle"
    return used


def test_soak_streams_with_drops(soak_served, triton_venv, tmp_path):
    served = soak_served
    t0 = time.monotonic()
    plan = make_plan(served, REQUESTS, seed=16)
    expected = {}
    for n in KEPT_TOKENS:
        answers = served.expected_batch([served.encode(p) for p in PROMPTS], n)
        expected.update({(p, n): a for p, a in zip(PROMPTS, answers)})
    before = _cancel_lines(served)
    rss_start = tree_rss_mb(served.server.proc.pid)

    half = REQUESTS // 2
    cancelled, t_soak = 0, time.monotonic()
    first = run_plan(served, triton_venv, plan[:half], tmp_path, "first-half")
    assert_healthy(served, "after the first half")
    started, dropped = check_results(served, plan[:half], first, expected)
    cancelled += assert_cancelled(served, before, started, dropped, "first half")
    assert_engine_idle(served, "after the first half")
    rss_mid = tree_rss_mb(served.server.proc.pid)

    second = run_plan(served, triton_venv, plan[half:], tmp_path, "second-half")
    t_soak = time.monotonic() - t_soak
    assert_healthy(served, "after the second half")
    started, dropped = check_results(served, plan[half:], second, expected)
    cancelled += assert_cancelled(served, before + cancelled, started, dropped, "second half")
    idle = assert_engine_idle(served, "after the second half")
    rss_end = tree_rss_mb(served.server.proc.pid)

    # issue 16 by hand: a long BLS stream on every instance, all dropped after 2 s: each is
    # cancelled in tensorrt_llm, and the engine goes idle
    wave = [{"model": "tensorrt_llm_bls", "prompt": p, "text": p, "end_id": -1,
             "max_tokens": served.max_seq_len - len(served.encode(p)) - 1, "drop_after": None,
             "drop_after_seconds": 2.0, "protocol": DROPS[i % len(DROPS)][0], "drop": DROPS[i % len(DROPS)][1]}
            for i, p in enumerate(PROMPTS[:served.max_batch_size])]
    mark = before + cancelled
    dropped_late = run_plan(served, triton_venv, wave, tmp_path, "dropped-after-2s", concurrency=len(wave))
    assert all(r["dropped"] and r["responses"] > 0 and not r["error"] for r in dropped_late), dropped_late
    assert_healthy(served, "after the streams dropped after 2 s")
    cancelled += assert_cancelled(served, mark, len(wave), len(wave), "streams dropped after 2 s")
    assert_engine_idle(served, "after the streams dropped after 2 s")

    # every slot is free: a full batch for tensorrt_llm and one request for each BLS instance
    # (each serves one request at a time: a stuck one would leave its request queued) run at
    # once, finish soon and are correct
    n = 48
    final_plan = []
    for i, p in enumerate(PROMPTS[:2 * served.max_batch_size]):
        req = {"model": "tensorrt_llm" if i % 2 == 0 else "tensorrt_llm_bls", "prompt": p,
               "max_tokens": n, "end_id": served.eos, "drop_after": None}
        req["input_ids" if req["model"] == "tensorrt_llm" else "text"] = (
            served.encode(p) if req["model"] == "tensorrt_llm" else p)
        final_plan.append(req)
    t_final = time.monotonic()
    final = run_plan(served, triton_venv, final_plan, tmp_path, "final-batch", concurrency=len(final_plan))
    t_final = time.monotonic() - t_final
    want = {(p, n): a for p, a in zip([r["prompt"] for r in final_plan],
                                      served.expected_batch([served.encode(r["prompt"]) for r in final_plan], n))}
    check_results(served, final_plan, final, want)
    assert t_final < FINAL_BATCH_SECONDS, f"the final batch took {t_final:.1f} s"
    assert_healthy(served, "after the final batch")

    drops = sum(r["drop_after"] is not None for r in plan) + len(wave)
    print(f"soak: {REQUESTS + len(wave)} streams ({drops} dropped, {cancelled} cancelled in tensorrt_llm) in "
          f"{t_soak:.1f} s, test {time.monotonic() - t0:.1f} s; engine idle after ({idle:.2f} s CPU "
          f"in 2 s); final batch of {len(final_plan)} in {t_final:.1f} s; server RSS "
          f"{rss_start:.0f} -> {rss_mid:.0f} (middle) -> {rss_end:.0f} MB (end)")
    assert rss_end <= rss_mid * 1.10 + RSS_GROWTH_MB, (rss_start, rss_mid, rss_end)
