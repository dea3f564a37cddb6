"""A rank a server started (trtbuild.runtime.world.spawn_world): it opens its engine of the
multi-rank engine dir and follows rank 0's in-flight batcher until the server shuts it down.

    python -m trtbuild.runtime.follower ENGINE_DIR LEADER_PID [LORA_DIR ...]   (started by MPI, never by hand)

It ends when rank 0 shuts its batcher down, or, should rank 0 go away without that, once it sees
that process gone.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from trtbuild.engine import load_engine_config
from trtbuild.errors import cli_entry
from trtbuild.runtime.batcher import follow
from trtbuild.runtime.model_runner import ModelRunner
from trtbuild.runtime.world import spawned_world


@cli_entry
def main(argv: list[str] | None = None) -> None:
    args = argv if argv is not None else sys.argv[1:]
    engine_dir, leader_pid = Path(args[0]), int(args[1])
    config = load_engine_config(engine_dir)
    mapping = config.pretrained_config.mapping
    world = spawned_world(mapping.world_size, mapping.tp_size)
    runner = ModelRunner.open_in_world(engine_dir, config, world, lora_dirs=args[2:])
    follow(runner, leader_alive=lambda: _alive(leader_pid))
    world.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    stat = Path(f"/proc/{pid}/stat")  # a zombie has ended too
    return not stat.is_file() or stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


if __name__ == "__main__":
    main()
