"""TensorRT's output during a build: its logger, the progress monitor, Ctrl-C, native prints on fd 2.

TensorRT's own messages come through the ILogger (LogCapture keeps errors and warnings for our
one-line messages, and a few INFO/VERBOSE facts: memory figures, the engine's "Layers:" list);
Myelin also prints "Internal Error: ..." lines straight to fd 2, which native_stderr_to_log routes
to the debug log. Ctrl-C during the native build asks TensorRT to stop through the progress monitor.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import tempfile
import threading
from types import ModuleType
from typing import Any, Iterator

log = logging.getLogger("trtbuild.tensorrt")


class LogCapture:
    """Collects TensorRT's log: errors/warnings for our messages, a few INFO/VERBOSE facts."""

    _KEEP_INFO = ("Total Activation Memory", "Total Weights Memory", "Max Scratch Memory",
                  "Total Host Persistent Memory", "Total Device Persistent Memory",
                  "Engine generation completed", "Failed to open file")

    def __init__(self, verbose: bool):
        self.verbose = verbose
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.info: list[str] = []
        self.layers_text: str | None = None
        self.lock = threading.Lock()

    def handle(self, severity_name: str, msg: str) -> None:
        with self.lock:
            if severity_name in ("INTERNAL_ERROR", "ERROR"):
                self.errors.append(msg)
            elif severity_name == "WARNING":
                self.warnings.append(msg)
            elif msg.startswith("Layers:"):
                self.layers_text = msg
            elif any(k in msg for k in self._KEEP_INFO):
                self.info.append(msg)
        if severity_name in ("INTERNAL_ERROR", "ERROR", "WARNING"):
            log.debug("[TRT] %s %s", severity_name, msg)
        elif self.verbose and (severity_name == "INFO" or log.isEnabledFor(logging.DEBUG)):
            log.debug("[TRT] %s", msg)

    def real_errors(self) -> list[str]:
        """Errors without the 'catchCudaError' echo that follows every failed call on a GPU-less box."""
        errs = [e for e in self.errors if "catchCudaError" not in e]
        return errs or list(self.errors)


def make_logger(trt: ModuleType, capture: LogCapture) -> Any:
    """A trt.ILogger that hands every message to `capture`."""
    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):  # noqa: D401 - TensorRT callback
            capture.handle(getattr(severity, "name", str(severity)).split(".")[-1], msg)

    return _Logger()


class BuildProgress:
    """IProgressMonitor: optional tqdm bar over the top phase, and Ctrl-C cancels the build cleanly."""

    def __init__(self, trt: ModuleType, show: bool):
        self.cancel = False
        self.bar = None
        self.stderr_fd: int | None = None  # the real stderr while fd 2 is captured
        self._bar_file = None
        outer = self

        class Monitor(trt.IProgressMonitor):
            def __init__(self):
                trt.IProgressMonitor.__init__(self)

            def phase_start(self, phase_name, parent_phase, num_steps):
                if parent_phase is None and show and outer.bar is None:
                    from tqdm import tqdm

                    if outer.stderr_fd is not None:
                        outer._bar_file = os.fdopen(os.dup(outer.stderr_fd), "w")
                    outer.bar = tqdm(total=num_steps, desc="TensorRT build", unit="phase", leave=False,
                                     file=outer._bar_file or sys.stderr)

            def step_complete(self, phase_name, step):
                if outer.bar is not None and phase_name == "Building engine":
                    outer.bar.update(1)
                return not outer.cancel

            def phase_finish(self, phase_name):
                if outer.bar is not None and phase_name == "Building engine":
                    outer.bar.n = outer.bar.total
                    outer.bar.refresh()

        self.monitor = Monitor()

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self._bar_file is not None:
            self._bar_file.close()
            self._bar_file = None


@contextlib.contextmanager
def cancel_on_sigint(progress: BuildProgress) -> Iterator[None]:
    """During the native build, Ctrl-C asks TensorRT to stop (via the progress monitor)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        progress.cancel = True

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


@contextlib.contextmanager
def native_stderr_to_log(enabled: bool) -> Iterator[int | None]:
    """Send what native code prints on fd 2 (Myelin's "Internal Error: ..." lines) to the debug log.

    TensorRT's own messages come through the logger; these prints would only precede our one-line
    error with a raw one. Yields a dup of the real stderr (for a progress bar), or None.
    """
    if not enabled:
        yield None
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield None
        return
    with tempfile.TemporaryFile() as cap:
        os.dup2(cap.fileno(), 2)
        try:
            yield saved
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            cap.seek(0)
            text = cap.read().decode(errors="replace").strip()
            if text:
                log.debug("[TRT native stderr] %s", text)
