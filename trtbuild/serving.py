"""Serving with Triton: `trtbuild-triton-repo` fills the model-repository templates, and the
helpers that the Triton models share (word lists, parameters; the tokenizer: trtbuild.tokenizer).

    trtbuild-triton-repo --engine_dir E --output REPO [--decoupled] [--max_batch_size N]
                         [--instance_count N] [--bls_instance_count N] [--num_threads N]
                         [--tokenizer_dir T] [--force]

The repository follows tensorrtllm_backend's inflight_batcher_llm: preprocessing (tokenize) →
tensorrt_llm (trtbuild.runtime.InflightBatcher in a Python-backend model) → postprocessing
(detokenize), chained by `ensemble`, plus `tensorrt_llm_bls` (the same chain as one Python model).
Serve it with `trtbuild-launch-triton --model_repo REPO` (the command it prints: launch_command()).

This module imports only the standard library at import time (numpy and tokenizers lazily), so
the Triton models can import it inside the stub's numpy<2 venv.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import string
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from trtbuild.errors import TrtbuildError, cli_entry
from trtbuild.tokenizer import TOKENIZER_FILE, load_tokenizer


def _triton_repo_dir() -> Path:
    """The triton_repo/ files (model templates, launcher, clients). pyproject.toml installs the
    checkout's top-level triton_repo/ as package data trtbuild/triton_repo, so a wheel finds them
    beside this module; a checkout (editable install) has them one level up, where they are kept."""
    package = Path(__file__).resolve().parent
    installed = package / "triton_repo"
    return installed if installed.is_dir() else package.parent / "triton_repo"


TRITON_REPO_DIR = _triton_repo_dir()
DEFAULT_TEMPLATE_DIR = TRITON_REPO_DIR / "all_models" / "inflight_batcher_llm"
LAUNCHER = TRITON_REPO_DIR / "launch_triton_server.py"
LAUNCH_COMMAND = "trtbuild-launch-triton"
LAUNCH_MODULE = "trtbuild.triton_repo.launch_triton_server"
MODELS = ("preprocessing", "tensorrt_llm", "postprocessing", "ensemble", "tensorrt_llm_bls")
TOKENIZER_SUBDIR = "tokenizer"
DEFAULT_MAX_TOKENS = 64
CANCELLED_FINAL_DELAY = 0.25  # seconds; see GuardedSender


# --------------------------------------------------------------------------- engine / tokenizer

def read_engine_config(engine_dir: str | os.PathLike) -> dict:
    """The engine dir's config.json as a dict (no runtime import: works without onnxruntime)."""
    path = Path(engine_dir) / "config.json"
    if not path.is_file():
        raise TrtbuildError(f"--engine_dir {engine_dir}: no config.json; build an engine with "
                            f"trt-build --checkpoint_dir C --output_dir E")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TrtbuildError(f"{path} is not valid JSON ({e}); rebuild the engine") from e
    if "build_config" not in cfg or "pretrained_config" not in cfg:
        raise TrtbuildError(f"{path} has no build_config/pretrained_config: not a trtbuild engine "
                            f"dir; rebuild it with trt-build")
    return cfg


def _token_content(tok: Any) -> Optional[str]:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok if isinstance(tok, str) else None


def special_token_ids(tokenizer_dir: str | os.PathLike, tokenizer=None,
                      engine_config: Optional[dict] = None) -> dict[str, Optional[int]]:
    """{"eos": id, "pad": id, "bos": id}: from the engine's pretrained_config first (what the
    converter recorded from the HF config), then tokenizer_config.json / special_tokens_map.json."""
    ids: dict[str, Optional[int]] = {"eos": None, "pad": None, "bos": None}
    if engine_config is not None:
        pc = engine_config.get("pretrained_config", {})
        for key in ids:
            v = pc.get(f"{key}_token_id")
            if isinstance(v, list):
                v = v[0] if v else None
            if isinstance(v, int):
                ids[key] = v
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = Path(tokenizer_dir) / name
        if not path.is_file() or tokenizer is None:
            continue
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, OSError):
            continue
        for key in ids:
            if ids[key] is None:
                content = _token_content(data.get(f"{key}_token"))
                if content is not None:
                    ids[key] = tokenizer.token_to_id(content)
    return ids


# the Triton models load the tokenizer with trtbuild.tokenizer.load_tokenizer; a repository's
# tokenizer_dir is a dir holding tokenizer.json (checked when the repository is made)
TOKENIZER_HINT = ("convert the model with its tokenizer files (trtbuild-convert copies them to "
                  "<checkpoint>/tokenizer and trt-build to <engine>/tokenizer) or pass --tokenizer_dir")


# ------------------------------------------------------------------- word lists (stop/bad words)

def to_word_list_format(batch_words: Sequence[Sequence[Sequence[int]]]):
    """TensorRT-LLM's stop/bad words tensor: int32 [batch, 2, L]; row 0 the concatenated ids
    (padded with 0), row 1 the cumulative end offsets of each word (padded with -1)."""
    import numpy as np

    flat_ids, offsets = [], []
    for words in batch_words:
        ids: list[int] = []
        offs: list[int] = []
        for w in words:
            if len(w) == 0:
                continue
            ids.extend(int(t) for t in w)
            offs.append(len(ids))
        flat_ids.append(ids)
        offsets.append(offs)
    width = max(1, max((len(x) for x in flat_ids), default=0))
    out = np.zeros((len(batch_words), 2, width), dtype=np.int32)
    out[:, 1, :] = -1
    for i, (ids, offs) in enumerate(zip(flat_ids, offsets)):
        out[i, 0, :len(ids)] = ids
        out[i, 1, :len(offs)] = offs
    return out


def from_word_list_format(arr) -> list[list[list[int]]]:
    """Inverse of to_word_list_format: [batch, 2, L] (or [2, L]) → per row a list of words."""
    import numpy as np

    a = np.asarray(arr)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3 or a.shape[1] != 2:
        raise TrtbuildError(f"a stop/bad words list must be int32 [batch, 2, L]; got shape "
                            f"{list(np.asarray(arr).shape)}")
    result = []
    for row in a:
        ids, offs = row[0].tolist(), row[1].tolist()
        words, prev = [], 0
        for off in offs:
            if off < 0:
                break
            if off <= prev or off > len(ids):
                raise TrtbuildError(f"bad stop/bad words offsets {offs}: must increase and stay "
                                    f"within the {len(ids)} ids")
            words.append([int(t) for t in ids[prev:off]])
            prev = off
        result.append(words)
    return result


class IncrementalDetokenizer:
    """Streams text from growing token ids without splitting a multi-byte character: decodes the
    whole sequence and emits the new suffix only once it no longer ends in U+FFFD."""

    def __init__(self, decode):
        self.decode = decode  # list[int] -> str
        self.ids: list[int] = []
        self.emitted = ""

    def add(self, new_ids: Iterable[int], final: bool = False) -> str:
        self.ids.extend(int(t) for t in new_ids)
        text = self.decode(self.ids)
        if text.endswith("\ufffd") and not final:
            return ""
        if text.startswith(self.emitted):
            delta = text[len(self.emitted):]
        else:  # the decoder rewrote earlier text (rare: cleanup rules); send the tail only
            common = os.path.commonprefix([text, self.emitted])
            delta = text[len(common):]
        self.emitted = text
        return delta


class GuardedSender:
    """A decoupled Triton response sender that one thread may send on while another polls it.

    Triton's python backend frees a request's response factory once the final response is
    sent; `is_cancelled()` after that reads freed memory and kills the whole server (SIGSEGV in
    TRITONBACKEND_ResponseFactoryIsCancelled, seen under load). Here sends and polls take one
    lock, and polls after the final response answer from what was last seen.

    `send` holds Python references to the response's output tensors until the send returns:
    the stub of Triton 2.51 (python_backend r24.10) sends with the GIL released and drops the
    outputs the client did not request right there, and its ~PbTensor frees the numpy array
    without taking the GIL, which corrupts the heap of a stub whose other threads run Python.
    With our references alive that drop only lowers a count; the arrays die here, with the GIL.

    The final flag of a request whose client went away is sent no sooner than
    `cancelled_final_delay` seconds after the cancellation was first seen. Triton 2.51's gRPC
    frontend (server r24.10) kills the server (SIGSEGV, or SIGABRT after "API misuse of type
    GRPC_CALL_ERROR_TOO_MANY_OPERATIONS", both in ModelStreamInferHandler::Process) when the
    final response of a stream whose connection closed comes in while the frontend is still
    tearing that stream down: its cancellation handling releases the stream's state while an
    event for it is still queued (races of this kind were fixed upstream after 2.51, server PRs
    #7840 and #8078). Seen here in 4 of 5 runs of 3000 gRPC streams to tensorrt_llm with a third
    of the connections closed mid-stream; in none of 8 such runs with the final flag 0.2-0.25 s
    late, nor in 5 with tritonclient's cancel (stop_stream(cancel_requests=True)) instead of a
    closed connection, nor with HTTP disconnects. The delay narrows a race in a server binary
    we cannot change; it does not close it.
    """

    def __init__(self, sender, final_flag: int,
                 cancelled_final_delay: float = CANCELLED_FINAL_DELAY):
        self._sender = sender
        self._final_flag = final_flag
        self._lock = threading.Lock()
        self._cancelled = False
        self._cancelled_at: Optional[float] = None
        self.cancelled_final_delay = cancelled_final_delay
        self.closed = False

    def _seen(self, cancelled: bool) -> bool:
        """Record an answer of the server (under the lock)."""
        self._cancelled = cancelled
        if cancelled and self._cancelled_at is None:
            self._cancelled_at = time.monotonic()
        return cancelled

    def send(self, response=None, flags: int = 0) -> None:
        if flags & self._final_flag and self._cancelled_at is not None:
            wait = self._cancelled_at + self.cancelled_final_delay - time.monotonic()
            if wait > 0:
                time.sleep(wait)  # see the class docstring
        with self._lock:
            if self.closed:
                raise RuntimeError("the final response of this request was already sent")
            if response is None:
                self._sender.send(flags=flags)
            else:
                keep = getattr(response, "output_tensors", list)()  # alive across the send
                self._sender.send(response, flags=flags)
                del keep
            if flags & self._final_flag:
                self.closed = True

    def is_cancelled(self) -> bool:
        with self._lock:
            if not self.closed and not self._cancelled:
                self._seen(bool(self._sender.is_cancelled()))
            return self._cancelled

    def asked_and_live(self) -> bool:
        """Ask the server whether the client is still there; True only if this call did ask
        (the stub answers from a cache once cancelled, and we do after the final response) and
        the answer was "not cancelled". Such a call goes through the stub's one queue to the
        server, behind everything the stub queued before it (tensorrt_llm_bls uses that as a
        barrier: see its model.py)."""
        with self._lock:
            if self.closed or self._cancelled:
                return False
            return not self._seen(bool(self._sender.is_cancelled()))


def model_parameter(model_config: dict, key: str, default: Any = None) -> Any:
    """A `parameters { key: ... value: { string_value: ... } }` entry of a Triton model config;
    unfilled template placeholders (${...}) count as absent."""
    value = model_config.get("parameters", {}).get(key, {}).get("string_value")
    if value is None or value == "" or value.startswith("${"):
        return default
    return value


# ------------------------------------------------------------------------ the repository command

def _fill(text: str, values: dict, source: Path) -> str:
    try:
        return string.Template(text).substitute(values)
    except KeyError as e:
        raise TrtbuildError(f"template {source} uses ${{{e.args[0]}}}, which trtbuild-triton-repo "
                            f"does not fill; fix the template") from e
    except ValueError as e:
        raise TrtbuildError(f"template {source}: {e}") from e


def make_model_repo(engine_dir: str | os.PathLike, output: str | os.PathLike, *,
                    decoupled: bool = False, max_batch_size: Optional[int] = None,
                    instance_count: int = 1, num_threads: Optional[int] = None,
                    bls_instance_count: Optional[int] = None,
                    tokenizer_dir: Optional[str | os.PathLike] = None,
                    max_queue_delay_microseconds: int = 1000,
                    default_max_tokens: int = DEFAULT_MAX_TOKENS,
                    template_dir: Optional[str | os.PathLike] = None, force: bool = False,
                    models: Sequence[str] = MODELS, scheduling: Optional[dict[str, str]] = None) -> Path:
    """Write a Triton model repository for `engine_dir` to `output` (atomically).

    `models` picks a subset (e.g. preprocessing + postprocessing only: a tokenizer service);
    ensemble and tensorrt_llm_bls need the other three. Each tensorrt_llm_bls instance serves
    one request at a time (Triton 2.51's stub is not safe for BLS streams from several threads:
    see its model.py), so `bls_instance_count` (default `max_batch_size`) is how many BLS
    requests run at once. `scheduling`: the tensorrt_llm model's KV cache reuse, chunked prefill
    and speculative decoding, as trtbuild.cli.scheduling_args.scheduling_parameters gives them."""
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise TrtbuildError(f"--models: unknown model(s) {', '.join(unknown)}; choose from "
                            f"{', '.join(MODELS)}")
    needs = {"ensemble": ("preprocessing", "tensorrt_llm", "postprocessing"),
             "tensorrt_llm_bls": ("preprocessing", "tensorrt_llm")}
    for m, deps in needs.items():
        lacking = [d for d in deps if m in models and d not in models]
        if lacking:
            raise TrtbuildError(f"--models: {m} needs {', '.join(lacking)} too")
    from trtbuild.fsutil import atomic_output_dir, check_output_dir

    engine_dir = Path(engine_dir).resolve()
    cfg = read_engine_config(engine_dir)
    build = cfg["build_config"]
    engine_mbs = int(build.get("max_batch_size") or 1)
    if max_batch_size is None:
        max_batch_size = engine_mbs
    if max_batch_size < 1:
        raise TrtbuildError(f"--max_batch_size {max_batch_size} must be at least 1")
    if max_batch_size > engine_mbs:
        raise TrtbuildError(f"--max_batch_size {max_batch_size} is larger than the engine's "
                            f"max_batch_size {engine_mbs}; rebuild with trt-build --max_batch_size "
                            f"{max_batch_size} or pass a smaller value")
    if instance_count < 1:
        raise TrtbuildError(f"--instance_count {instance_count} must be at least 1")
    if bls_instance_count is None:
        bls_instance_count = max_batch_size
    if bls_instance_count < 1:
        raise TrtbuildError(f"--bls_instance_count {bls_instance_count} must be at least 1")
    if num_threads is not None and num_threads < 1:
        raise TrtbuildError(f"--num_threads {num_threads} must be at least 1")
    tokenizer_dir = Path(tokenizer_dir).resolve() if tokenizer_dir else engine_dir / TOKENIZER_SUBDIR
    load_tokenizer(tokenizer_dir / TOKENIZER_FILE, TOKENIZER_HINT)  # fail now, not when the server loads the model
    templates = Path(template_dir) if template_dir else DEFAULT_TEMPLATE_DIR
    missing = [m for m in models if not (templates / m / "config.pbtxt").is_file()]
    if missing:
        hint = ("this trtbuild install lacks its Triton templates: reinstall it"
                if templates == DEFAULT_TEMPLATE_DIR else
                f"pass --template_dir {DEFAULT_TEMPLATE_DIR} (or a copy of it)")
        raise TrtbuildError(f"template dir {templates} lacks {', '.join(missing)}: {hint}")
    out = check_output_dir(output, force, flag="--output")

    values = {
        "engine_dir": str(engine_dir),
        "tokenizer_dir": str(tokenizer_dir),
        "triton_max_batch_size": str(max_batch_size),
        "decoupled_mode": "true" if decoupled else "false",
        "instance_count": str(instance_count),
        "bls_instance_count": str(bls_instance_count),
        "num_threads": "" if num_threads is None else str(num_threads),
        "max_queue_delay_microseconds": str(max_queue_delay_microseconds),
        "max_input_len": str(int(build.get("max_input_len") or 0)),
        "default_max_tokens": str(default_max_tokens),
        "trtbuild_version": _version(),
    }
    from trtbuild.cli.scheduling_args import args_from_parameters, scheduling_parameters

    values.update(scheduling_parameters(args_from_parameters(scheduling or {})))  # a bad value fails here
    with atomic_output_dir(out) as tmp:
        for model in models:
            src = templates / model
            dst = tmp / model
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            # Triton needs a version dir even for the ensemble, which has no files
            # in it; git does not keep empty dirs, so make it here.
            (dst / "1").mkdir(exist_ok=True)
            cfg_path = dst / "config.pbtxt"
            cfg_path.write_text(_fill(cfg_path.read_text(), values, src / "config.pbtxt"))
        (tmp / "README.txt").write_text(
            f"Triton model repository for {engine_dir}\n"
            f"made by trtbuild-triton-repo {_version()}: {', '.join(models)} (decoupled={values['decoupled_mode']}, "
            f"max_batch_size={max_batch_size}, instance_count={instance_count}, "
            f"bls_instance_count={bls_instance_count})\n"
            f"serve: {launch_command()} --model_repo {shlex.quote(str(Path(output).resolve()))}\n")
    return Path(output).resolve()


def launch_command() -> str:
    """The command that starts the launcher from this install: `trtbuild-launch-triton` when the
    one on PATH is this install's (beside this Python), else this Python with -m (a `pip install
    --user`, a checkout whose editable install predates the command): both work from a checkout
    and from an installed wheel, and find the triton venv by the same rule."""
    own = Path(sys.executable).parent / LAUNCH_COMMAND
    found = shutil.which(LAUNCH_COMMAND)
    try:
        if found and own.is_file() and os.path.samefile(found, own):
            return LAUNCH_COMMAND
    except OSError:
        pass
    return f"{shlex.quote(sys.executable)} -m {LAUNCH_MODULE}"


def _version() -> str:
    from trtbuild.version import __version__

    return __version__


@cli_entry
def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="trtbuild-triton-repo",
        description="Make a Triton model repository (preprocessing, tensorrt_llm, postprocessing, "
                    "ensemble, tensorrt_llm_bls) that serves a trtbuild engine.")
    p.add_argument("--engine_dir", required=True, help="engine dir made by trt-build")
    p.add_argument("--output", required=True, help="model repository to write")
    p.add_argument("--decoupled", action="store_true",
                   help="decoupled tensorrt_llm / BLS models: streaming over gRPC or HTTP "
                        "generate_stream (plain HTTP /infer is refused for decoupled models)")
    p.add_argument("--max_batch_size", type=int, default=None,
                   help="Triton's max_batch_size (default: the engine's)")
    p.add_argument("--instance_count", type=int, default=1,
                   help="tensorrt_llm model instances, each with its own runner (default 1)")
    p.add_argument("--bls_instance_count", type=int, default=None,
                   help="tensorrt_llm_bls instances, each serving one request at a time "
                        "(default: the max_batch_size)")
    p.add_argument("--num_threads", type=int, default=None,
                   help="onnxruntime threads per instance (default: the runtime's choice)")
    p.add_argument("--tokenizer_dir", default=None, help="default: <engine_dir>/tokenizer")
    p.add_argument("--max_queue_delay_microseconds", type=int, default=1000)
    p.add_argument("--default_max_tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help="new tokens when a request gives no max_tokens")
    p.add_argument("--template_dir", default=None,
                   help=f"default: {DEFAULT_TEMPLATE_DIR}")
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"comma-separated subset of {','.join(MODELS)} (default: all)")
    p.add_argument("--force", action="store_true", help="replace --output if it exists")
    from trtbuild.cli.scheduling_args import add_scheduling_args, scheduling_parameters

    add_scheduling_args(p)
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    t0 = time.monotonic()
    out = make_model_repo(args.engine_dir, args.output, decoupled=args.decoupled,
                          max_batch_size=args.max_batch_size, instance_count=args.instance_count,
                          bls_instance_count=args.bls_instance_count, num_threads=args.num_threads,
                          tokenizer_dir=args.tokenizer_dir,
                          max_queue_delay_microseconds=args.max_queue_delay_microseconds,
                          default_max_tokens=args.default_max_tokens,
                          template_dir=args.template_dir, force=args.force, models=models,
                          scheduling=scheduling_parameters(args))
    print(f"wrote {out} ({', '.join(models)}; decoupled={'yes' if args.decoupled else 'no'}) "
          f"in {time.monotonic() - t0:.1f} s\n"
          f"serve it: {launch_command()} --model_repo {shlex.quote(str(out))}")
    return 0


if __name__ == "__main__":
    main()
