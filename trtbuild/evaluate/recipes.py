"""Quantization recipes side by side: perplexity, size on disk and decode speed of each engine.

Used by the accuracy-gate tests and by benchmarks/quant_table.py. Calibration and evaluation
use different parts of the text (calibrate on one slice, measure on another).
"""

from __future__ import annotations

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
}


@dataclass
class RecipeResult:
    name: str
    perplexity: float
    size_bytes: int
    decode_tokens_per_s: float | None
    build_seconds: float


def build_recipe(ckpt_dir: Path, engine_dir: Path, flags: list[str], calib_file: Path, calib_size: int = 32,
                 calib_max_seq_length: int = 512, max_seq_len: int = 1024) -> float:
    """Build one recipe's engine from a floating-point checkpoint; returns seconds taken."""
    from trtbuild.cli.build import build_parser
    from trtbuild.quantization.api import recipe_from_args

    args = build_parser().parse_args(["--checkpoint_dir", str(ckpt_dir), "--output_dir", str(engine_dir), *flags,
                                      *(["--calib_dataset", str(calib_file), "--calib_size", str(calib_size),
                                         "--calib_max_seq_length", str(calib_max_seq_length)] if flags else [])])
    start = time.time()
    build = BuildConfig(max_batch_size=4, max_input_len=max_seq_len, max_seq_len=max_seq_len)
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


def evaluate_recipe(name: str, ckpt_dir: Path, work_dir: Path, text_file: Path, calib_file: Path,
                    eval_start_char: int, eval_max_tokens: int, seq_len: int = 512,
                    num_threads: int | None = None) -> RecipeResult:
    """Build `name`'s engine in work_dir/name and measure its perplexity (decode speed: decode_speeds)."""
    engine_dir = work_dir / name
    seconds = build_recipe(ckpt_dir, engine_dir, RECIPES[name], calib_file, max_seq_len=2 * seq_len)
    text = read_text(text_file, eval_start_char, eval_max_tokens * 8)
    ppl = engine_perplexity(engine_dir, text, seq_len=seq_len, max_tokens=eval_max_tokens, batch_size=2,
                            num_threads=num_threads, progress=False).perplexity
    return RecipeResult(name, ppl, dir_size(engine_dir), None, seconds)


def markdown_table(results: list[RecipeResult]) -> str:
    base = next((r for r in results if r.name == "fp32"), None)
    lines = ["| recipe | perplexity | vs fp32 | size MiB | decode tok/s (batch 1) | build s |",
             "|---|---|---|---|---|---|"]
    for r in results:
        rel = f"{(r.perplexity / base.perplexity - 1) * 100:+.2f}%" if base else ""
        tps = f"{r.decode_tokens_per_s:.1f}" if r.decode_tokens_per_s else ""
        lines.append(f"| {r.name} | {r.perplexity:.4f} | {rel} | {r.size_bytes / 2**20:.0f} | {tps} | "
                     f"{r.build_seconds:.0f} |")
    return "\n".join(lines)
