"""summarize.py: ROUGE (and perplexity) of a trtbuild engine beside its Hugging Face model.

TensorRT-LLM's examples/summarize.py, on local cnn_dailymail-shaped data: both sides get the same
prompts (token ids), generate in batches, and are scored with the rouge-score package on the
0-100 scale. --eval_ppl adds the perplexity of the reference summaries under each side (the
references' tokens scored after the prompt). --check_accuracy exits 1 when the engine's rouge1 falls
below --tensorrt_llm_rouge1_threshold or, with --eval_ppl, when its perplexity is above
--ppl_ratio_threshold times the transformers model's on the same tokens (a perplexity depends on
the model and the data, so the engine is judged against its own source model) or above
--tensorrt_llm_ppl_threshold, if given.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from trtbuild.cli.helpformat import HelpFormatter
from trtbuild.cli.scheduling_args import add_scheduling_args, runner_options, scheduling_from_args
from trtbuild.errors import TrtbuildError, cli_entry, setup_logging
from trtbuild.evaluate.dataset import Record, load_records, select
from trtbuild.runtime.sampling import SamplingConfig
from trtbuild.runtime.world import launched_rank

log = logging.getLogger(__name__)

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
DEFAULT_PPL_RATIO = 1.1  # --ppl_ratio_threshold
TLDR = " TL;DR: "
CHAT_INSTRUCTION = "Summarize the following article.\n\n"
SIDE_TITLES = {"engine": "TensorRT-LLM-style engine (trtbuild)", "hf": "Hugging Face (transformers)"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="summarize.py", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--engine_dir", default=None, help="engine dir built by trt-build")
    p.add_argument("--hf_model_dir", default=None, help="the Hugging Face model the engine was built from")
    p.add_argument("--tokenizer_dir", default=None,
                   help="default: the engine's tokenizer/ dir, else --hf_model_dir")
    p.add_argument("--test_trt_llm", action="store_true",
                   help="run the engine (default: on when --engine_dir is given and no --test_* flag is)")
    p.add_argument("--test_hf", action="store_true",
                   help="run transformers (default: on when --hf_model_dir is given and no --test_* flag is)")
    p.add_argument("--data_type", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="dtype of the transformers model (the engine's is fixed at build)")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--dataset_dir", default=None,
                      help="dir of .json/.jsonl/.parquet/.csv files with article/highlights/id records")
    data.add_argument("--dataset_file", default=None, help="one such file, e.g. ../shared/data/summarize.jsonl")
    p.add_argument("--eval_task", default="summarize", choices=["summarize", "eval_ppl"],
                   help="summarize: generate and score ROUGE; eval_ppl: only the references' perplexity")
    p.add_argument("--batch_size", type=int, default=1, help="samples per engine call")
    p.add_argument("--max_ite", type=int, default=20, help="batches to run (samples = batch_size x max_ite)")
    p.add_argument("--max_input_length", type=int, default=923, help="article tokens kept (the rest is cut)")
    p.add_argument("--output_len", type=int, default=100, help="max new tokens per summary")
    p.add_argument("--num_beams", type=int, default=1, help="only 1 (no beam search yet)")
    p.add_argument("--temperature", type=float, default=1.0, help="samples only with --top_k other than 1")
    p.add_argument("--top_k", type=int, default=1, help="1 = greedy (as in TensorRT-LLM)")
    p.add_argument("--top_p", type=float, default=0.0, help="0 = off")
    p.add_argument("--random_seed", type=int, default=0, help="shuffles the dataset and seeds sampling")
    p.add_argument("--no_chat_template", action="store_true",
                   help="prompt = article + ' TL;DR: ' even when the tokenizer has a chat template")
    p.add_argument("--check_accuracy", action="store_true",
                   help="exit 1 if the engine misses a threshold below (the perplexity ones need --eval_ppl)")
    p.add_argument("--tensorrt_llm_rouge1_threshold", type=float, default=15.0,
                   help="--check_accuracy: the engine's rouge1 (0-100) must reach this")
    p.add_argument("--ppl_ratio_threshold", type=float, default=DEFAULT_PPL_RATIO, metavar="RATIO",
                   help="--check_accuracy with --eval_ppl and --hf_model_dir: the engine's perplexity must be at "
                        "most RATIO times the transformers model's on the same tokens (8-bit engines measure "
                        "within about 1%% of the float model, int4 weight-only ones 30-100%% above it: pass a "
                        "larger RATIO for those)")
    p.add_argument("--tensorrt_llm_ppl_threshold", type=float, default=None,
                   help="--check_accuracy with --eval_ppl: the engine's perplexity must be at most this absolute "
                        "value (TensorRT-LLM's flag; unset by default here rather than its 15, because a "
                        "perplexity depends on the model and the data: the correct SmolLM2-135M engine scores "
                        "24.3 on summarize.jsonl's references)")
    p.add_argument("--eval_ppl", action="store_true", help="also the perplexity of the references under each side")
    p.add_argument("--output_dir", default=None, help="write each side's outputs and metrics.json here")
    p.add_argument("--lora_dir", nargs="+", default=None, help="adapter dirs (engine: add_lora; hf: peft)")
    p.add_argument("--lora_task_uids", nargs="+", default=None,
                   help="adapter per sample (one value for all); -1 = base model")
    p.add_argument("--num_threads", type=int, default=None, help="intra-op threads (engine and torch)")
    add_scheduling_args(p)
    p.add_argument("--no_progress", action="store_true")
    p.add_argument("--log_level", default="warning")
    return p


@dataclass
class Sample:
    record: Record
    prompt_text: str
    prompt_ids: list[int]
    reference_ids: list[int] = field(default_factory=list)  # for --eval_ppl (may be cut to fit the engine)


@dataclass
class SideResult:
    name: str
    outputs: list[str] = field(default_factory=list)
    output_ids: list[list[int]] = field(default_factory=list)
    latency_s: float = 0.0
    rouge: dict[str, float] = field(default_factory=dict)
    perplexity: float | None = None
    ppl_seconds: float = 0.0

    @property
    def output_tokens(self) -> int:
        return sum(len(o) for o in self.output_ids)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.latency_s if self.latency_s > 0 else 0.0

    def metrics(self) -> dict:
        m: dict = dict(self.rouge)
        if self.output_ids:
            m.update(tokens_per_s=round(self.tokens_per_s, 3), latency_s=round(self.latency_s, 3),
                     output_tokens=self.output_tokens, num_samples=len(self.output_ids))
        if self.perplexity is not None:
            m.update(perplexity=self.perplexity, ppl_seconds=round(self.ppl_seconds, 3))
        return m


# ---- inputs ---------------------------------------------------------------------------------------
def resolve_sides(args) -> tuple[bool, bool]:
    test_engine, test_hf = args.test_trt_llm, args.test_hf
    if not test_engine and not test_hf:
        test_engine, test_hf = args.engine_dir is not None, args.hf_model_dir is not None
    if test_engine and args.engine_dir is None:
        raise TrtbuildError("--test_trt_llm needs --engine_dir")
    if test_hf and args.hf_model_dir is None:
        raise TrtbuildError("--test_hf needs --hf_model_dir")
    if not test_engine and not test_hf:
        raise TrtbuildError("nothing to evaluate: pass --engine_dir and/or --hf_model_dir")
    if args.check_accuracy and not test_engine:
        raise TrtbuildError("--check_accuracy checks the engine: pass --engine_dir")
    return test_engine, test_hf


def check_args(args) -> None:
    for flag in ("batch_size", "max_ite", "max_input_length", "output_len"):
        if getattr(args, flag) < 1:
            raise TrtbuildError(f"--{flag} {getattr(args, flag)} must be at least 1")
    if args.num_beams != 1:
        raise TrtbuildError(f"--num_beams {args.num_beams}: beam search is not in the trtbuild runtime yet; "
                            "use --num_beams 1")
    if args.lora_task_uids and args.lora_dir is None and args.hf_model_dir is None and args.engine_dir is None:
        raise TrtbuildError("--lora_task_uids needs an engine with adapters or --lora_dir")


def tokenizer_dir_of(args) -> Path:
    if args.tokenizer_dir:
        return Path(args.tokenizer_dir)
    if args.engine_dir and (Path(args.engine_dir) / "tokenizer").is_dir():
        return Path(args.engine_dir) / "tokenizer"
    if args.hf_model_dir:
        return Path(args.hf_model_dir)
    raise TrtbuildError(f"{args.engine_dir} has no tokenizer/ dir: pass --tokenizer_dir")


def make_samples(records: list[Record], tokenizer, tokenizer_dir: Path, max_input_length: int,
                 use_chat: bool, with_references: bool) -> list[Sample]:
    """Cut each article to max_input_length tokens, then wrap it as the prompt."""
    from trtbuild.runtime.chat import apply_chat_template

    samples = []
    for r in records:
        article_ids = tokenizer.encode(r.article, add_special_tokens=False).ids[:max_input_length]
        article = tokenizer.decode(article_ids, skip_special_tokens=False).strip()
        if use_chat:
            text = apply_chat_template(tokenizer_dir, [{"role": "user", "content": CHAT_INSTRUCTION + article}])
            ids = tokenizer.encode(text, add_special_tokens=False).ids
        else:
            text = article + TLDR
            ids = tokenizer.encode(text).ids
        refs = tokenizer.encode(r.highlights, add_special_tokens=False).ids if with_references else []
        samples.append(Sample(r, text, ids, refs))
    return samples


def task_ids_for(args, count: int) -> list[int] | None:
    if not args.lora_task_uids:
        return None
    try:
        uids = [int(u) for u in args.lora_task_uids]
    except ValueError:
        raise TrtbuildError(f"--lora_task_uids {' '.join(args.lora_task_uids)}: expected integers (-1 = none)") from None
    if len(uids) == 1:
        return uids * count
    if len(uids) != count:
        raise TrtbuildError(f"--lora_task_uids has {len(uids)} values for {count} samples; give one value or one "
                            "per sample")
    return uids


def check_engine_limits(side, samples: list[Sample], args) -> None:
    if args.batch_size > side.max_batch_size:
        raise TrtbuildError(f"--batch_size {args.batch_size} exceeds the engine's max_batch_size "
                            f"{side.max_batch_size}; lower it or rebuild with trt-build --max_batch_size")
    longest = max(len(s.prompt_ids) for s in samples)
    if longest > side.max_input_len:
        raise TrtbuildError(f"prompts reach {longest} tokens (--max_input_length {args.max_input_length} article "
                            f"tokens plus the template), above the engine's max_input_len {side.max_input_len}; "
                            "lower --max_input_length or rebuild with a larger trt-build --max_input_len")
    if args.eval_task == "summarize" and longest + args.output_len > side.max_seq_len:
        raise TrtbuildError(f"a {longest}-token prompt + --output_len {args.output_len} exceeds the engine's "
                            f"max_seq_len {side.max_seq_len}; lower --output_len or --max_input_length, or rebuild "
                            "with a larger trt-build --max_seq_len")


def fit_references(samples: list[Sample], limit: int | None) -> None:
    """Cut references so that prompt + reference fits one engine pass (both sides score the same tokens)."""
    if limit is None:
        return
    cut = 0
    for s in samples:
        room = limit - len(s.prompt_ids)
        if room < 1:
            raise TrtbuildError(f"sample {s.record.id}: the {len(s.prompt_ids)}-token prompt leaves no room for "
                                f"its reference within the engine's max_input_len {limit}; lower --max_input_length")
        if len(s.reference_ids) > room:
            s.reference_ids = s.reference_ids[:room]
            cut += 1
    if cut:
        log.warning("%d references cut to fit the engine's max_input_len %d for --eval_ppl", cut, limit)


# ---- running --------------------------------------------------------------------------------------
def generate_side(side, samples: list[Sample], sampling: SamplingConfig, batch_size: int,
                  task_ids: list[int] | None, tokenizer, progress: bool) -> SideResult:
    from tqdm import tqdm

    result = SideResult(side.name)
    with tqdm(total=len(samples), desc=f"{side.name} summarize", unit="sample", disable=not progress) as bar:
        for i in range(0, len(samples), batch_size):
            batch = [s.prompt_ids for s in samples[i:i + batch_size]]
            tasks = task_ids[i:i + batch_size] if task_ids is not None else None
            start = time.perf_counter()
            out = side.generate(batch, sampling, lora_task_ids=tasks)
            result.latency_s += time.perf_counter() - start
            result.output_ids.extend(out)
            bar.update(len(batch))
    result.outputs = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in result.output_ids]
    return result


def reference_perplexity(side, samples: list[Sample], batch_size: int, task_ids: list[int] | None,
                         progress: bool) -> tuple[float, float]:
    from trtbuild.evaluate.perplexity import conditional_nll

    start = time.perf_counter()
    nlls = conditional_nll(side, [s.prompt_ids for s in samples], [s.reference_ids for s in samples],
                           batch_size=batch_size, lora_task_ids=task_ids, progress=progress,
                           desc=f"{side.name} perplexity")
    total, count = sum(float(n.sum()) for n in nlls), sum(n.size for n in nlls)
    return math.exp(total / count), time.perf_counter() - start


def rouge_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean F-measure of each ROUGE variant, 0-100 (rouge-score, Porter stemmer; rougeLsum splits on newlines)."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise TrtbuildError("ROUGE needs the rouge-score package: pip install 'trtbuild[eval]'") from None
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
    return {k: round(100.0 * sum(s[k].fmeasure for s in scores) / len(scores), 4) for k in ROUGE_KEYS}


def make_engine_side(args, task_ids: list[int] | None):
    """The engine, with --lora_dir adapters loaded (ModelRunner.add_lora); returns (side, engine task ids).

    As in TensorRT-LLM, a --lora_task_uids value k >= 0 names --lora_dir[k] when --lora_dir is given
    (it becomes the task id add_lora gave that adapter), else the engine's own task id k.
    """
    from trtbuild.evaluate.sides import EngineSide

    side = EngineSide.from_dir(args.engine_dir, num_threads=args.num_threads, tokenizer_dir=args.tokenizer_dir,
                               **runner_options(args))
    runner = side.runner
    runner.scheduling = scheduling_from_args(args, runner, args.num_threads)
    uses_lora = task_ids is not None and any(t != -1 for t in task_ids)
    if args.lora_dir:
        if runner.lora is None:
            raise TrtbuildError(f"--lora_dir given, but {args.engine_dir} was built without --lora_plugin; "
                                "rebuild with trt-build --lora_dir (or merge the adapter at conversion)")
        if not hasattr(runner, "add_lora"):
            raise TrtbuildError("this trtbuild runtime cannot load adapters at run time (no ModelRunner.add_lora); "
                                "build them into the engine with trt-build --lora_dir and pass only "
                                "--lora_task_uids")
        loaded = [runner.add_lora(d) for d in args.lora_dir]
        if task_ids is not None:
            for t in task_ids:
                if t >= len(loaded) or t < -1:
                    raise TrtbuildError(f"--lora_task_uids {t}: expected -1 or an index into the "
                                        f"{len(loaded)} --lora_dir adapters")
            task_ids = [loaded[t] if t >= 0 else -1 for t in task_ids]
    elif uses_lora and runner.lora is None:
        raise TrtbuildError(f"--lora_task_uids given, but {args.engine_dir} has no adapters (built without "
                            "--lora_plugin)")
    return side, task_ids


def make_hf_side(args, task_ids):
    from trtbuild.evaluate.sides import HFSide

    lora_dir = None
    if task_ids is not None and any(t != -1 for t in task_ids):
        used = sorted(set(task_ids))
        if len(used) != 1:
            raise TrtbuildError(f"--lora_task_uids mixes adapters {used}: transformers applies one adapter to all "
                                "samples; run the mix with --test_trt_llm alone")
        uid = used[0]
        if not args.lora_dir or uid >= len(args.lora_dir):
            raise TrtbuildError(f"--lora_task_uids {uid}: the transformers side applies --lora_dir[{uid}], "
                                "which was not given")
        lora_dir = args.lora_dir[uid]
    return HFSide(args.hf_model_dir, data_type=args.data_type, num_threads=args.num_threads, lora_dir=lora_dir)


# ---- output ---------------------------------------------------------------------------------------
def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_outputs(out_dir: Path, samples: list[Sample], results: dict[str, SideResult], metrics: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, r in results.items():
        if not r.output_ids:
            continue
        lines = [json.dumps({"id": s.record.id, "output": text, "output_tokens": len(ids),
                             "reference": s.record.highlights}, ensure_ascii=False)
                 for s, text, ids in zip(samples, r.outputs, r.output_ids)]
        write_atomic(out_dir / f"{name}_outputs.jsonl", "\n".join(lines) + "\n")
    write_atomic(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")


def print_sample(sample: Sample, results: dict[str, SideResult]) -> None:
    print("=" * 80)
    print(f"sample {sample.record.id} — prompt ({len(sample.prompt_ids)} tokens):")
    print(sample.prompt_text)
    print("-" * 80)
    print("reference:")
    print(sample.record.highlights)
    for name, r in results.items():
        if r.outputs:
            print("-" * 80)
            print(f"{name} output ({len(r.output_ids[0])} tokens):")
            print(r.outputs[0])
    print("=" * 80)


def print_side(r: SideResult) -> None:
    title = SIDE_TITLES[r.name]
    if r.output_ids:
        print(f"{title} (total latency: {r.latency_s:.3f} sec)")
        print(f"{title} (total output tokens: {r.output_tokens})")
        print(f"{title} (tokens per second: {r.tokens_per_s:.2f})")
        for k in ROUGE_KEYS:
            print(f"  {k}: {r.rouge[k]:.4f}")
    if r.perplexity is not None:
        print(f"{title} (perplexity of the references: {r.perplexity:.4f}, {r.ppl_seconds:.1f} sec)")


def accuracy_failures(args, engine: SideResult, hf: SideResult | None = None) -> list[str]:
    failures = []
    if engine.rouge and engine.rouge["rouge1"] < args.tensorrt_llm_rouge1_threshold:
        failures.append(f"engine rouge1 {engine.rouge['rouge1']:.4f} is below --tensorrt_llm_rouge1_threshold "
                        f"{args.tensorrt_llm_rouge1_threshold:g}")
    if engine.perplexity is not None and hf is not None and hf.perplexity is not None:
        ratio = engine.perplexity / hf.perplexity
        if not ratio <= args.ppl_ratio_threshold:  # a NaN perplexity fails too
            failures.append(f"engine perplexity {engine.perplexity:.4f} is {ratio:.3f}x the transformers model's "
                            f"{hf.perplexity:.4f}, above --ppl_ratio_threshold {args.ppl_ratio_threshold:g}")
    if (engine.perplexity is not None and args.tensorrt_llm_ppl_threshold is not None
            and not engine.perplexity <= args.tensorrt_llm_ppl_threshold):
        failures.append(f"engine perplexity {engine.perplexity:.4f} is above --tensorrt_llm_ppl_threshold "
                        f"{args.tensorrt_llm_ppl_threshold:g}")
    return failures


# ---- main -----------------------------------------------------------------------------------------
def run(args) -> int:
    """Evaluate; returns the exit code (0, or 1 when --check_accuracy fails)."""
    check_args(args)
    test_engine, test_hf = resolve_sides(args)
    eval_ppl = args.eval_ppl or args.eval_task == "eval_ppl"
    generate = args.eval_task == "summarize"
    progress = not args.no_progress
    records = select(load_records(args.dataset_dir, args.dataset_file), args.random_seed,
                     args.batch_size * args.max_ite)

    from trtbuild.evaluate.sides import load_text_tokenizer
    from trtbuild.runtime.chat import load_chat_template

    tok_dir = tokenizer_dir_of(args)
    tokenizer = load_text_tokenizer(tok_dir)
    use_chat = not args.no_chat_template and load_chat_template(tok_dir)[0] is not None
    samples = make_samples(records, tokenizer, tok_dir, args.max_input_length, use_chat, eval_ppl)
    task_ids = task_ids_for(args, len(samples))
    shape = "the chat template" if use_chat else f"article + {TLDR!r}"
    lengths = [len(s.prompt_ids) for s in samples]
    print(f"{len(samples)} samples (seed {args.random_seed}), prompts from {shape}, "
          f"{min(lengths)}-{max(lengths)} tokens")

    engine, engine_task_ids = make_engine_side(args, task_ids) if test_engine else (None, None)
    if engine is not None:
        check_engine_limits(engine, samples, args)
        if eval_ppl:
            fit_references(samples, engine.max_input_len)
    end_id = (engine.eos_token_id if engine is not None else None)
    pad_id = None
    cfg_path = tok_dir / "tokenizer_config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        names = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in cfg.items()
                 if k in ("eos_token", "pad_token")}
        if end_id is None and names.get("eos_token"):
            end_id = tokenizer.token_to_id(names["eos_token"])
        if names.get("pad_token"):
            pad_id = tokenizer.token_to_id(names["pad_token"])

    results: dict[str, SideResult] = {}
    sides = []
    if engine is not None:
        sides.append(("engine", lambda: engine, engine_task_ids))
    if test_hf:
        sides.append(("hf", lambda: make_hf_side(args, task_ids), None))  # one adapter, merged by peft
    for name, make, side_task_ids in sides:
        side = make()
        if end_id is None:
            end_id = side.eos_token_id
        sampling = SamplingConfig(max_new_tokens=args.output_len, end_id=end_id, pad_id=pad_id,
                                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                  random_seed=args.random_seed)
        sampling.validate()
        r = SideResult(name)
        if generate:
            r = generate_side(side, samples, sampling, args.batch_size, side_task_ids, tokenizer, progress)
            r.rouge = rouge_scores(r.outputs, [s.record.highlights for s in samples])
        if eval_ppl:
            r.perplexity, r.ppl_seconds = reference_perplexity(side, samples, args.batch_size, side_task_ids,
                                                                progress)
        results[name] = r
        del side

    if generate:
        print_sample(samples[0], results)
    metrics: dict = {name: r.metrics() for name, r in results.items()}
    for r in results.values():
        print_side(r)
    if generate and "engine" in results and "hf" in results:
        diff = {k: round(results["engine"].rouge[k] - results["hf"].rouge[k], 4) for k in ROUGE_KEYS}
        metrics["engine_minus_hf"] = diff
        print(f"rouge1 difference, engine - hf: {diff['rouge1']:+.4f}")
    if eval_ppl and "engine" in results and "hf" in results:
        engine_ppl, hf_ppl = results["engine"].perplexity, results["hf"].perplexity
        metrics.setdefault("engine_minus_hf", {})["perplexity"] = engine_ppl - hf_ppl
        metrics["engine_over_hf"] = {"perplexity": engine_ppl / hf_ppl}
        print(f"perplexity ratio, engine / hf: {engine_ppl / hf_ppl:.4f}")
    metrics["settings"] = {"num_samples": len(samples), "random_seed": args.random_seed,
                           "max_input_length": args.max_input_length, "output_len": args.output_len,
                           "batch_size": args.batch_size, "chat_template": use_chat, "eval_task": args.eval_task,
                           "dataset": str(args.dataset_file or args.dataset_dir)}
    if args.output_dir:
        write_outputs(Path(args.output_dir), samples, results, metrics)
        print(f"outputs and metrics.json written to {args.output_dir}")

    if args.check_accuracy:
        if eval_ppl and "hf" not in results and args.tensorrt_llm_ppl_threshold is None:
            print("note: the engine's perplexity is not checked: --ppl_ratio_threshold compares it with the "
                  "transformers model's (pass --hf_model_dir), or pass --tensorrt_llm_ppl_threshold", file=sys.stderr)
        failures = accuracy_failures(args, results["engine"], results.get("hf"))
        for f in failures:
            print(f"accuracy check failed: {f}", file=sys.stderr)
        if failures:
            return 1
        print("accuracy check passed")
    return 0


def follower_args(args: argparse.Namespace) -> argparse.Namespace:
    """A rank other than 0 of a multi-rank engine (under mpiexec): the engine side only, in the same
    calls as rank 0 (its steps need every rank), silent, writing nothing; rank 0 reports."""
    return argparse.Namespace(**{**vars(args), "test_trt_llm": True, "test_hf": False, "hf_model_dir": None,
                                 "output_dir": None, "check_accuracy": False, "no_progress": True})


@cli_entry
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    if launched_rank() != 0:
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
            run(follower_args(args))
        return
    code = run(args)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
