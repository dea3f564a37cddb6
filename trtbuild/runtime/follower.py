"""A rank a server started (trtbuild.runtime.world.spawn_world): it opens its engine of the
multi-rank engine dir and follows rank 0's in-flight batcher until the server shuts it down.

    python -m trtbuild.runtime.follower ENGINE_DIR      (started by MPI, never by hand)
"""

from __future__ import annotations

import sys
from pathlib import Path

from trtbuild.engine import load_engine_config
from trtbuild.errors import cli_entry
from trtbuild.runtime.batcher import follow
from trtbuild.runtime.model_runner import ModelRunner
from trtbuild.runtime.world import spawned_world


@cli_entry
def main(argv: list[str] | None = None) -> None:
    engine_dir = Path((argv if argv is not None else sys.argv[1:])[0])
    config = load_engine_config(engine_dir)
    mapping = config.pretrained_config.mapping
    world = spawned_world(mapping.world_size, mapping.tp_size)
    runner = ModelRunner.open_in_world(engine_dir, config, world)
    follow(runner)
    world.close()


if __name__ == "__main__":
    main()
