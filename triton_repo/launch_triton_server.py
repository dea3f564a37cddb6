#!/usr/bin/env python3
"""Start the real tritonserver (from PyPI's nvidia-pytriton) on a trtbuild model repository.

    trtbuild-launch-triton --model_repo REPO [--http_port 8000] [--grpc_port 8001]
        [--timeout 120] [--triton_venv DIR]
    (also: python -m trtbuild.triton_repo.launch_triton_server ..., or this file run by any
    Python: python triton_repo/launch_triton_server.py ... in a checkout)

The Python-backend models run inside Triton's stub process, which embeds the Python of the
"triton venv" made by trtbuild-install-triton (scripts/install_triton.sh in a checkout; numpy<2:
the stub's pybind11 breaks with numpy 2). Where that venv is by default (default_triton_venv, the
installer asks this file): $TRTBUILD_TRITON_VENV, else <checkout>/.venv-triton when this file is
in a checkout, else ~/.cache/trtbuild/venv-triton (an installed trtbuild).
This file only needs the standard library, so it runs under any Python 3.10+ (the project venv,
the triton venv, or a container's python), and tests use it as a context manager:

    from launch_triton_server import TritonServer
    with TritonServer(repo, http_port=..., grpc_port=...) as server:
        server.grpc_url  # "127.0.0.1:PORT"

What it does, in order: finds tritonserver and the stub for the venv's Python; makes a backend
dir (libtriton_python.so + triton_python_backend_utils.py + the stub); checks the stub and the
server with `ldd` (a stub that cannot start leaves the server "loading" forever); removes
/dev/shm/triton_python_backend_shm_region_* files that no live process maps (left by crashed
stubs); starts the server bound to 127.0.0.1; waits for /v2/health/ready with a timeout
(SIGTERM, then SIGKILL); on Ctrl-C / SIGTERM stops the server the same way. On a machine without
an NVIDIA GPU it says once that the server's CUDA error lines are harmless (CUDA_NOTE).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Callable, Iterable, Optional

HERE = Path(__file__).resolve().parent  # <checkout>/triton_repo or site-packages/trtbuild/triton_repo
VENV_ENV = "TRTBUILD_TRITON_VENV"
INSTALL_HINT = "run trtbuild-install-triton (scripts/install_triton.sh in a checkout)"
SHM_GLOB = "/dev/shm/triton_python_backend_shm_region_*"
SERVER_FLAGS = [
    "--allow-metrics=false",
    "--allow-gpu-metrics=false",
    "--allow-cpu-metrics=false",
    "--pinned-memory-pool-byte-size=0",
    "--exit-on-error=true",
    "--strict-readiness=true",
]


# tritonserver's CUDA complaints on a machine without a GPU (the CPU models serve fine), e.g.
#   E... server.cc:241] "CudaDriverHelper has not been initialized."
#   E... ensemble_scheduler.cc:1468] "unable to create stream for ensemble: CUDA driver version
#        is insufficient for CUDA runtime version"
CUDA_LINE = re.compile(r"^[EW]\d{4} .*\b(cuda|gpu)", re.IGNORECASE)
CUDA_NOTE = ("[launch_triton_server] note: this machine has no NVIDIA GPU, so tritonserver's CUDA "
             "error lines (\"CudaDriverHelper has not been initialized\", \"CUDA driver version is "
             "insufficient for CUDA runtime version\") are harmless: the models run on the CPU.")


def has_nvidia_gpu() -> bool:
    """An NVIDIA driver with a device (then CUDA errors from the server are real ones)."""
    return Path("/dev/nvidia0").exists() or Path("/proc/driver/nvidia/gpus").is_dir()


def is_cuda_line(line: str) -> bool:
    """An error or warning line of tritonserver about CUDA or the GPU."""
    return bool(CUDA_LINE.search(line))


def needs_cuda_note(lines: Iterable[str], gpu: Optional[bool] = None) -> bool:
    """Whether the server said something about CUDA that is harmless here: a CUDA line among
    `lines` on a machine without a GPU (`gpu`: whether it has one; None: look)."""
    if gpu is None:
        gpu = has_nvidia_gpu()
    return not gpu and any(is_cuda_line(line) for line in lines)


def relay_output(src: IO[bytes], dst: IO[bytes], gpu: Optional[bool] = None,
                 on_note: Optional[Callable[[], None]] = None) -> bool:
    """Copy the server's output `src` to `dst` line by line until `src` ends, adding CUDA_NOTE
    once after the first CUDA line when the machine has no GPU (then `on_note()`); whether the
    note was added. Keeps reading when `dst` fails (a closed terminal): the server must never
    block on a full pipe."""
    if gpu is None:
        gpu = has_nvidia_gpu()
    noted = False
    for raw in iter(src.readline, b""):
        try:
            dst.write(raw)
            if not gpu and not noted and is_cuda_line(raw.decode(errors="replace")):
                noted = True
                dst.write((CUDA_NOTE + "\n").encode())
                if on_note is not None:
                    on_note()
            dst.flush()
        except (OSError, ValueError):
            continue
    return noted


class LaunchError(RuntimeError):
    """The server could not be started; the message says why and what to do."""


def checkout_root(here: Path = HERE) -> Optional[Path]:
    """The checkout whose triton_repo/ is `here` (this file's dir): its parent holds pyproject.toml
    and trtbuild/. None for an installed trtbuild, whose triton_repo/ is inside the package
    (site-packages/trtbuild/triton_repo), also when a venv links to it."""
    top = Path(here).parent
    if (Path(here).name == "triton_repo" and (top / "pyproject.toml").is_file()
            and (top / "trtbuild" / "__init__.py").is_file()):
        return top
    return None


def user_triton_venv() -> Path:
    """The per-user triton venv of an installed trtbuild (beside its kernels and models)."""
    return Path.home() / ".cache" / "trtbuild" / "venv-triton"


def default_triton_venv(environ: Optional[dict] = None, here: Path = HERE) -> Path:
    """Where the triton venv is unless --triton_venv / --venv says: $TRTBUILD_TRITON_VENV, else
    <checkout>/.venv-triton when this file is in a checkout, else ~/.cache/trtbuild/venv-triton.
    The one rule for the launcher and the installer (which runs `--print_venv`)."""
    env = (os.environ if environ is None else environ).get(VENV_ENV)
    if env:
        return Path(env).expanduser()
    root = checkout_root(here)
    return root / ".venv-triton" if root is not None else user_triton_venv()


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
            return True
        except OSError:
            return False


class TritonInstall:
    """Where tritonserver, the Python-backend pieces and the venv's Python live."""

    def __init__(self, venv: Path, server_root: Optional[Path] = None):
        self.venv = Path(venv).resolve() if Path(venv).exists() else Path(venv)
        self.python = self.venv / "bin" / "python"
        if not self.python.exists():
            raise LaunchError(
                f"no triton venv at {self.venv} (no bin/python); {INSTALL_HINT} "
                f"(or pass --triton_venv / set {VENV_ENV})")
        info = subprocess.run(
            [str(self.python), "-c",
             "import sys, sysconfig\n"
             "print(f'{sys.version_info[0]}.{sys.version_info[1]}')\n"
             "print(sysconfig.get_config_var('LIBDIR') or '')\n"
             "print(sysconfig.get_paths()['purelib'])"],
            capture_output=True, text=True, env=_clean_python_env(os.environ))
        if info.returncode != 0:
            raise LaunchError(f"{self.python} does not run: {info.stderr.strip()}")
        self.py_version, libdir, purelib = info.stdout.splitlines()[:3]
        self.libdir = Path(libdir)
        self.site = Path(purelib)
        self.server_root = Path(server_root) if server_root else None
        if self.server_root is not None:
            # An existing Triton install (NVIDIA's image: /opt/tritonserver) with its own stub.
            self.dist = self.server_root
            self.libs = self.server_root / "lib"
            self.tritonserver = self.server_root / "bin" / "tritonserver"
            self.stub = self.server_root / "backends" / "python" / "triton_python_backend_stub"
            where = f"--server_root {self.server_root}"
        else:
            self.dist = self.site / "pytriton" / "tritonserver"
            self.libs = self.site / "nvidia_pytriton.libs"
            self.tritonserver = self.dist / "bin" / "tritonserver"
            self.stub = (self.dist / "python_backend_stubs" / self.py_version
                         / "triton_python_backend_stub")
            where = f"{self.venv}: {INSTALL_HINT}"
        if not self.tritonserver.exists():
            raise LaunchError(f"no tritonserver at {self.tritonserver} ({where})")
        if not self.stub.exists():
            raise LaunchError(
                f"no Python-backend stub for Python {self.py_version} at {self.stub} ({where}; "
                f"the triton venv's Python must be one the stub is built for)")

    def env(self, base: Optional[dict] = None) -> dict:
        """The server's environment: its libs and libpython on LD_LIBRARY_PATH, the venv's bin
        first on PATH (the stub finds its site-packages through it), no stray PYTHONPATH."""
        env = _clean_python_env(dict(os.environ if base is None else base))
        ld = [str(self.libs), str(self.libdir)]
        if env.get("LD_LIBRARY_PATH"):
            ld.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = ":".join(ld)
        env["PATH"] = f"{self.venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
        env["VIRTUAL_ENV"] = str(self.venv)
        return env

    def backend_dir(self) -> Path:
        """A --backend-directory with python/{libtriton_python.so, triton_python_backend_utils.py,
        triton_python_backend_stub}; made once inside the venv (or a temp dir if read-only)."""
        sources = {
            "libtriton_python.so": self.dist / "backends" / "python" / "libtriton_python.so",
            "triton_python_backend_utils.py":
                self.dist / "backends" / "python" / "triton_python_backend_utils.py",
            "triton_python_backend_stub": self.stub,
        }
        if self.server_root is not None:
            return self.server_root / "backends"
        for name, src in sources.items():
            if not src.exists():
                raise LaunchError(f"{src} is missing from nvidia-pytriton; reinstall it "
                                  f"(trtbuild-install-triton --force)")
        for root in (self.venv / "trtbuild-triton" / "backends",
                     Path(tempfile.gettempdir()) / f"trtbuild-triton-{os.getuid()}-{hashlib.sha1(str(self.venv).encode()).hexdigest()[:12]}" / "backends"):
            try:
                _sync_files(sources, root / "python")
                return root
            except OSError:
                continue
        raise LaunchError("cannot write a backend directory (venv and temp dir not writable)")

    def check(self) -> None:
        """ldd the server and the stub: a stub that cannot start hangs the server in 'loading'."""
        backends = self.backend_dir()
        env = self.env()
        for binary in (self.tritonserver, backends / "python" / "triton_python_backend_stub",
                       backends / "python" / "libtriton_python.so"):
            try:
                out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, env=env)
            except FileNotFoundError:
                return  # no ldd (unusual); the readiness timeout still guards us
            missing = [ln.strip() for ln in out.stdout.splitlines() if "not found" in ln]
            if out.returncode != 0 or missing:
                raise LaunchError(
                    f"{binary} cannot load: {'; '.join(missing) or out.stderr.strip()} "
                    f"(LD_LIBRARY_PATH={env['LD_LIBRARY_PATH']}); the Python of {self.venv} "
                    f"must be a shared-library build (libpython{self.py_version}.so)")
            if binary.name == "triton_python_backend_stub":
                libpy = [ln for ln in out.stdout.splitlines() if "libpython" in ln and "=>" in ln]
                if libpy:
                    resolved = Path(libpy[0].split("=>")[1].split("(")[0].strip())
                    if f"libpython{self.py_version}." not in libpy[0]:
                        raise LaunchError(
                            f"the stub {binary} is built for another Python ({libpy[0].split()[0]}) "
                            f"than the triton venv's {self.py_version}; remake the venv with that "
                            f"Python (trtbuild-install-triton --python ... --force)")
                    own = self.libdir / resolved.name
                    if own.exists() and os.path.realpath(own) != os.path.realpath(resolved):
                        # Another Python's libpython would run the models with the wrong stdlib.
                        raise LaunchError(
                            f"the stub loads {resolved}, not {own} of the triton venv's Python "
                            f"(an RPATH or ld.so.conf entry wins over LD_LIBRARY_PATH)")


def _clean_python_env(env: dict) -> dict:
    env = dict(env)
    for var in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "VIRTUAL_ENV",
                "__PYVENV_LAUNCHER__"):
        env.pop(var, None)
    return env


def _sync_files(sources: dict, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name, src in sources.items():
        dst = dest / name
        st = src.stat()
        if dst.exists() and dst.stat().st_size == st.st_size and dst.stat().st_mtime >= st.st_mtime:
            continue
        tmp = dest / f".{name}.{os.getpid()}.tmp"
        shutil.copy2(src, tmp)
        os.chmod(tmp, st.st_mode | 0o755 if name.endswith("stub") else st.st_mode)
        os.replace(tmp, dst)


def stale_shm_regions() -> list[str]:
    """Python-backend shared-memory files that no live process has mapped or open."""
    files = set(glob.glob(SHM_GLOB))
    if not files:
        return []
    in_use: set[str] = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    if "triton_python_backend_shm_region_" in line:
                        in_use.add(line.split(None, 5)[-1].strip().replace(" (deleted)", ""))
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if "triton_python_backend_shm_region_" in target:
                        in_use.add(target)
    return sorted(f for f in files if f not in in_use)


def remove_stale_shm_regions() -> list[str]:
    removed = []
    for path in stale_shm_regions():
        with contextlib.suppress(OSError):
            os.unlink(path)
            removed.append(path)
    return removed


def _stop_process(proc: subprocess.Popen, grace: float = 15.0) -> int:
    """SIGTERM (Triton unloads models and exits), then SIGKILL after `grace` seconds."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
    # Stubs are in the server's process group; any orphan still alive goes too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode


class TritonServer:
    """A running tritonserver; a context manager that always stops it.

    TritonServer(model_repo, http_port=None, grpc_port=None, timeout=120, triton_venv=None,
                 log_file=None, log_verbose=0, extra_args=())
    Ports default to free ones. Logs go to `log_file` (a temp file if None; None + verbose
    CLI use passes `log_file="-"` for the terminal). `.log()` returns what the server said.
    """

    def __init__(self, model_repo, http_port: Optional[int] = None, grpc_port: Optional[int] = None,
                 timeout: float = 120.0, triton_venv=None, log_file=None, log_verbose: int = 0,
                 extra_args=(), stop_grace: float = 15.0, server_root=None,
                 address: str = "127.0.0.1"):
        self.model_repo = Path(model_repo).resolve()
        if not (self.model_repo.is_dir()):
            raise LaunchError(f"--model_repo {model_repo} is not a directory; make one with "
                              f"trtbuild-triton-repo --engine_dir E --output REPO")
        self.install = TritonInstall(Path(triton_venv) if triton_venv else default_triton_venv(),
                                     server_root or os.environ.get("TRTBUILD_TRITON_SERVER_ROOT"))
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        while self.grpc_port == self.http_port:
            self.grpc_port = free_port()
        self.timeout = timeout
        self.address = address
        self.log_verbose = log_verbose
        self.extra_args = list(extra_args)
        self.stop_grace = stop_grace
        self._log_target = log_file
        self._log_path: Optional[Path] = None
        self._log_handle: Optional[IO] = None
        self.proc: Optional[subprocess.Popen] = None
        self.abort = threading.Event()  # set it (e.g. from a signal handler) to stop waiting
        self._relay: Optional[threading.Thread] = None
        self.cuda_note_shown = False

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def command(self, backends: Path) -> list[str]:
        return [
            str(self.install.tritonserver),
            f"--model-repository={self.model_repo}",
            f"--backend-directory={backends}",
            f"--cache-directory={self.install.dist / 'caches'}",
            f"--http-address={self.address}", f"--http-port={self.http_port}",
            f"--grpc-address={self.address}", f"--grpc-port={self.grpc_port}",
            *SERVER_FLAGS,
            f"--log-verbose={self.log_verbose}",
            *self.extra_args,
        ]

    def start(self) -> "TritonServer":
        for flag, port in (("--http_port", self.http_port), ("--grpc_port", self.grpc_port)):
            if not port_is_free(self.address, port):
                # Checked first: a readiness probe could otherwise reach the other server.
                raise LaunchError(f"port {port} is already in use on {self.address}; pass another "
                                  f"{flag} (or stop what listens there)")
        self.install.check()
        removed = remove_stale_shm_regions()
        if removed:
            print(f"[launch_triton_server] removed {len(removed)} stale shared-memory region(s) "
                  f"left by crashed stubs", file=sys.stderr)
        backends = self.install.backend_dir()
        if self._log_target == "-":
            stdout = subprocess.PIPE  # relayed to our stdout by _relay_output, with the note
        else:
            if self._log_target is None:
                fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
                os.close(fd)
                self._log_path = Path(name)
            else:
                self._log_path = Path(self._log_target)
            self._log_handle = open(self._log_path, "wb")
            stdout = self._log_handle
        self.proc = subprocess.Popen(
            self.command(backends), env=self.install.env(), stdout=stdout,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        if self._log_target == "-":
            self._relay = threading.Thread(target=self._relay_output, name="tritonserver-output",
                                           daemon=True)
            self._relay.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _relay_output(self) -> None:
        """The server's output to our stdout, with the CUDA note (log_file="-")."""
        try:
            relay_output(self.proc.stdout, sys.stdout.buffer,
                         on_note=lambda: setattr(self, "cuda_note_shown", True))
        finally:
            self.proc.stdout.close()

    def cuda_note(self) -> Optional[str]:
        """CUDA_NOTE if the server logged CUDA errors to its log file on a machine without a
        GPU and the note was not shown yet (the CLI prints it once, beside "ready")."""
        if self.cuda_note_shown or self._log_path is None:
            return None
        if needs_cuda_note(self.log().splitlines()):
            self.cuda_note_shown = True
            return f"{CUDA_NOTE} (They stay in {self._log_path}.)"
        return None

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LaunchError(f"tritonserver exited with code {self.proc.returncode} while "
                                  f"starting:\n{self.log_tail()}")
            if self.is_ready():
                return
            if self.abort.wait(0.25):
                raise KeyboardInterrupt
        raise LaunchError(f"tritonserver was not ready after {self.timeout:.0f} s (a model "
                          f"stuck loading? a stub that cannot start?):\n{self.log_tail()}")

    def log(self) -> str:
        if self._log_handle is not None:
            self._log_handle.flush()
        if self._log_path is None or not self._log_path.exists():
            return ""
        return self._log_path.read_text(errors="replace")

    def log_tail(self, n: int = 40) -> str:
        text = self.log()
        return "\n".join(text.splitlines()[-n:]) if text else "(server output went to the terminal)"

    def stop(self) -> Optional[int]:
        code = None
        if self.proc is not None:
            code = _stop_process(self.proc, self.stop_grace)
        if self._relay is not None:
            self._relay.join(timeout=5)
            self._relay = None
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        remove_stale_shm_regions()
        return code

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        if self._log_target is None and self._log_path is not None:
            with contextlib.suppress(OSError):
                self._log_path.unlink()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_repo", help="model repository (made by trtbuild-triton-repo)")
    p.add_argument("--http_port", type=int, default=8000)
    p.add_argument("--grpc_port", type=int, default=8001)
    p.add_argument("--address", default="127.0.0.1",
                   help="address to bind HTTP and gRPC to (default 127.0.0.1; 0.0.0.0 in a container)")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds to wait for all models to be ready (default 120)")
    p.add_argument("--triton_venv", default=None,
                   help="venv made by trtbuild-install-triton (default $TRTBUILD_TRITON_VENV, else "
                        "<checkout>/.venv-triton from a checkout, else ~/.cache/trtbuild/venv-triton; "
                        f"here: {default_triton_venv()})")
    p.add_argument("--server_root", default=os.environ.get("TRTBUILD_TRITON_SERVER_ROOT"),
                   help="an existing Triton install to use instead of nvidia-pytriton's, e.g. "
                        "/opt/tritonserver in NVIDIA's image ($TRTBUILD_TRITON_SERVER_ROOT)")
    p.add_argument("--log_verbose", type=int, default=0)
    p.add_argument("--log_file", default="-", help="server log file (default: this terminal)")
    p.add_argument("--check_only", action="store_true",
                   help="prepare the backend dir, ldd-check the server and the stub, and exit")
    p.add_argument("--print_venv", action="store_true",
                   help="print the triton venv it would use and exit")
    args = p.parse_args(argv)
    if args.print_venv:
        print(Path(args.triton_venv).expanduser() if args.triton_venv else default_triton_venv())
        return 0
    try:
        if args.check_only:
            inst = TritonInstall(Path(args.triton_venv) if args.triton_venv else default_triton_venv(),
                                 args.server_root)
            inst.check()
            print(f"ok: tritonserver {inst.tritonserver}\n    stub for Python {inst.py_version}, "
                  f"backends in {inst.backend_dir()}")
            return 0
        if not args.model_repo:
            p.error("--model_repo is required")
        server = TritonServer(args.model_repo, args.http_port, args.grpc_port, args.timeout,
                              args.triton_venv, log_file=args.log_file,
                              log_verbose=args.log_verbose, server_root=args.server_root,
                              address=args.address)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    stop = threading.Event()

    def on_signal(signum, _frame):
        stop.set()
        server.abort.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.start()
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        server.stop()
        return 130
    if stop.is_set():
        server.stop()
        return 130
    note = server.cuda_note()
    if note:
        print(note, file=sys.stderr, flush=True)
    print(f"[launch_triton_server] ready: HTTP {server.http_url}  gRPC {server.grpc_url}  "
          f"(models in {server.model_repo}); Ctrl-C stops", file=sys.stderr, flush=True)
    while not stop.wait(0.5):
        if server.proc.poll() is not None:
            print(f"error: tritonserver exited with code {server.proc.returncode}",
                  file=sys.stderr)
            server.stop()
            return 1
    print("[launch_triton_server] stopping", file=sys.stderr, flush=True)
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
