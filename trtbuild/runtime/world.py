"""The MPI world a multi-rank engine runs in: one process per rank, launched by mpiexec.

Every rank opens its own rank{r}.engine and runs every step with the same inputs; the engines'
collectives (trtbuild.kernels' AllReduce and AllGather within a pipeline stage, PipelineSend /
PipelineRecv between stages) join their partial results, so each rank of the last stage gets the
whole vocabulary's logits. Its first rank samples and broadcasts the tokens, so sampling with a
random seed (or none) gives every rank the same sequence; rank 0 reads the inputs and prints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

    def broadcast_array(self, array: np.ndarray | None, shape: tuple[int, ...], root: int) -> np.ndarray:
        """`root`'s float32 array of `shape` on every rank (no pickling: logits for scoring)."""
        buffer = np.ascontiguousarray(array, np.float32) if self.rank == root else np.empty(shape, np.float32)
        self.comm.Bcast(buffer, root=root)
        return buffer


def launched_rank() -> int:
    """This process's rank as mpiexec set it in the environment (MPICH's PMI_RANK, Open MPI's
    OMPI_COMM_WORLD_RANK), 0 when not launched by mpiexec: which process of a multi-rank command prints."""
    for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
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
    comm = world.Dup()
    rank = comm.Get_rank()
    stage = comm.Split(color=rank // tp_size, key=rank % tp_size)  # rank = pp_rank * tp_size + tp_rank
    local = world.Split_type(MPI.COMM_TYPE_SHARED)
    local_size = local.Get_size()
    local.Free()
    handles = np.array([stage.handle, MPI.FLOAT.handle, MPI.SUM.handle, comm.handle],
                       dtype=np.uint64).astype(np.int64)
    return RankWorld(comm, rank, comm.Get_size(), local_size, handles, world_size - tp_size, stage)


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
