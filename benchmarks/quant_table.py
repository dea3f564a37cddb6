"""Recipe × perplexity on three texts × size on disk × decode tokens/s for the default model, in one run.

    python benchmarks/quant_table.py [--model_dir M] [--recipes fp32 w8a16 ...] [--eval_tokens 8192]

Calibration on ppl.txt[:200k], perplexity on the texts of evaluate.recipes.eval_texts (as the
accuracy-gate tests); decode speed measured after every engine is built, in interleaved rounds
(median of --rounds). The table names the CPU it was measured on.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from trtbuild.convert.converter import convert_checkpoint
from trtbuild.evaluate.recipes import CALIB_CHARS, RECIPES, decode_speeds, eval_texts, evaluate_recipe, markdown_table

SHARED = Path(__file__).resolve().parents[2] / "shared"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model_dir", default=None, help="default: the fetched smollm2-135m-instruct")
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--data_dir", default=str(SHARED / "data"), help="holds ppl.txt and summarize.jsonl")
    p.add_argument("--eval_tokens", type=int, default=8192)
    p.add_argument("--seq_len", type=int, default=512, help="perplexity window (engines get max_seq_len 2×)")
    p.add_argument("--num_threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="decode-speed rounds (median)")
    args = p.parse_args()
    model_dir = args.model_dir
    if model_dir is None:
        from trtbuild.fetch import fetch_model

        model_dir = fetch_model("smollm2-135m-instruct")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        convert_checkpoint(model_dir, root / "ckpt", progress=False)
        calib = root / "calib.txt"
        calib.write_text((Path(args.data_dir) / "ppl.txt").read_text()[:CALIB_CHARS])
        texts = eval_texts(Path(args.data_dir))
        results = []
        for name in args.recipes:
            results.append(evaluate_recipe(name, root / "ckpt", root, texts, calib, args.eval_tokens,
                                           seq_len=args.seq_len, num_threads=args.num_threads))
            print(f"{name}: perplexity " + ", ".join(f"{t} {v:.4f}" for t, v in results[-1].perplexity.items()),
                  flush=True)
        speeds = decode_speeds({r.name: root / r.name for r in results}, rounds=args.rounds,
                               num_threads=args.num_threads)
        for r in results:
            r.decode_tokens_per_s = speeds[r.name]
    print(markdown_table(results))


if __name__ == "__main__":
    main()
