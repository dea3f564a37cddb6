"""One rank of a multi-rank engine under mpiexec, for the tests: scores and generates the prompts
given (greedy, then sampled without a seed), and rank 0 writes what every rank got.

    mpiexec -n N python rank_worker.py ENGINE_DIR OUT.npz PROMPTS_JSON [NEW_TOKENS]
"""

import json
import sys

import numpy as np

from trtbuild.runtime import ModelRunner, SamplingConfig

engine_dir, out, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
new_tokens = int(sys.argv[4]) if len(sys.argv) > 4 else 8
runner = ModelRunner.from_dir(engine_dir)
scores = runner.score(prompts)
greedy = runner.generate(prompts, SamplingConfig(max_new_tokens=new_tokens, end_id=-1)).output_ids
sampled = runner.generate(prompts, SamplingConfig(max_new_tokens=new_tokens, end_id=-1, top_k=0, top_p=0.95)).output_ids
every_rank = runner.world.comm.gather({"scores": scores, "greedy": greedy, "sampled": sampled}, root=0)
if runner.world.is_leader:
    np.savez(out, **{f"{key}_{rank}": np.array(got[key]) for rank, got in enumerate(every_rank) for key in got})
