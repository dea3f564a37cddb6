"""The one loader of a model's tokenizer: a `tokenizers.Tokenizer` from tokenizer.json, the file
trtbuild-convert copies to <checkpoint>/tokenizer and trt-build to <engine>/tokenizer.

The runtime (trtbuild.runtime), the Triton models and trtbuild-triton-repo (trtbuild.serving) and
calibration (trtbuild.quantization.calibration) all load it here. Only the standard library at
import time (tokenizers when a tokenizer is loaded): no torch, no numpy, so that the Triton models
import it inside the stub's numpy<2 venv.
"""

from __future__ import annotations

import os
from pathlib import Path

from trtbuild.errors import TrtbuildError

TOKENIZER_FILE = "tokenizer.json"
DEFAULT_HINT = "pass --tokenizer_dir with a tokenizer.json"


def tokenizer_file(path: str | os.PathLike) -> Path:
    """path/tokenizer.json for a dir, else path itself (the file)."""
    p = Path(path)
    return p / TOKENIZER_FILE if p.is_dir() else p


def load_tokenizer(path: str | os.PathLike, hint: str = DEFAULT_HINT):
    """A `tokenizers.Tokenizer` from a dir holding tokenizer.json, or from the file itself.

    Without one: TrtbuildError "<file> not found: <hint>", `hint` saying what the caller's user
    should do."""
    from tokenizers import Tokenizer

    file = tokenizer_file(path)
    if not file.is_file():
        raise TrtbuildError(f"{file} not found: {hint}")
    return Tokenizer.from_file(str(file))


__all__ = ["TOKENIZER_FILE", "load_tokenizer", "tokenizer_file"]
