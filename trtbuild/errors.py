"""User-facing errors: one clear line, exit code 2, never a bare traceback for a user mistake."""

from __future__ import annotations

import functools
import logging
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable[..., object])


class TrtbuildError(Exception):
    """A mistake in what the user gave us (a file, a tensor, a flag).

    The message names what is at fault and what to do about it.
    """


def cli_entry(main: F) -> F:
    """Wrap a command's main(): a TrtbuildError prints one line and exits 2; Ctrl-C exits 130."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except TrtbuildError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted: nothing was written", file=sys.stderr)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


def setup_logging(level: str = "info") -> None:
    """Configure the root logger from a TensorRT-LLM style --log_level value."""
    levels = {"verbose": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO,
              "warning": logging.WARNING, "error": logging.ERROR, "internal_error": logging.ERROR}
    if level not in levels:
        raise TrtbuildError(f"--log_level {level!r} is not one of {', '.join(levels)}")
    logging.basicConfig(level=levels[level], format="[trtbuild] %(levelname)s %(message)s")
