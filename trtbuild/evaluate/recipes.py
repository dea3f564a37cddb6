"""Quantization recipes side by side: perplexity on several texts, size on disk and decode speed.

Used by the accuracy-gate tests and by benchmarks/quant_table.py. Calibration and evaluation
use different parts of the text (calibrate on one slice, measure on others): a recipe is judged on
every text of `eval_texts`, since one text can hide a loss another shows (W8A16 with activation
blocks of 128: +0.6% on one Wikipedia slice, +1.7% on another).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from trtbuild.builder import build_engine
from trtbuild.engine import BuildConfig
from trtbuild.evaluate.perplexity import engine_perplexity, read_text
from trtbuild.fsutil import dir_size

# name → trt-build quantization flags (applied to the floating-point checkpoint)
RECIPES: dict[str, list[str]] = {
    "fp32": [],
    "w8a16": ["--use_weight_only", "--weight_only_precision", "int8"],
    "w8a16_float_act": ["--use_weight_only", "--weight_only_precision", "int8", "--weight_only_activations", "float"],
    "int8_kv": ["--int8_kv_cache"],
    "sq_w8a8": ["--smoothquant", "0.5", "--per_channel", "--per_token"],
    "rtn_int4": ["--use_weight_only", "--weight_only_precision", "int4"],
    "gptq_int4": ["--use_weight_only", "--weight_only_precision", "int4_gptq"],
    "awq_int4": ["--use_weight_only", "--weight_only_precision", "int4_awq"],
    "rtn_int4_g128": ["--use_weight_only", "--weight_only_precision", "int4", "--per_group", "--group_size", "128"],
    "gptq_int4_g128": ["--use_weight_only", "--weight_only_precision", "int4_gptq", "--per_group", "--group_size",
                       "128"],
    "awq_int4_g128": ["--use_weight_only", "--weight_only_precision", "int4_awq", "--per_group", "--group_size",
                      "128"],
    "rtn_int4_g128_int4_lm_head": ["--use_weight_only", "--weight_only_precision", "int4", "--per_group",
                                   "--group_size", "128", "--lm_head_precision", "int4"],
}


CALIB_CHARS = 200_000  # calibration: ppl.txt[:CALIB_CHARS]; no eval text overlaps it


@dataclass(frozen=True)
class EvalText:
    """A text to measure perplexity on: `path` from `start_char`, or (a .jsonl) its records'
    `field` joined by blank lines."""

    name: str
    path: Path
    start_char: int = 0
    field: str | None = None

    def read(self, num_chars: int) -> str:
        if self.field is None:
            return read_text(self.path, self.start_char, num_chars)
        records = [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return "\n\n".join(r[self.field] for r in records)[self.start_char:self.start_char + num_chars]


def eval_texts(data_dir: Path) -> list[EvalText]:
    """The shared data's evaluation texts: two Wikipedia slices of ppl.txt past the calibration
    slice, and the summarization set's scientific abstracts."""
    return [EvalText("wiki@1.0M", data_dir / "ppl.txt", 1_000_000),
            EvalText("wiki@1.5M", data_dir / "ppl.txt", 1_500_000),
            EvalText("abstracts", data_dir / "summarize.jsonl", 0, "article")]


@dataclass
class RecipeResult:
    name: str
    perplexity: dict[str, float]  # eval text name → perplexity
    size_bytes: int
    decode_tokens_per_s: float | None
    build_seconds: float


def build_recipe(ckpt_dir: Path, engine_dir: Path, flags: list[str], calib_file: Path, calib_size: int = 32,
                 calib_max_seq_length: int = 512, max_seq_len: int = 1024) -> float:
    """Build one recipe's engine from a floating-point checkpoint; returns seconds taken."""
    from trtbuild.cli.build import build_parser
    from trtbuild.quantization.recipe import recipe_from_args

    args = build_parser().parse_args(["--checkpoint_dir", str(ckpt_dir), "--output_dir", str(engine_dir), *flags,
                                      *(["--calib_dataset", str(calib_file), "--calib_size", str(calib_size),
                                         "--calib_max_seq_length", str(calib_max_seq_length)] if flags else [])])
    start = time.time()
    build = BuildConfig(max_batch_size=4, max_input_len=max_seq_len, max_seq_len=max_seq_len,
                        weight_only_activations=args.weight_only_activations,
                        lm_head_precision=args.lm_head_precision)
    build_engine(ckpt_dir, engine_dir, build, force=True, progress=False, recipe=recipe_from_args(args))
    return time.time() - start


def decode_speeds(engine_dirs: dict[str, Path], new_tokens: int = 64, rounds: int = 3,
                  num_threads: int | None = None) -> dict[str, float]:
    """Greedy decode tokens/s at batch 1 after a 32-token prompt, for each engine: every engine is
    loaded and warmed up once, then each round times every engine in turn and the median round is
    kept, so a host whose speed drifts moves all engines alike."""
    import statistics

    from trtbuild.runtime import ModelRunner, SamplingConfig

    runners = {name: ModelRunner.from_dir(d, num_threads=num_threads) for name, d in engine_dirs.items()}
    prompts = {name: [[(1000 + i) % r.vocab_size for i in range(32)]] for name, r in runners.items()}
    for name, runner in runners.items():
        runner.generate(prompts[name], SamplingConfig(max_new_tokens=4))
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            start = time.perf_counter()
            runner.generate(prompts[name], SamplingConfig(max_new_tokens=new_tokens))
            seconds[name].append(time.perf_counter() - start)
    return {name: new_tokens / statistics.median(s) for name, s in seconds.items()}


def evaluate_recipe(name: str, ckpt_dir: Path, work_dir: Path, texts: list[EvalText], calib_file: Path,
                    eval_max_tokens: int, seq_len: int = 512, num_threads: int | None = None) -> RecipeResult:
    """Build `name`'s engine in work_dir/name and measure its perplexity on every text (decode speed:
    decode_speeds)."""
    engine_dir = work_dir / name
    seconds = build_recipe(ckpt_dir, engine_dir, RECIPES[name], calib_file, max_seq_len=2 * seq_len)
    ppl = {t.name: engine_perplexity(engine_dir, t.read(eval_max_tokens * 8), seq_len=seq_len,
                                     max_tokens=eval_max_tokens, batch_size=2, num_threads=num_threads,
                                     progress=False).perplexity for t in texts}
    return RecipeResult(name, ppl, dir_size(engine_dir), None, seconds)


def markdown_table(results: list[RecipeResult]) -> str:
    """One row per recipe: perplexity on each text (and vs fp32), size, decode speed, build time;
    this process's CPU (kernels.cpu_description) is named under the table."""
    from trtbuild.kernels import cpu_description

    base = next((r for r in results if r.name == "fp32"), None)
    texts = list(results[0].perplexity) if results else []
    lines = ["| recipe | " + " | ".join(f"ppl {t}" for t in texts) + " | size MiB | decode tok/s (batch 1) | build s |",
             "|---|" + "---|" * len(texts) + "---|---|---|"]
    for r in results:
        cells = []
        for t in texts:
            rel = f" ({(r.perplexity[t] / base.perplexity[t] - 1) * 100:+.2f}%)" if base and r is not base else ""
            cells.append(f"{r.perplexity[t]:.4f}{rel}")
        tps = f"{r.decode_tokens_per_s:.1f}" if r.decode_tokens_per_s else ""
        lines.append(f"| {r.name} | " + " | ".join(cells) + f" | {r.size_bytes / 2**20:.0f} | {tps} | "
                     f"{r.build_seconds:.0f} |")
    lines.append(f"\nCPU: {cpu_description()}")
    return "\n".join(lines)
