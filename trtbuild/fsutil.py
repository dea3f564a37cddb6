"""Atomic output directories: write into a temporary sibling, rename at the end."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from trtbuild.errors import TrtbuildError


def check_output_dir(output_dir: str | os.PathLike, force: bool, flag: str = "--output_dir") -> Path:
    """Refuse an existing output dir unless --force is given."""
    path = Path(output_dir)
    if path.exists() and not force:
        raise TrtbuildError(f"{flag} {path} already exists; pass --force to replace it")
    if path.exists() and not path.is_dir():
        raise TrtbuildError(f"{flag} {path} exists and is not a directory")
    return path


@contextlib.contextmanager
def atomic_output_dir(output_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary dir next to `output_dir`; on success it replaces `output_dir`.

    On any exception (or Ctrl-C) the temporary dir is removed and `output_dir` is untouched, so
    a crash never leaves a half-written checkpoint or engine that looks complete.
    """
    final = Path(output_dir).resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary dir
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def dir_size(path: str | os.PathLike) -> int:
    """Total size in bytes of the files under `path`."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Indented JSON with a final newline (the configs users read)."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def read_json(path: str | os.PathLike, what: str) -> Any:
    """Load a JSON file; a missing or malformed file is a TrtbuildError naming it and `what` it should be."""
    path = Path(path)
    if not path.is_file():
        raise TrtbuildError(f"{path} not found: {what}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TrtbuildError(f"{path} is not valid JSON ({e})") from None
