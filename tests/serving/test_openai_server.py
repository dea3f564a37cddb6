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

import numpy as np
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

    def __init__(self, engine: Path, log_path: Path, *flags: str, ready: bool = True):
        self.port, self.log_path, self.ready = free_port(), log_path, ready
        self.cmd = [str(Path(sys.executable).parent / "trtbuild-serve"), str(engine), "--port", str(self.port),
                    "--served_model_name", MODEL, "--api_key", API_KEY, "--num_threads", "1", *flags]
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "Served":
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT)
        if self.ready:
            assert self.wait_health()["status"] == "ok", self.log_path.read_text()[-3000:]
        return self

    def wait_health(self) -> dict:
        """/health's body once the engine has loaded or failed to."""
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, self.log_path.read_text()[-3000:]
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    return json.loads(r.read())
            except urllib.error.HTTPError as e:
                body = json.loads(e.read())
                if body["status"] == "error":
                    return body
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


def concurrently(fn, items, timeout: float) -> None:
    """fn(item) for every item, each in a thread of its own, all at once."""
    threads = [threading.Thread(target=fn, args=(item,)) for item in items]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)


def greedy_by_name(c, names, ids: list[int]) -> dict[str, str]:
    """12 greedy tokens of `ids` under each model name, all requests at once."""
    got: dict[str, str] = {}

    def one(name: str) -> None:
        got[name] = c.completions.create(model=name, prompt=ids, max_tokens=12, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text

    concurrently(one, names, timeout=120)
    return got


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

    concurrently(one, range(16), timeout=300)
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


def test_logprobs_are_the_models(server):
    """Chat logprobs / top_logprobs and completions logprobs: each token's is log_softmax of the
    runner's logits at its position, the top ones are sorted and start with the greedy pick, and
    the streamed ones equal the non-streamed."""
    url, engine, runner = server
    prompt_ids, ids = expected_chat(engine, runner, "The history of the city", 8)
    logits = runner.score([prompt_ids + ids])[0, len(prompt_ids) - 1:-1].astype(np.float64)
    want = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    c = client(url)
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "The history of the city"}], max_tokens=8,
                  temperature=0, logprobs=True, top_logprobs=3)
    content = c.chat.completions.create(**kwargs).choices[0].logprobs.content
    assert len(content) == len(ids)
    for k, (t, entry) in enumerate(zip(ids, content)):
        assert entry.token == runner.tokenizer.decode([t], skip_special_tokens=False)
        assert entry.logprob == pytest.approx(want[k, t], abs=1e-4)
        assert [x.logprob for x in entry.top_logprobs] == pytest.approx(sorted(want[k], reverse=True)[:3], abs=1e-4)
        assert entry.top_logprobs[0].token == entry.token  # greedy
    streamed = [e for chunk in c.chat.completions.create(**kwargs, stream=True)
                if chunk.choices and chunk.choices[0].logprobs for e in chunk.choices[0].logprobs.content]
    # the same tokens and log-probabilities (the second request reuses the first's cached prompt:
    # its last prompt token is computed by another kernel, equal to float rounding)
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-5)
    plain = c.chat.completions.create(**{**kwargs, "logprobs": False, "top_logprobs": None})
    assert plain.choices[0].logprobs is None
    lp = c.completions.create(model=MODEL, prompt=prompt_ids, max_tokens=8, temperature=0, logprobs=2).choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([want[k, t] for k, t in enumerate(ids)], abs=1e-4)
    assert [len(x) for x in lp.top_logprobs] == [2] * len(ids) and lp.text_offset[0] == 0
    assert lp.text_offset == [sum(len(x) for x in lp.tokens[:k]) for k in range(len(ids))]
    with pytest.raises(openai.APIStatusError) as e:  # top_logprobs without logprobs
        c.chat.completions.create(**{**kwargs, "logprobs": False})
    assert e.value.status_code == 400 and "top_logprobs" in e.value.body["message"]


def test_presence_and_frequency_penalties(server):
    """The penalties change greedy output exactly as the runner's sampler does."""
    url, engine, runner = server
    text = apply_chat_template(engine / "tokenizer", [{"role": "user", "content": "Say it again and again"}])
    ids = runner.tokenizer.encode(text, add_special_tokens=False).ids
    penalized = SamplingConfig(max_new_tokens=20, end_id=1, temperature=0, presence_penalty=1.2, frequency_penalty=0.8)
    want = runner.tokenizer.decode(runner.generate([ids], penalized).output_ids[0], skip_special_tokens=True)
    got = client(url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say it again and again"}],
                                              max_tokens=20, temperature=0, presence_penalty=1.2,
                                              frequency_penalty=0.8).choices[0].message.content
    assert got == want
    assert want != runner.tokenizer.decode(expected_chat(engine, runner, "Say it again and again", 20)[1],
                                           skip_special_tokens=True)


@pytest.fixture(scope="module")
def lora_setup(tiny_models, module_tmp):
    """(engine with the lora plugin, {name: adapter dir}): two adapters for the tiny llama."""
    from trtbuild.builder import build_engine
    from trtbuild.convert.converter import convert_checkpoint
    from trtbuild.convert.lora import make_peft_adapter
    from trtbuild.engine import LoraConfig

    model = tiny_models["llama_4k"]
    adapters = {"ada": make_peft_adapter(model, module_tmp / "ada", r=4, seed=1),
                "bea": make_peft_adapter(model, module_tmp / "bea", r=2, seed=2, target_modules=["q_proj", "v_proj"])}
    ckpt = module_tmp / "lora_ckpt"
    convert_checkpoint(model, ckpt, "float32", progress=False)
    limits = BuildConfig(max_batch_size=4, max_input_len=64, max_seq_len=256,  # "bea" is loaded by the server
                         lora_config=LoraConfig(lora_dir=(str(adapters["ada"]),), max_loras=2, max_lora_rank=4))
    engine = module_tmp / "lora_engine"
    build_engine(ckpt, engine, limits, progress=False)
    return ckpt, limits, engine, adapters


def lora_expected(engine: Path, adapters: dict[str, Path], ids: list[int]) -> dict[str, str]:
    """The greedy text of `ids` under each model name: the base ("tiny") and each adapter."""
    runner = ModelRunner.from_dir(engine, num_threads=1, lora_dirs=list(adapters.values()))
    names = [MODEL, *adapters]
    outs = runner.generate([ids] * len(names), SamplingConfig(max_new_tokens=12, end_id=-1),
                           lora_task_ids=[-1, *runner.adapter_task_ids]).output_ids
    return {name: runner.tokenizer.decode(out, skip_special_tokens=True) for name, out in zip(names, outs)}


def test_lora_adapters_are_models_by_name(lora_setup, tmp_path):
    """--lora_dir NAME=DIR: /v1/models lists each adapter beside the base model, and a request for
    an adapter's name runs with it (concurrent requests for different names share the batch)."""
    _, _, engine, adapters = lora_setup
    ids = list(range(5, 20))
    want = lora_expected(engine, adapters, ids)
    assert len(set(want.values())) == 3  # the adapters change the output
    flags = ["--lora_dir", *(f"{n}={d}" for n, d in adapters.items())]
    with Served(engine, tmp_path / "serve.log", *flags) as served:
        c = client(served.url)
        listed = c.models.list().data
        assert [m.id for m in listed] == [MODEL, "ada", "bea"] and listed[1].model_extra["parent"] == MODEL
        assert greedy_by_name(c, want, ids) == want
        with pytest.raises(openai.APIStatusError) as e:
            c.completions.create(model="nope", prompt=ids, max_tokens=2)
        assert e.value.status_code == 404 and "'ada'" in e.value.body["message"]


def test_bad_lora_flags_are_one_line(lora_setup, chat_engine, tmp_path):
    _, _, engine, adapters = lora_setup
    serve = str(Path(sys.executable).parent / "trtbuild-serve")
    taken = subprocess.run([serve, str(engine), "--served_model_name", "ada", "--lora_dir", f"ada={adapters['ada']}"],
                           capture_output=True, text=True, timeout=60)
    assert taken.returncode != 0 and "the model name 'ada' is taken" in taken.stderr
    assert "Traceback" not in taken.stderr
    with Served(chat_engine, tmp_path / "serve.log", "--lora_dir", str(adapters["ada"]), ready=False) as served:
        body = served.wait_health()
    assert body["status"] == "error" and "--lora_plugin" in body["detail"]


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


def test_a_multi_rank_engine_is_served(lora_setup, tmp_path):
    """trtbuild-serve on a tp2 engine starts the other rank itself (as the Triton model does), which
    loads the --lora_dir adapters too and schedules as rank 0 (speculation, chunks, reused
    prefixes), and answers as the one-rank engine under every model name."""
    if not (Path(sys.executable).parent / "mpiexec").is_file():
        pytest.skip("needs trtbuild[mpi]")
    from trtbuild.builder import build_engine

    ckpt, limits, one_rank, adapters = lora_setup
    engine = tmp_path / "tp2"
    build_engine(ckpt, engine, limits, progress=False, tp_size=2)
    ids = list(range(5, 20))
    want = lora_expected(one_rank, adapters, ids)
    # speculation, chunked prefill and KV reuse on: the follower schedules as rank 0 does
    flags = ["--prompt_lookup_num_tokens", "4", "--max_num_tokens", "4", "--speculative_max_batch_size", "4"]
    with Served(engine, tmp_path / "serve.log", "--lora_dir", *(f"{n}={d}" for n, d in adapters.items()),
                *flags) as served:
        c = client(served.url)
        for _ in range(2):  # the second round finds the first's prefixes cached
            assert greedy_by_name(c, want, ids) == want


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
