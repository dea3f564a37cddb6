"""The MPI world a multi-rank engine runs in: one process per rank, launched by mpiexec.

Every rank opens its own rank{r}.engine and runs every step with the same inputs; the engines'
collectives (trtbuild.kernels' AllReduce and AllGather within a pipeline stage, PipelineSend /
PipelineRecv between stages) join their partial results, so each rank of the last stage gets the
whole vocabulary's logits. Its first rank samples and broadcasts the tokens, so sampling with a
random seed (or none) gives every rank the same sequence; rank 0 reads the inputs and prints.
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from trtbuild.errors import TrtbuildError


@dataclass
class RankWorld:
    """This process's place among the ranks of one engine."""

    comm: Any  # the mpi4py communicator of every rank (a duplicate of COMM_WORLD)
    rank: int
    size: int
    local_size: int  # ranks on this machine
    # [4] int64: its stage's tensor-parallel communicator, MPI_FLOAT, MPI_SUM, `comm`: what the
    # engine's collectives are fed (engine_io.MPI_HANDLES)
    handles: np.ndarray
    sampler: int  # the rank that samples: the first of the last pipeline stage, which has the logits
    stage_comm: Any = None  # its stage's tensor-parallel communicator (kept alive while the engine runs)
    spawned: Any = None  # the intercommunicator to the ranks this process spawned (or was spawned by)

    @property
    def is_leader(self) -> bool:
        """Rank 0: it reads the inputs and prints."""
        return self.rank == 0

    @property
    def has_logits(self) -> bool:
        return self.rank >= self.sampler  # the last stage's ranks

    def broadcast(self, value: Any, root: int = 0) -> Any:
        """`root`'s value on every rank (pickled; small values: tokens, prompts, settings)."""
        return self.comm.bcast(value, root=root)

    def close(self) -> None:
        """Leave a spawned world (the other side disconnects too: call it once every rank is done)."""
        if self.spawned is not None:
            self.spawned.Disconnect()
            self.spawned = None

    def broadcast_idle(self, value: Any = None, leader_alive: Callable[[], bool] | None = None) -> Any:
        """Rank 0's value on every rank, waiting without spinning: MPI's blocking broadcast polls
        a core at 100% for as long as it waits, and a follower may wait hours for the next
        request. `leader_alive` (a spawned rank) is asked while waiting; when it says no, the
        rank raises TrtbuildError instead of waiting forever."""
        data = pickle.dumps(value) if self.rank == 0 else b""
        size = np.array([len(data)], np.int64)
        request = self.comm.Ibcast(size, root=0)  # the size without spinning, then the pickled value
        delay, checked = 0.0001, time.monotonic()
        while True:
            if request.Test():
                payload = bytearray(data) if self.rank == 0 else bytearray(int(size[0]))
                self.comm.Bcast(payload, root=0)
                return value if self.rank == 0 else pickle.loads(payload)
            time.sleep(delay)
            delay = min(2 * delay, 0.005)
            if leader_alive is not None and time.monotonic() - checked > 1.0:
                checked = time.monotonic()
                if not leader_alive():
                    raise TrtbuildError("rank 0 went away without shutting this rank down")

    def broadcast_array(self, array: np.ndarray | None, shape: tuple[int, ...], root: int) -> np.ndarray:
        """`root`'s float32 array of `shape` on every rank (no pickling: logits for scoring)."""
        buffer = np.ascontiguousarray(array, np.float32) if self.rank == root else np.empty(shape, np.float32)
        self.comm.Bcast(buffer, root=root)
        return buffer


_LAUNCHED_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")


def launched_by_mpiexec() -> bool:
    return any(name in os.environ for name in _LAUNCHED_VARS)


def launched_rank() -> int:
    """This process's rank as mpiexec set it in the environment (MPICH's PMI_RANK, Open MPI's
    OMPI_COMM_WORLD_RANK), 0 when not launched by mpiexec: which process of a multi-rank command prints."""
    for name in _LAUNCHED_VARS:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def launch_hint(engine_dir: Path, world_size: int) -> str:
    return f"mpiexec -n {world_size} trtbuild-run --engine_dir {engine_dir} ..."


def join_world(engine_dir: Path, world_size: int, tp_size: int) -> RankWorld:
    """The world of this process, which must have the engine's number of ranks (tp_size a stage);
    the error says how to launch it (every rank raises the same one, so none waits for the others)."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise TrtbuildError(f"{engine_dir} is an engine of {world_size} ranks, which run under MPI: install it "
                            f"(pip install 'trtbuild[mpi]') and launch {launch_hint(engine_dir, world_size)}") from None
    world = MPI.COMM_WORLD
    if world.Get_size() != world_size:
        how = "without mpiexec" if world.Get_size() == 1 else f"in a world of {world.Get_size()} ranks"
        raise TrtbuildError(f"{engine_dir} is an engine of {world_size} ranks, started {how}: launch it as "
                            f"{launch_hint(engine_dir, world_size)}")
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C ends the rank at once: Python would only see it once the MPI call the rank is
        # blocked in returns, and it may wait for a rank that is gone; mpiexec then ends the rest
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    return _rank_world(MPI, world.Dup(), world_size, tp_size)


def _rank_world(MPI, comm, world_size: int, tp_size: int, spawned=None) -> RankWorld:
    rank = comm.Get_rank()
    stage = comm.Split(color=rank // tp_size, key=rank % tp_size)  # rank = pp_rank * tp_size + tp_rank
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    local_size = local.Get_size()
    local.Free()
    handles = np.array([stage.handle, MPI.FLOAT.handle, MPI.SUM.handle, comm.handle],
                       dtype=np.uint64).astype(np.int64)
    return RankWorld(comm, rank, comm.Get_size(), local_size, handles, world_size - tp_size, stage, spawned)


FOLLOWER_MODULE = "trtbuild.runtime.follower"


def spawn_world(engine_dir: Path, world_size: int, tp_size: int, lora_dirs: Sequence[str] = ()) -> RankWorld:
    """Rank 0 of a world this process makes by starting the other ranks itself (a server hosting
    the engine, TensorRT-LLM's orchestrator mode): `python -m trtbuild.runtime.follower ENGINE_DIR`
    on this machine, each following rank 0's in-flight batcher (and loading `lora_dirs`, as rank 0 does). MPI starts them through MPICH's
    process manager, which it finds as `mpiexec` beside this Python; they end when this process does."""
    scripts = Path(sys.executable).parent
    python = sys.executable if Path(sys.executable).name.startswith("python") else shutil.which("python3")
    if (scripts / "mpiexec").is_file() and str(scripts) not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = f"{scripts}{os.pathsep}{os.environ.get('PATH', '')}"
    try:
        from mpi4py import MPI
    except ImportError:
        raise TrtbuildError(f"{engine_dir} is an engine of {world_size} ranks, which run under MPI: install it "
                            "(pip install 'trtbuild[mpi]') where this server runs") from None
    if shutil.which("mpiexec") is None:
        raise TrtbuildError(f"{engine_dir} is an engine of {world_size} ranks: starting them needs MPICH's "
                            "mpiexec on PATH (pip install 'trtbuild[mpi]' into this Python's environment)")
    if os.getpgrp() != os.getpid():
        # Should this process be killed, MPICH's process manager kills its whole process group:
        # a group of its own keeps whoever started it (a shell script, a test runner) out of that.
        os.setpgid(0, 0)
    intercomm = MPI.COMM_SELF.Spawn(python, args=["-m", FOLLOWER_MODULE, str(engine_dir), str(os.getpid()), *lora_dirs],
                                    maxprocs=world_size - 1)
    return _rank_world(MPI, intercomm.Merge(high=False), world_size, tp_size, intercomm)


def spawned_world(world_size: int, tp_size: int) -> RankWorld:
    """A rank spawn_world started: its place in its parent's world."""
    from mpi4py import MPI

    parent = MPI.Comm.Get_parent()
    if parent == MPI.COMM_NULL:
        raise TrtbuildError(f"{FOLLOWER_MODULE} is started by a server hosting a multi-rank engine, not by hand")
    return _rank_world(MPI, parent.Merge(high=True), world_size, tp_size, parent)


def agree(world: RankWorld, error: TrtbuildError | None) -> None:
    """Every rank learns whether every rank succeeded: a rank that did not raises its own error, the
    others one naming the first rank that failed."""
    errors = world.comm.allgather(None if error is None else str(error))
    failed = [(rank, message) for rank, message in enumerate(errors) if message is not None]
    if failed and error is None:
        rank, message = failed[0]
        raise TrtbuildError(f"rank {rank} failed: {message}")


def threads_per_rank(world: RankWorld) -> int:
    """The cores this process may use, shared among the ranks on its machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // world.local_size)
