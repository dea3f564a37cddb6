"""triton_repo/launch_triton_server.py without a server: the note that tritonserver's CUDA error
lines are harmless on a machine without a GPU (the launcher's output relay and its log-file
check). The lines are the ones tritonserver 2.51 prints here at every start."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "triton_repo"))
import launch_triton_server as launcher  # noqa: E402

STARTUP = [
    'I1206 02:33:45.511584 24400 pinned_memory_manager.cc:283] "Pinned memory pool disabled"',
    'I1206 02:33:45.511809 24400 cuda_memory_manager.cc:117] "CUDA memory pool disabled"',
    'E1206 02:33:45.511870 24400 server.cc:241] "CudaDriverHelper has not been initialized."',
    'I1206 02:33:45.513399 24400 model_lifecycle.cc:472] "loading: tensorrt_llm:1"',
    'E1206 02:33:49.141673 24400 ensemble_scheduler.cc:1468] "unable to create stream for ensemble: '
    'CUDA driver version is insufficient for CUDA runtime version"',
    'I1206 02:33:49.154015 24400 grpc_server.cc:2558] "Started GRPCInferenceService at 127.0.0.1:43659"',
]
OTHER_ERRORS = [
    'E1206 02:35:01.000000 24400 python_be.cc:1700] "tensorrt_llm: max_input_len is 64"',
    'W1206 02:33:49.855195 24400 pinned_memory_manager.cc:170] "failed to allocate pinned system memory"',
    'I1206 02:33:45.511809 24400 cuda_memory_manager.cc:117] "CUDA memory pool disabled"',
    "malloc(): unaligned fastbin chunk detected",
]


def test_cuda_lines_are_told_apart():
    assert [launcher.is_cuda_line(line) for line in STARTUP] == [False, False, True, False, True, False]
    assert not any(launcher.is_cuda_line(line) for line in OTHER_ERRORS)
    assert launcher.needs_cuda_note(STARTUP, gpu=False)
    assert not launcher.needs_cuda_note(STARTUP, gpu=True)  # with a GPU they are real errors
    assert not launcher.needs_cuda_note(OTHER_ERRORS, gpu=False)


def test_relay_adds_the_note_once_after_the_first_cuda_line():
    out = io.BytesIO()
    noted = []
    src = io.BytesIO("".join(line + "\n" for line in STARTUP).encode())
    assert launcher.relay_output(src, out, gpu=False, on_note=lambda: noted.append(1))
    lines = out.getvalue().decode().splitlines()
    assert lines == STARTUP[:3] + [launcher.CUDA_NOTE] + STARTUP[3:]  # every server line, in order
    assert noted == [1]

    out = io.BytesIO()
    assert not launcher.relay_output(io.BytesIO("".join(line + "\n" for line in STARTUP).encode()),
                                     out, gpu=True)
    assert out.getvalue().decode().splitlines() == STARTUP


def test_relay_drains_a_real_pipe_when_the_terminal_is_gone():
    """The server must never block on a full pipe: a relay whose destination fails keeps
    reading to the end (here 4 MB through a real pipe, far more than its 64 KiB buffer)."""

    class Gone(io.RawIOBase):
        def write(self, b):
            raise OSError("terminal closed")

    proc = subprocess.Popen([sys.executable, "-c",
                             "import sys\n"
                             "for i in range(40000): sys.stdout.write('E1206 x.cc:1] CUDA %d %s\\n' % (i, 'x' * 80))"],
                            stdout=subprocess.PIPE)
    try:
        launcher.relay_output(proc.stdout, Gone(), gpu=False)
        assert proc.wait(timeout=60) == 0
    finally:
        proc.stdout.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cuda_note_of_a_log_file(tmp_path, monkeypatch):
    """With a log file the CLI prints the note beside "ready" (once), naming the file."""
    monkeypatch.setattr(launcher, "has_nvidia_gpu", lambda: False)
    server = object.__new__(launcher.TritonServer)  # the note needs no install and no server
    server._log_handle = None
    server._log_path = tmp_path / "server.log"
    server._log_path.write_text("\n".join(STARTUP) + "\n")
    server.cuda_note_shown = False
    note = server.cuda_note()
    assert note is not None and note.startswith(launcher.CUDA_NOTE) and str(server._log_path) in note
    assert server.cuda_note() is None  # once

    server.cuda_note_shown = False
    server._log_path.write_text("\n".join(OTHER_ERRORS) + "\n")
    assert server.cuda_note() is None
    monkeypatch.setattr(launcher, "has_nvidia_gpu", lambda: True)
    server._log_path.write_text("\n".join(STARTUP) + "\n")
    assert server.cuda_note() is None
    server._log_path = None  # log_file="-": the relay shows it
    assert server.cuda_note() is None
