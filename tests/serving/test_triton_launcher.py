"""triton_repo/launch_triton_server.py without a server: the note that tritonserver's CUDA error
lines are harmless on a machine without a GPU (the launcher's output relay and its log-file
check; the lines are the ones tritonserver 2.51 prints here at every start), and where the triton
venv is: one rule for the launcher and the installer (triton_repo/install_triton.sh,
trtbuild-install-triton), in a checkout and in an installed package."""

from __future__ import annotations

import io
import os
import shlex
import subprocess
import sys
from pathlib import Path

from conftest import REPO

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


# ------------------------------------------------------------------ where the triton venv is

INSTALLER = REPO / "triton_repo" / "install_triton.sh"


def fake_layouts(tmp_path: Path) -> tuple[Path, Path]:
    """(checkout's triton_repo, installed package's triton_repo) holding copies of the launcher
    and the installer, laid out as in a checkout and in site-packages."""
    checkout = tmp_path / "checkout"
    (checkout / "trtbuild").mkdir(parents=True)
    (checkout / "trtbuild" / "__init__.py").write_text("")
    (checkout / "pyproject.toml").write_text("[project]\nname = 'trtbuild'\n")
    package = tmp_path / "venv" / "lib" / "python3.11" / "site-packages" / "trtbuild"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    dirs = (checkout / "triton_repo", package / "triton_repo")
    for d in dirs:
        d.mkdir()
        for f in (REPO / "triton_repo" / "launch_triton_server.py", INSTALLER):
            (d / f.name).write_bytes(f.read_bytes())
    return dirs


def test_default_venv_rule(tmp_path, monkeypatch):
    """$TRTBUILD_TRITON_VENV, else <checkout>/.venv-triton from a checkout, else the per-user one
    (never a dir inside site-packages)."""
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    checkout_dir, installed_dir = fake_layouts(tmp_path)
    user = home / ".cache" / "trtbuild" / "venv-triton"

    assert launcher.checkout_root() == REPO  # this file's checkout
    assert launcher.default_triton_venv({}) == REPO / ".venv-triton"
    assert launcher.checkout_root(checkout_dir) == checkout_dir.parent
    assert launcher.default_triton_venv({}, checkout_dir) == checkout_dir.parent / ".venv-triton"
    assert launcher.checkout_root(installed_dir) is None
    assert launcher.user_triton_venv() == user
    assert launcher.default_triton_venv({}, installed_dir) == user
    for here in (REPO / "triton_repo", checkout_dir, installed_dir):
        assert launcher.default_triton_venv({"TRTBUILD_TRITON_VENV": "/srv/tv"}, here) == Path("/srv/tv")
        assert launcher.default_triton_venv({"TRTBUILD_TRITON_VENV": "~/tv"}, here) == home / "tv"
        assert launcher.default_triton_venv({"TRTBUILD_TRITON_VENV": ""}, here) == \
            launcher.default_triton_venv({}, here)
    # a dir that merely looks like a checkout's top but has no trtbuild/ package is no checkout
    (checkout_dir.parent / "trtbuild" / "__init__.py").unlink()
    assert launcher.default_triton_venv({}, checkout_dir) == user


def test_installer_and_launcher_agree_on_the_venv(tmp_path):
    """The installer makes the venv where the launcher looks: it asks the launcher beside it
    (--print_venv), in a checkout and in an installed package; --venv and the variable win."""
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k != "TRTBUILD_TRITON_VENV"}
    env["HOME"] = str(home)
    checkout_dir, installed_dir = fake_layouts(tmp_path)

    def printed(cmd, extra_env=None):
        proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=tmp_path,
                              env={**env, **(extra_env or {})}, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    for here, want in [(REPO / "triton_repo", REPO / ".venv-triton"),
                       (checkout_dir, checkout_dir.parent / ".venv-triton"),
                       (installed_dir, home / ".cache" / "trtbuild" / "venv-triton")]:
        installer = ["bash", here / "install_triton.sh", "--print_venv"]
        launch = [sys.executable, here / "launch_triton_server.py", "--print_venv"]
        assert printed(installer) == printed(launch) == str(want), here
        assert printed(installer, {"TRTBUILD_TRITON_VENV": str(tmp_path / "tv")}) == \
            printed(launch, {"TRTBUILD_TRITON_VENV": str(tmp_path / "tv")}) == str(tmp_path / "tv")
        assert printed([*installer, "--venv", tmp_path / "v2"]) == str(tmp_path / "v2")
        assert printed([*launch, "--triton_venv", tmp_path / "v2"]) == str(tmp_path / "v2")
    # the checkout's scripts/install_triton.sh runs the same installer
    assert printed(["bash", REPO / "scripts" / "install_triton.sh", "--print_venv"]) == str(REPO / ".venv-triton")


def test_installer_help_and_its_command(capfd):
    from trtbuild import triton_install

    assert triton_install.INSTALLER == INSTALLER.resolve()
    assert triton_install.main(["--help"]) == 0
    out = capfd.readouterr().out
    assert "trtbuild-install-triton [--venv DIR]" in out and "--print_venv" in out
    assert "set -euo" not in out  # the comment block only
    assert triton_install.main(["--no-such-flag"]) == 2
    assert "unknown argument --no-such-flag" in capfd.readouterr().err


def test_launcher_without_a_venv_says_how_to_make_one(tmp_path, capsys):
    assert launcher.main(["--check_only", "--triton_venv", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert f"no triton venv at {tmp_path / 'none'}" in err and "trtbuild-install-triton" in err


def test_printed_launch_command_runs(tmp_path, monkeypatch):
    """trtbuild-triton-repo prints `trtbuild-launch-triton` when that command is this install's,
    else this Python with -m: the -m form works from the checkout's editable install too."""
    from trtbuild import serving

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    command = serving.launch_command()
    assert command == f"{sys.executable} -m trtbuild.triton_repo.launch_triton_server"
    env = {k: v for k, v in os.environ.items() if k not in ("TRTBUILD_TRITON_VENV", "PYTHONPATH")}
    proc = subprocess.run([*shlex.split(command), "--print_venv"], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(REPO / ".venv-triton")

    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "python").symlink_to(sys.executable)
    (bin_ / "trtbuild-launch-triton").write_text("#!/bin/sh\n")
    (bin_ / "trtbuild-launch-triton").chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(bin_ / "python"))
    assert serving.launch_command() == f"{bin_ / 'python'} -m trtbuild.triton_repo.launch_triton_server"
    monkeypatch.setenv("PATH", f"{bin_}:/usr/bin:/bin")  # this install's command is on PATH
    assert serving.launch_command() == "trtbuild-launch-triton"
