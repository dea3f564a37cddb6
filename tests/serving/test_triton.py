"""Serving through the real tritonserver (nvidia-pytriton's 2.51), no mocks.

The server runs the models in the triton venv (numpy<2) that scripts/install_triton.sh makes;
the session fixture runs that script (idempotent: seconds when up to date). Requests go over
HTTP with the standard library (KServe v2 /infer, /generate and /generate_stream SSE) and over
gRPC through the repository's tritonclient scripts, run in the triton venv.

Engines: a tiny random Llama (every test, fast) and the real default model (`slow`).
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from trtbuild.engine import BuildConfig
from trtbuild.errors import TrtbuildError
from trtbuild.serving import (GuardedSender, IncrementalDetokenizer, from_word_list_format, make_model_repo,
                              main as triton_repo_main, to_word_list_format)

from conftest import REPO

sys.path.insert(0, str(REPO / "triton_repo"))
from launch_triton_server import (CUDA_NOTE, LaunchError, TritonServer, default_triton_venv,  # noqa: E402
                                  needs_cuda_note, stale_shm_regions)

CLIENTS = REPO / "triton_repo" / "client"
PROMPTS = [
    "The capital of France is",
    "Once upon a time",
    "The history of the city",
    "In 1850 the population of the town was",
    "Water boils at",
    "The first rule of",
    "A short poem about the sea:",
    "The quick brown fox",
    "def fibonacci(n):",
    "Q: What is two plus two?\nA:",
    "Paris, London and",
    "The most important thing in life is",
    "My favourite food is",
    "The company was founded in",
    "Roses are red,",
    "It was a dark and stormy night",
]


# ------------------------------------------------------------------------------ HTTP helpers

class Http:
    """Just enough of Triton's HTTP API, with the standard library."""

    def __init__(self, url: str):
        host, port = url.rsplit(":", 1)
        self.host, self.port = host, int(port)

    def _post(self, path, body, timeout=300):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        return conn, conn.getresponse()

    def post(self, path, body, timeout=300):
        conn, resp = self._post(path, body, timeout)
        try:
            data = resp.read().decode()
        finally:
            conn.close()
        try:
            return resp.status, json.loads(data)
        except json.JSONDecodeError:
            return resp.status, data

    def ready(self) -> bool:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            conn.request("GET", "/v2/health/ready")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def generate(self, model, body):
        return self.post(f"/v2/models/{model}/generate", body)

    def infer(self, model, inputs):
        return self.post(f"/v2/models/{model}/infer", {"inputs": inputs})

    def open_stream(self, model, body, timeout=300):
        """(connection, response) of a generate_stream call; read events with `events`."""
        return self._post(f"/v2/models/{model}/generate_stream", body, timeout)

    @staticmethod
    def events(resp):
        """The SSE `data:` events of a generate_stream response, as dicts, until it ends."""
        while True:
            line = resp.readline()
            if not line:
                return
            line = line.decode().strip()
            if line.startswith("data:"):
                yield json.loads(line[5:])

    def stream(self, model, body, timeout=300):
        conn, resp = self.open_stream(model, body, timeout)
        try:
            return resp.status, list(self.events(resp))
        finally:
            conn.close()


def _ids(value) -> list[int]:
    """output_ids of one generate event (a scalar when there is one token)."""
    if isinstance(value, list):
        return [int(v) for v in np.asarray(value).reshape(-1)]
    return [int(value)]


def stream_ids(http, prompt_ids, max_tokens, end_id):
    status, events = http.stream("tensorrt_llm", {"input_ids": prompt_ids, "request_output_len": max_tokens,
                                                  "end_id": end_id, "streaming": True})
    assert status == 200, events
    assert all("error" not in e for e in events), events
    out = []
    for e in events:
        out.extend(_ids(e["output_ids"])[:int(e["sequence_length"])])
    return out


# ------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="session")
def triton_venv() -> Path:
    """The triton venv, made or brought up to date by scripts/install_triton.sh."""
    venv = default_triton_venv()
    lock_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"trtbuild-install-triton-{os.getuid()}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # xdist workers / parallel sessions install once
        proc = subprocess.run(["bash", str(REPO / "scripts" / "install_triton.sh"), "--venv", str(venv)],
                              capture_output=True, text=True)
    assert proc.returncode == 0, f"scripts/install_triton.sh failed:\n{proc.stdout}\n{proc.stderr}"
    return venv


# the tiny engine: tiny_models["llama_4k"] (4k positions: long streams for the disconnect test)
TINY_MODEL = "llama_4k"
TINY_BUILD = BuildConfig(max_batch_size=4, max_input_len=64, max_seq_len=4096)


class Served:
    """An engine, a runner on it (the reference), and a decoupled Triton server serving it."""

    def __init__(self, kind, engine_dir, runner, server, eos):
        self.kind, self.engine_dir, self.runner, self.server, self.eos = kind, engine_dir, runner, server, eos
        self.http = Http(server.http_url)
        self.tokenizer = runner.tokenizer
        bc = runner.config.build_config
        self.max_batch_size, self.max_input_len, self.max_seq_len = bc.max_batch_size, bc.max_input_len, bc.max_seq_len

    def expected(self, prompt_ids, max_tokens, end_id="eos"):
        from trtbuild.runtime import SamplingConfig

        end = self.eos if end_id == "eos" else end_id
        out = self.runner.generate([prompt_ids], SamplingConfig(max_new_tokens=max_tokens, end_id=end))
        return list(out.output_ids[0])

    def expected_batch(self, prompts_ids, max_tokens):
        """One batched runner.generate (greedy answers do not depend on the batch)."""
        from trtbuild.runtime import SamplingConfig

        result = []
        for i in range(0, len(prompts_ids), self.max_batch_size):
            out = self.runner.generate(prompts_ids[i:i + self.max_batch_size],
                                       SamplingConfig(max_new_tokens=max_tokens, end_id=self.eos))
            result.extend(list(o) for o in out.output_ids)
        return result

    def encode(self, text):
        return self.tokenizer.encode(text).ids

    def decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=True)


ENGINES = [pytest.param("tiny", id="tiny"), pytest.param("tiny_tp2", id="tiny_tp2"),
           pytest.param("real", id="real", marks=pytest.mark.slow)]


@pytest.fixture(scope="module", params=ENGINES)
def served(request, tiny_models, engines, tmp_path_factory, triton_venv):
    from trtbuild.runtime import ModelRunner

    kind = request.param
    served_engine = None
    if kind == "tiny":
        engine = engines.engine(tiny_models[TINY_MODEL], TINY_BUILD)
        threads = 1
    elif kind == "tiny_tp2":  # the model starts the other rank itself (orchestrator mode)
        from trtbuild.builder import build_engine

        engine = engines.engine(tiny_models[TINY_MODEL], TINY_BUILD)  # the reference: one rank
        served_engine = tmp_path_factory.mktemp("tp2") / "engine"
        build_engine(engines.checkpoint(tiny_models[TINY_MODEL]), served_engine, TINY_BUILD, progress=False,
                     tp_size=2)
        threads = 1
    else:
        model_dir = request.getfixturevalue("real_model_dir")
        engine = engines.engine(model_dir, BuildConfig(max_batch_size=16, max_input_len=256, max_seq_len=1024))
        threads = 2
    runner = ModelRunner.from_dir(engine, num_threads=threads)
    eos = runner.config.pretrained_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    root = tmp_path_factory.mktemp(f"served-{kind}")
    try:
        repo = make_model_repo(served_engine or engine, root / "repo", decoupled=True, num_threads=threads)
        with TritonServer(repo, timeout=300) as server:
            yield Served(kind, engine, runner, server, eos)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if served_engine is not None:
            shutil.rmtree(served_engine.parent, ignore_errors=True)


@pytest.fixture(autouse=True)
def _server_outlives_the_test(request):
    """A test that kills the server fails with what the server said, not the next test with
    'connection refused'."""
    yield
    if "served" in request.fixturenames:
        server = request.getfixturevalue("served").server
        if server.proc.poll() is not None:
            pytest.fail(f"tritonserver exited with code {server.proc.returncode} during this test:\n"
                        f"{server.log_tail(80)}")


# ------------------------------------------------------------------------------ no server

def test_word_list_format_round_trip():
    words = [[[5, 6], [7]], [], [[1, 2, 3]]]
    arr = to_word_list_format(words)
    assert arr.dtype == np.int32 and arr.shape == (3, 2, 3)
    assert arr[0].tolist() == [[5, 6, 7], [2, 3, -1]]
    assert arr[1].tolist() == [[0, 0, 0], [-1, -1, -1]]
    assert from_word_list_format(arr) == words
    with pytest.raises(TrtbuildError, match="offsets"):
        from_word_list_format(np.array([[[5, 6], [3, -1]]], dtype=np.int32))


def test_guarded_sender_is_never_polled_after_the_final_response():
    """Triton frees a response factory at the final flag; polling it then crashed the server."""
    FINAL = 1

    class Factory:  # stands in for pb_utils' sender: any use after the final flag is a crash
        freed = False
        sent = []

        def send(self, response=None, flags=0):
            assert not self.freed
            self.sent.append((response, flags))
            self.freed = bool(flags & FINAL)

        def is_cancelled(self):
            assert not self.freed, "is_cancelled() on a freed response factory"
            return False

    sender = GuardedSender(Factory(), FINAL)
    stop = threading.Event()
    errors = []

    def poll():
        while not stop.is_set():
            try:
                sender.is_cancelled()
            except AssertionError as e:
                errors.append(e)

    pollers = [threading.Thread(target=poll) for _ in range(4)]
    for t in pollers:
        t.start()
    for i in range(200):
        sender.send(f"token {i}")
    sender.send(flags=FINAL)
    time.sleep(0.05)
    stop.set()
    for t in pollers:
        t.join()
    assert not errors and len(Factory.sent) == 201 and not sender.is_cancelled()
    with pytest.raises(RuntimeError, match="already sent"):
        sender.send("late")


def test_guarded_sender_sends_a_cancelled_final_flag_late():
    """After a client went away, the final flag waits out cancelled_final_delay (Triton 2.51's
    gRPC frontend crashed on a final response that came in while it tore a closed stream down);
    a live request's final flag goes at once. asked_and_live() asks the server only while that
    can say something new."""
    FINAL = 1

    class Factory:
        def __init__(self, cancelled):
            self.cancelled, self.asked, self.sent = cancelled, 0, []

        def send(self, response=None, flags=0):
            self.sent.append((response, flags))

        def is_cancelled(self):
            self.asked += 1
            return self.cancelled

    live = GuardedSender(Factory(False), FINAL, cancelled_final_delay=0.5)
    t0 = time.monotonic()
    assert live.asked_and_live() and live.asked_and_live() and live._sender.asked == 2
    live.send("token")
    live.send(flags=FINAL)
    assert time.monotonic() - t0 < 0.25
    assert not live.asked_and_live() and live._sender.asked == 2  # closed: never asked again

    factory = Factory(True)
    gone = GuardedSender(factory, FINAL, cancelled_final_delay=0.5)
    assert not gone.asked_and_live() and gone.is_cancelled() and factory.asked == 1
    t0 = time.monotonic()
    gone.send(flags=FINAL)
    assert time.monotonic() - t0 >= 0.45 and factory.sent == [(None, FINAL)]
    assert gone.is_cancelled() and factory.asked == 1


def test_incremental_detokenizer_never_splits_a_character():
    data = "né ✓".encode()
    decode = lambda ids: bytes(ids).decode("utf-8", errors="replace")  # noqa: E731
    detok = IncrementalDetokenizer(decode)
    pieces = [detok.add([b]) for b in data]
    assert "".join(pieces) == "né ✓"
    assert all("\ufffd" not in p for p in pieces)


def tokenizer_only_engine(root: Path, max_input_len=32) -> Path:
    """An engine dir with just config.json and a tokenizer: enough for pre/postprocessing."""
    from conftest import make_tokenizer

    (root / "tokenizer").mkdir(parents=True)
    make_tokenizer(root / "tokenizer")
    (root / "config.json").write_text(json.dumps({
        "version": "0.1.0", "pretrained_config": {"eos_token_id": 1, "bos_token_id": 0},
        "build_config": {"max_batch_size": 4, "max_input_len": max_input_len, "max_seq_len": 64}}))
    return root


def test_triton_repo_command(tmp_path, capsys):
    engine = tokenizer_only_engine(tmp_path / "engine")
    out = tmp_path / "repo"
    assert triton_repo_main(["--engine_dir", str(engine), "--output", str(out), "--decoupled",
                             "--instance_count", "2", "--prompt_lookup_num_tokens", "5",
                             "--disable_kv_cache_reuse"]) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(
        ["ensemble", "postprocessing", "preprocessing", "tensorrt_llm", "tensorrt_llm_bls"])
    # every model needs a version dir, the ensemble's empty one too (git drops empty dirs,
    # so the template has none: a repo without it fails "No model version was found")
    assert all((p / "1").is_dir() for p in out.iterdir() if p.is_dir())
    llm = (out / "tensorrt_llm" / "config.pbtxt").read_text()
    assert "decoupled: true" in llm and "count: 2" in llm and "max_batch_size: 4" in llm
    # the scheduling flags become the tensorrt_llm model's parameters, read back as the same flags
    from trtbuild.cli.scheduling_args import args_from_parameters
    from trtbuild.serving import model_parameter

    params = {m.group(1): {"string_value": m.group(2)}
              for m in re.finditer(r'key: "(\w+)" value: \{ string_value: "([^"]*)" \}', llm)}
    flags = args_from_parameters({k: model_parameter({"parameters": params}, k) for k in params})
    assert flags.prompt_lookup_num_tokens == 5 and flags.disable_kv_cache_reuse and flags.max_num_tokens is None
    # one BLS instance per request at once (its model serves one request at a time): by default
    # as many as the batch has slots
    assert "count: 4 kind: KIND_CPU" in (out / "tensorrt_llm_bls" / "config.pbtxt").read_text()
    assert "bls_instance_count=4" in (out / "README.txt").read_text()
    bls3 = make_model_repo(engine, tmp_path / "bls3", decoupled=True, bls_instance_count=3)
    assert "count: 3 kind: KIND_CPU" in (bls3 / "tensorrt_llm_bls" / "config.pbtxt").read_text()
    assert f'string_value: "{engine.resolve()}"' in llm
    assert "${" not in "".join(p.read_text() for p in out.rglob("config.pbtxt"))
    # user mistakes: one line, exit code 2
    for argv, message in [
        (["--engine_dir", str(engine), "--output", str(out)], "already exists"),
        (["--engine_dir", str(engine), "--output", str(tmp_path / "r2"), "--max_batch_size", "8"],
         "larger than the engine's max_batch_size 4"),
        (["--engine_dir", str(tmp_path), "--output", str(tmp_path / "r3")], "no config.json"),
        (["--engine_dir", str(engine), "--output", str(tmp_path / "r4"), "--models", "ensemble"],
         "ensemble needs"),
        (["--engine_dir", str(engine), "--output", str(tmp_path / "r5"), "--bls_instance_count", "0"],
         "--bls_instance_count 0 must be at least 1"),
    ]:
        with pytest.raises(SystemExit) as e:
            triton_repo_main(argv)
        assert e.value.code == 2
        assert message in capsys.readouterr().err
    assert triton_repo_main(["--engine_dir", str(engine), "--output", str(out), "--force"]) == 0
    assert "decoupled: false" in (out / "tensorrt_llm" / "config.pbtxt").read_text()


# ------------------------------------------------------------------------------ the launcher

def test_install_and_stub_check(triton_venv):
    proc = subprocess.run([str(triton_venv / "bin" / "python"), str(REPO / "triton_repo" / "launch_triton_server.py"),
                           "--check_only", "--triton_venv", str(triton_venv)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    numpy_major = subprocess.run([str(triton_venv / "bin" / "python"), "-c", "import numpy; print(numpy.__version__)"],
                                 capture_output=True, text=True).stdout.strip().split(".")[0]
    assert int(numpy_major) < 2


def test_tokenizer_models_serve(tmp_path, triton_venv):
    """preprocessing / postprocessing alone on the real server (no engine needed)."""
    engine = tokenizer_only_engine(tmp_path / "engine")
    repo = make_model_repo(engine, tmp_path / "repo", models=("preprocessing", "postprocessing"))
    stale = Path("/dev/shm/triton_python_backend_shm_region_trtbuild_test_stale")
    stale.write_bytes(b"\0" * 16)  # what a crashed stub leaves behind
    assert str(stale) in stale_shm_regions()
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(engine / "tokenizer" / "tokenizer.json"))
    with TritonServer(repo, timeout=120) as server:
        assert not stale.exists()
        http = Http(server.http_url)
        status, out = http.infer("preprocessing", [
            {"name": "text_input", "shape": [1, 1], "datatype": "BYTES", "data": ["the cat sat"]},
            {"name": "stop_words", "shape": [1, 2], "datatype": "BYTES", "data": ["cat", " sat"]},
            {"name": "max_tokens", "shape": [1, 1], "datatype": "INT32", "data": [7]}])
        assert status == 200, out
        outputs = {o["name"]: o for o in out["outputs"]}
        ids = tok.encode("the cat sat").ids
        assert outputs["input_ids"]["data"] == ids
        assert outputs["input_lengths"]["data"] == [len(ids)]
        assert outputs["request_output_len"]["data"] == [7]
        assert outputs["out_end_id"]["data"] == [1]
        words = [tok.encode("cat", add_special_tokens=False).ids, tok.encode(" sat", add_special_tokens=False).ids]
        stop = np.array(outputs["stop_words_list"]["data"]).reshape(outputs["stop_words_list"]["shape"])
        assert from_word_list_format(stop) == [words]

        status, out = http.infer("postprocessing", [
            {"name": "output_ids", "shape": [1, 1, len(ids)], "datatype": "INT32", "data": ids},
            {"name": "sequence_length", "shape": [1, 1], "datatype": "INT32", "data": [len(ids)]}])
        assert status == 200, out
        assert out["outputs"][0]["data"] == ["the cat sat"]

        # errors come back as errors; the server stays up
        status, out = http.infer("preprocessing", [
            {"name": "text_input", "shape": [1, 1], "datatype": "BYTES", "data": ["the cat " * 40]}])
        assert status == 400 and "max_input_len is 32" in out["error"]
        status, out = http.infer("preprocessing", [
            {"name": "max_tokens", "shape": [1, 1], "datatype": "INT32", "data": [3]}])
        assert status == 400 and "text_input is required" in out["error"]
        status, out = http.infer("preprocessing", [
            {"name": "text_input", "shape": [1, 1], "datatype": "INT32", "data": [3]}])
        assert status == 400 and "expects 'BYTES'" in out["error"]
        assert http.ready()
    assert server.proc.poll() is not None


def test_launch_timeout_kills_a_server_stuck_loading(tmp_path, triton_venv):
    """A model that never finishes loading: the wait times out, SIGTERM then SIGKILL."""
    model = tmp_path / "repo" / "stuck"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(
        'name: "stuck"\nbackend: "python"\nmax_batch_size: 1\n'
        'input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        'output [ { name: "y" data_type: TYPE_FP32 dims: [ 1 ] } ]\n')
    (model / "1" / "model.py").write_text(
        "import time\nclass TritonPythonModel:\n    def initialize(self, args):\n        time.sleep(3600)\n")
    server = TritonServer(tmp_path / "repo", timeout=8, stop_grace=3, log_file=tmp_path / "server.log")
    t0 = time.monotonic()
    with pytest.raises(LaunchError, match="not ready after 8 s"):
        server.start()
    assert time.monotonic() - t0 < 60
    assert server.proc.poll() is not None


def test_launcher_cli_stops_on_sigterm(tmp_path, triton_venv):
    engine = tokenizer_only_engine(tmp_path / "engine")
    repo = make_model_repo(engine, tmp_path / "repo", models=("preprocessing", "postprocessing"))
    from launch_triton_server import free_port

    http_port, grpc_port = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, str(REPO / "triton_repo" / "launch_triton_server.py"),
                             "--model_repo", str(repo), "--http_port", str(http_port), "--grpc_port", str(grpc_port),
                             "--log_file", str(tmp_path / "server.log")],
                            stderr=subprocess.PIPE, text=True)
    try:
        line, said = "", []
        deadline = time.monotonic() + 120
        while "ready" not in line and time.monotonic() < deadline:
            line = proc.stderr.readline()
            said.append(line)
            if not line and proc.poll() is not None:
                break
        log = (tmp_path / "server.log").read_text()
        assert "ready" in line, log
        assert Http(f"127.0.0.1:{http_port}").ready()
        # without a GPU, the server's CUDA error lines get one note that they are harmless
        notes = [s for s in said if CUDA_NOTE in s]
        assert len(notes) == needs_cuda_note(log.splitlines()), said
        proc.terminate()
        assert proc.wait(timeout=60) == 0
        assert not Http(f"127.0.0.1:{http_port}").ready()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------ end to end

def test_greedy_matches_runner(served):
    """Triton's answers (ensemble text and tensorrt_llm ids) equal runner.generate's."""
    n = 24
    for prompt in PROMPTS[:4]:
        ids = served.encode(prompt)
        want = served.expected(ids, n)
        status, out = served.http.generate("ensemble", {"text_input": prompt, "max_tokens": n})
        assert status == 200, out
        assert out["text_output"] == served.decode(want), prompt
        assert stream_ids(served.http, ids, n, served.eos) == want, prompt
        status, out = served.http.generate("tensorrt_llm_bls", {"text_input": prompt, "max_tokens": n})
        assert status == 200, out
        assert out["text_output"] == served.decode(want), prompt


def test_presence_and_frequency_penalties(served):
    """presence_penalty / frequency_penalty (TensorRT-LLM's input names) reach the sampler through
    the ensemble and the BLS model: the answer equals runner.generate's with the same penalties."""
    from trtbuild.runtime import SamplingConfig

    prompt, n = PROMPTS[0], 24
    penalties = {"presence_penalty": 1.2, "frequency_penalty": 0.8}
    ids = served.encode(prompt)
    want = served.runner.generate([ids], SamplingConfig(max_new_tokens=n, end_id=served.eos, **penalties)).output_ids[0]
    assert list(want) != served.expected(ids, n)  # the penalties change this answer
    for model in ("ensemble", "tensorrt_llm_bls"):
        status, out = served.http.generate(model, {"text_input": prompt, "max_tokens": n, **penalties})
        assert status == 200, out
        assert out["text_output"] == served.decode(list(want)), model


def test_streaming_matches_one_response(served):
    prompt = PROMPTS[1]
    n = 20
    status, whole = served.http.generate("ensemble", {"text_input": prompt, "max_tokens": n})
    assert status == 200, whole
    status, events = served.http.stream("tensorrt_llm_bls", {"text_input": prompt, "max_tokens": n, "stream": True})
    assert status == 200, events
    assert len(events) > 1
    assert "".join(e["text_output"] for e in events) == whole["text_output"]
    status, events = served.http.stream("ensemble", {"text_input": prompt, "max_tokens": n, "stream": True})
    assert status == 200 and len(events) == len(served.expected(served.encode(prompt), n))


def test_16_concurrent_streams(served):
    """16 streaming requests at once (more than the tiny engine's 4 slots: they queue and join
    the running batch): every stream equals the runner's greedy answer for its prompt."""
    n = 32 if served.kind == "real" else 48
    expected = dict(zip(PROMPTS, served.expected_batch([served.encode(p) for p in PROMPTS], n)))
    results, errors = {}, []

    def ids_client(prompt):
        try:
            results[prompt] = ("ids", stream_ids(served.http, served.encode(prompt), n, served.eos))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append((prompt, repr(e)))

    def text_client(prompt):
        try:
            status, events = served.http.stream("tensorrt_llm_bls", {"text_input": prompt, "max_tokens": n,
                                                                     "stream": True})
            assert status == 200 and all("error" not in e for e in events), events
            results[prompt] = ("text", "".join(e["text_output"] for e in events))
        except BaseException as e:  # noqa: BLE001
            errors.append((prompt, repr(e)))

    threads = [threading.Thread(target=ids_client if i % 2 == 0 else text_client, args=(p,))
               for i, p in enumerate(PROMPTS)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    elapsed = time.monotonic() - t0
    assert not errors, errors
    assert len(results) == 16
    for prompt, (kind, got) in results.items():
        want = expected[prompt] if kind == "ids" else served.decode(expected[prompt])
        assert got == want, (prompt, kind)
    print(f"16 concurrent streams of {n} tokens in {elapsed:.1f} s")


def _cancel_lines(served) -> int:
    return served.server.log().count("cancelled by the client")


def test_client_disconnect_frees_the_slot(served):
    """Fill every batch slot with long streams (tensorrt_llm directly and through the BLS model),
    drop the connections after the first tokens: the requests are cancelled (the server logs it)
    and a new request runs at once."""
    slots = served.max_batch_size
    prompt = served.encode(PROMPTS[0])
    long = min(served.max_seq_len - len(prompt) - 1, 4000)
    before = _cancel_lines(served)
    conns = []
    try:
        for i in range(slots):
            if i % 2 == 0:
                conn, resp = served.http.open_stream("tensorrt_llm", {
                    "input_ids": prompt, "request_output_len": long, "end_id": -1, "streaming": True})
            else:
                conn, resp = served.http.open_stream("tensorrt_llm_bls", {
                    "text_input": PROMPTS[0], "max_tokens": long, "end_id": -1, "stream": True})
            assert resp.status == 200
            conns.append((conn, resp))
        for conn, resp in conns:
            first = next(Http.events(resp))
            assert "output_ids" in first or "text_output" in first, first
    finally:
        for conn, _ in conns:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(2)
            conn.close()
    deadline = time.monotonic() + 60
    while _cancel_lines(served) - before < slots and time.monotonic() < deadline:
        time.sleep(0.2)
    log = served.server.log()
    assert _cancel_lines(served) - before == slots, log[-3000:]
    for line in [ln for ln in log.splitlines() if "cancelled by the client" in ln][-slots:]:
        done = int(line.split("after ")[1].split(" of")[0])
        assert done < long, line
    t0 = time.monotonic()
    short = served.expected(prompt, 8)
    assert stream_ids(served.http, prompt, 8, served.eos) == short
    assert time.monotonic() - t0 < 30


def test_errors_come_back_and_the_server_stays_up(served):
    http = served.http
    too_long = " ".join(["word"] * (served.max_input_len + 10))
    status, out = http.generate("ensemble", {"text_input": too_long, "max_tokens": 4})
    assert status == 400 and f"max_input_len is {served.max_input_len}" in out["error"], out
    status, events = http.stream("tensorrt_llm", {"input_ids": [5] * (served.max_input_len + 1),
                                                  "request_output_len": 4, "streaming": True})
    assert "max_input_len" in events[0]["error"], events
    status, events = http.stream("tensorrt_llm", {"input_ids": [5, 6], "request_output_len": served.max_seq_len,
                                                  "streaming": True})
    assert "max_seq_len" in events[0]["error"], events
    status, out = http.generate("ensemble", {"max_tokens": 4})
    assert status == 400 and "text_input is required" in out["error"], out
    status, out = http.generate("tensorrt_llm_bls", {"max_tokens": 4})
    assert status == 400 and "text_input is required" in out["error"], out
    # wrong dtype: BYTES expected, INT32 sent; FP32 expected, a string sent
    status, out = http.infer("preprocessing", [{"name": "text_input", "shape": [1, 1], "datatype": "INT32",
                                                "data": [3]}])
    assert status == 400 and "expects 'BYTES'" in out["error"], out
    status, out = http.generate("ensemble", {"text_input": "hello", "temperature": "hot"})
    assert status >= 400 and "error" in out, out
    status, out = http.generate("ensemble", {"text_input": "hello", "temperature": -1.0})
    assert status == 400 and "temperature" in out["error"], out
    assert http.ready()
    ids = served.encode(PROMPTS[2])
    assert stream_ids(http, ids, 6, served.eos) == served.expected(ids, 6)


def _client(triton_venv, script, *args, timeout=300):
    return subprocess.run([str(triton_venv / "bin" / "python"), str(CLIENTS / script), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def test_grpc_clients(served, triton_venv):
    url = served.server.grpc_url
    prompt = PROMPTS[0]
    ids = served.encode(prompt)
    want = served.expected(ids, 12)
    text = served.decode(want)
    for extra in ([], ["--streaming"], ["--streaming", "--model-name", "tensorrt_llm_bls"]):
        proc = _client(triton_venv, "end_to_end_grpc_client.py", "-u", url, "-p", prompt, "-o", 12, *extra)
        assert proc.returncode == 0, proc.stderr
        if "--model-name" in extra or not extra:
            assert proc.stdout.rstrip("\n") == text
    proc = _client(triton_venv, "end_to_end_grpc_client.py", "-u", url, "-p", "word " * (served.max_input_len + 5))
    assert proc.returncode == 1 and "max_input_len" in proc.stderr
    for extra in ([], ["--streaming"]):
        proc = _client(triton_venv, "inflight_batcher_llm_client.py", "-u", url,
                       "--input-ids", ",".join(map(str, ids)), "--request-output-len", 12,
                       "--end-id", served.eos, *extra)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines()[0] == ",".join(map(str, want))
    before = _cancel_lines(served)
    proc = _client(triton_venv, "inflight_batcher_llm_client.py", "-u", url, "--input-ids", ",".join(map(str, ids)),
                   "--request-output-len", served.max_seq_len - len(ids) - 1, "--end-id", -1, "--streaming",
                   "--stop-after-ms", 500)
    assert proc.returncode == 0 and "cancelled after" in proc.stderr, proc.stderr
    deadline = time.monotonic() + 30
    while _cancel_lines(served) == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _cancel_lines(served) == before + 1


# ------------------------------------------------------------------------------ non-decoupled

@pytest.fixture(scope="module")
def plain_server(tiny_models, engines, module_tmp, triton_venv):
    """The tiny engine behind a non-decoupled repository: plain HTTP /infer works."""
    from trtbuild.runtime import ModelRunner

    engine = engines.engine(tiny_models[TINY_MODEL], BuildConfig(max_batch_size=4, max_input_len=64, max_seq_len=256))
    runner = ModelRunner.from_dir(engine, num_threads=1)
    repo = make_model_repo(engine, module_tmp / "plain_repo", decoupled=False, num_threads=1)
    with TritonServer(repo, timeout=300) as server:
        yield Served("tiny", engine, runner, server, 1)


def test_non_decoupled_infer(plain_server):
    s = plain_server
    http = s.http
    prompt = PROMPTS[3]
    want = s.expected(s.encode(prompt), 10)
    status, out = http.infer("ensemble", [
        {"name": "text_input", "shape": [1, 1], "datatype": "BYTES", "data": [prompt]},
        {"name": "max_tokens", "shape": [1, 1], "datatype": "INT32", "data": [10]}])
    assert status == 200, out
    assert out["outputs"][0]["data"] == [s.decode(want)]
    # a batch of two prompts of different lengths in one request
    a, b = s.encode(PROMPTS[0]), s.encode(PROMPTS[5])
    width = max(len(a), len(b))
    status, out = http.infer("tensorrt_llm", [
        {"name": "input_ids", "shape": [2, width], "datatype": "INT32",
         "data": a + [0] * (width - len(a)) + b + [0] * (width - len(b))},
        {"name": "input_lengths", "shape": [2, 1], "datatype": "INT32", "data": [len(a), len(b)]},
        {"name": "request_output_len", "shape": [2, 1], "datatype": "INT32", "data": [6, 6]},
        {"name": "end_id", "shape": [2, 1], "datatype": "INT32", "data": [-1, -1]}])
    assert status == 200, out
    outputs = {o["name"]: o for o in out["outputs"]}
    got = np.array(outputs["output_ids"]["data"]).reshape(outputs["output_ids"]["shape"])
    assert got[0, 0].tolist() == s.expected(a, 6, end_id=None)
    assert got[1, 0].tolist() == s.expected(b, 6, end_id=None)
    status, out = http.infer("tensorrt_llm", [
        {"name": "input_ids", "shape": [1, 2], "datatype": "INT32", "data": [5, 6]},
        {"name": "streaming", "shape": [1, 1], "datatype": "BOOL", "data": [True]}])
    assert status == 400 and "--decoupled" in out["error"], out
    status, out = http.generate("tensorrt_llm_bls", {"text_input": prompt, "max_tokens": 10})
    assert status == 200 and out["text_output"] == s.decode(want), out
    assert http.ready()
