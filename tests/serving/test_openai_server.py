"""trtbuild-serve against a real running server (a subprocess on a free port), through the official
openai client and raw HTTP: greedy chat and completions equal the runner's, streamed text equals the
non-streamed, usage counts equal the tokenizer's, a stop string across token boundaries, 16
concurrent streams, and the error bodies."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from trtbuild.engine import BuildConfig
from trtbuild.runtime import ModelRunner, SamplingConfig
from trtbuild.runtime.chat import apply_chat_template

from test_triton import triton_venv  # noqa: E402, F401  (the fixture: the triton venv, the Docker image's)

openai = pytest.importorskip("openai", reason="the serve tests use the official client (the dev extra has it)")

API_KEY = "test-key"
MODEL = "tiny"
TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
LIMITS = BuildConfig(max_batch_size=4, max_input_len=64, max_seq_len=4096)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """A trtbuild-serve subprocess on a free port, ready (/health 200) when entered."""

    def __init__(self, engine: Path, log_path: Path, *flags: str):
        self.port, self.log_path = free_port(), log_path
        self.cmd = [str(Path(sys.executable).parent / "trtbuild-serve"), str(engine), "--port", str(self.port),
                    "--served_model_name", MODEL, "--api_key", API_KEY, "--num_threads", "1", *flags]
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "Served":
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, self.log_path.read_text()[-3000:]
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.monotonic() < deadline, "trtbuild-serve did not become ready"
            time.sleep(0.3)

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="module")
def chat_engine(tiny_models, engines, module_tmp) -> Path:
    """The tiny llama engine with a chat template."""
    engine = module_tmp / "engine"
    shutil.copytree(engines.engine(tiny_models["llama_4k"], LIMITS), engine)
    (engine / "tokenizer" / "chat_template.jinja").write_text(TEMPLATE)
    return engine


@pytest.fixture(scope="module")
def server(chat_engine, module_tmp):
    """(base url, engine dir, runner): the tiny engine, served."""
    with Served(chat_engine, module_tmp / "serve.log", "--max_queue", "32") as served:
        yield served.url, chat_engine, ModelRunner.from_dir(chat_engine, num_threads=1)


def client(url: str):
    return openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0)


def expected_chat(engine: Path, runner: ModelRunner, content: str, max_tokens: int) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy ids) of one user message, as the runner makes them."""
    text = apply_chat_template(engine / "tokenizer", [{"role": "user", "content": content}])
    ids = runner.tokenizer.encode(text, add_special_tokens=False).ids
    out = runner.generate([ids], SamplingConfig(max_new_tokens=max_tokens, end_id=1)).output_ids[0]
    return ids, out


def test_models_and_health(server):
    url, _, _ = server
    assert [m.id for m in client(url).models.list().data] == [MODEL]
    with urllib.request.urlopen(url + "/health") as r:
        assert json.loads(r.read())["status"] == "ok"


def test_greedy_chat_streamed_and_not(server):
    url, engine, runner = server
    prompt_ids, ids = expected_chat(engine, runner, "The history of the city", 24)
    want = runner.tokenizer.decode(ids, skip_special_tokens=True)
    c = client(url)
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "The history of the city"}],
                                  max_tokens=24, temperature=0)
    assert r.choices[0].message.content == want
    assert r.usage.prompt_tokens == len(prompt_ids) and r.usage.completion_tokens == len(ids)
    assert r.choices[0].finish_reason == ("length" if len(ids) == 24 else "stop")
    stream = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "The history of the city"}],
                                       max_tokens=24, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    parts, usage, reasons = [], None, []
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            reasons.append(chunk.choices[0].finish_reason)
        usage = chunk.usage or usage
    assert "".join(parts) == want and reasons[-1] == r.choices[0].finish_reason
    assert usage.completion_tokens == len(ids) and usage.prompt_tokens == len(prompt_ids)


def test_completions_and_token_prompts(server):
    url, _, runner = server
    ids = runner.tokenizer.encode("Once upon a time").ids
    want = runner.generate([ids], SamplingConfig(max_new_tokens=10, end_id=1)).output_ids[0]
    c = client(url)
    text = c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0).choices[0].text
    assert text == runner.tokenizer.decode(want, skip_special_tokens=True)
    assert c.completions.create(model=MODEL, prompt=ids, max_tokens=10, temperature=0).choices[0].text == text
    both = c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0, n=2)
    assert [ch.text for ch in both.choices] == [text, text] and both.usage.completion_tokens == 2 * len(want)


def test_stop_string_across_token_boundaries(server):
    url, engine, runner = server
    _, ids = expected_chat(engine, runner, "Tell me about the sea", 40)
    pieces = [runner.tokenizer.decode(ids[:k], skip_special_tokens=True) for k in range(len(ids) + 1)]
    k = next(k for k in range(2, len(ids)) if len(pieces[k]) - len(pieces[k - 1]) >= 2
             and len(pieces[k + 1]) - len(pieces[k]) >= 2)
    stop = pieces[k][-2:] + pieces[k + 1][len(pieces[k]):len(pieces[k]) + 2]  # two tokens' text around a boundary
    full = pieces[-1]
    r = client(url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell me about the sea"}],
                                            max_tokens=40, temperature=0, stop=[stop])
    assert r.choices[0].message.content == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"


def test_16_concurrent_streams(server):
    url, engine, runner = server
    topics = [f"Topic number {i} is about" for i in range(16)]
    want = [runner.tokenizer.decode(expected_chat(engine, runner, t, 16)[1], skip_special_tokens=True) for t in topics]
    got: dict[int, str] = {}

    def one(i: int) -> None:
        stream = client(url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": topics[i]}],
                                                     max_tokens=16, temperature=0, stream=True)
        got[i] = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert [got.get(i) for i in range(16)] == want


def test_errors_are_openai_bodies(server):
    url, _, _ = server
    c = client(url)
    cases = [
        (dict(model="nope"), 404, "model"),
        (dict(model=MODEL, temperature=5), 400, "temperature"),
        (dict(model=MODEL, max_tokens=0), 400, "max_tokens"),
        (dict(model=MODEL, max_tokens=10_000), 400, "max_tokens"),
    ]
    for kwargs, status, param in cases:
        with pytest.raises(openai.APIStatusError) as e:
            c.chat.completions.create(messages=[{"role": "user", "content": "hi"}], **kwargs)
        assert e.value.status_code == status and e.value.body["param"] == param, e.value.body
    with pytest.raises(openai.APIStatusError) as e:  # longer than the engine takes
        c.completions.create(model=MODEL, prompt="word " * 200, max_tokens=4)
    assert e.value.status_code == 400 and e.value.body["code"] == "context_length_exceeded"
    req = urllib.request.Request(url + "/v1/models")  # no key
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code == 401 and json.loads(e.value.read())["error"]["type"] == "authentication_error"
    req = urllib.request.Request(url + "/v1/chat/completions", data=b"{not json", method="POST",
                                 headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    body = e.value.read().decode()
    assert e.value.code == 400 and "Traceback" not in body and "error" in json.loads(body)


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics") as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_a_full_queue_is_429_and_a_disconnect_leaves_the_batch(chat_engine, tmp_path):
    """--max_queue 1: a second request while one streams gets 429; when the streaming client goes
    away its request leaves the batch at once (it had thousands of tokens to go), and /metrics
    counts what happened."""
    with Served(chat_engine, tmp_path / "serve.log", "--max_queue", "1") as served:
        body = json.dumps({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4000, "temperature": 0,
                           "ignore_eos": True, "stream": True}).encode()
        headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
        resp = urllib.request.urlopen(urllib.request.Request(served.url + "/v1/completions", data=body,
                                                             headers=headers), timeout=60)
        assert resp.readline().startswith(b"data: ")  # streaming
        assert metric(served.url, "trtbuild_requests_running") == 1
        c = client(served.url)
        with pytest.raises(openai.APIStatusError) as e:
            c.completions.create(model=MODEL, prompt="Hello", max_tokens=4)
        assert e.value.status_code == 429 and e.value.body["code"] == "queue_full"
        resp.close()  # the client goes away mid-stream
        deadline = time.monotonic() + 10
        while metric(served.url, "trtbuild_requests_running") != 0:
            assert time.monotonic() < deadline, "the disconnected stream stayed in the batch"
            time.sleep(0.05)
        assert metric(served.url, "trtbuild_generation_tokens_total") < 4000  # it did not run to its end
        assert c.completions.create(model=MODEL, prompt="Hello", max_tokens=4).usage.completion_tokens <= 4
        assert metric(served.url, "trtbuild_prompt_tokens_total") > 0
        assert metric(served.url, 'trtbuild_requests_total{finish_reason="cancelled"}') == 1


def test_a_multi_rank_engine_is_served(tiny_models, engines, tmp_path):
    """trtbuild-serve on a tp2 engine starts the other rank itself (as the Triton model does) and
    answers as the one-rank engine."""
    if not (Path(sys.executable).parent / "mpiexec").is_file():
        pytest.skip("needs trtbuild[mpi]")
    from trtbuild.builder import build_engine

    engine = tmp_path / "tp2"
    build_engine(engines.checkpoint(tiny_models["llama_4k"]), engine, LIMITS, progress=False, tp_size=2)
    one = ModelRunner.from_dir(engines.engine(tiny_models["llama_4k"], LIMITS), num_threads=1)
    ids = one.tokenizer.encode("Once upon a time").ids
    want = one.tokenizer.decode(one.generate([ids], SamplingConfig(max_new_tokens=12, end_id=1)).output_ids[0],
                                skip_special_tokens=True)
    with Served(engine, tmp_path / "serve.log") as served:
        got = client(served.url).completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0)
    assert got.choices[0].text == want


def test_the_docker_entrypoint_serves_the_openai_api(chat_engine, triton_venv, tmp_path):  # noqa: F811
    """docker/entrypoint.sh with SERVER=openai (what `docker run -e SERVER=openai ...` runs) serves
    the engine with trtbuild-serve from the image's venv, the triton venv."""
    import os

    from conftest import REPO

    port = free_port()
    env = {**os.environ, "PATH": f"{triton_venv / 'bin'}{os.pathsep}{os.environ['PATH']}", "SERVER": "openai",
           "ENGINE_DIR": str(chat_engine), "HTTP_PORT": str(port)}
    log = open(tmp_path / "entrypoint.log", "w")
    proc = subprocess.Popen(["sh", str(REPO / "docker" / "entrypoint.sh"), "--served_model_name", MODEL,
                             "--num_threads", "1"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "entrypoint.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.monotonic() < deadline, "the entrypoint's server did not become ready"
            time.sleep(0.3)
        reply = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0).completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=4, temperature=0)
        assert reply.usage.completion_tokens <= 4
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
