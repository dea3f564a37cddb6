"""trtbuild-perplexity: perplexity of an engine (or of its transformers model) on a text file.

Measured as wikitext-2 evaluations do: the text is tokenized once and cut into windows of
--seq_len tokens without overlap (the last, partial window is dropped); the score is the mean
negative log-likelihood of every token after the first of each window, exponentiated. Log-softmax
runs in float64 on the logits each side returns, so both sides are scored by the same code.

The last line of output is `perplexity: X` (4 decimals), for scripts.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from trtbuild.errors import TrtbuildError, cli_entry, setup_logging
from trtbuild.evaluate.nll import token_nll
from trtbuild.runtime.world import launched_rank

log = logging.getLogger(__name__)


class Scorer(Protocol):
    """Anything that gives logits at every position of right-padded rows: [B, S, vocab]."""

    def logits(self, batch: list[list[int]], lora_task_ids: list[int] | None = None) -> np.ndarray: ...


@dataclass
class PerplexityResult:
    perplexity: float
    mean_nll: float
    num_windows: int
    seq_len: int
    num_tokens: int  # tokens of text used (num_windows * seq_len)
    num_scored_tokens: int  # tokens whose NLL counts (num_windows * (seq_len - 1))
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s}


def _as_scorer(scorer) -> Scorer:
    """Accept a ModelRunner (has .score) as well as a side (has .logits)."""
    if hasattr(scorer, "logits"):
        return scorer
    if hasattr(scorer, "score"):
        from trtbuild.evaluate.sides import EngineSide

        return EngineSide(scorer)
    raise TypeError(f"{type(scorer).__name__} has neither logits() nor score()")


def read_text(text_file: str | Path | None, start_char: int = 0, num_chars: int | None = None) -> str:
    """The slice [start_char, start_char + num_chars) of a UTF-8 text file."""
    if text_file is None:
        raise TrtbuildError("no text: pass --text_file")
    path = Path(text_file)
    if not path.is_file():
        raise TrtbuildError(f"--text_file {path} not found")
    if start_char < 0:
        raise TrtbuildError(f"--start_char {start_char} must be >= 0")
    if num_chars is not None and num_chars < 1:
        raise TrtbuildError(f"--num_chars {num_chars} must be at least 1")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TrtbuildError(f"--text_file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if start_char >= len(text):
        raise TrtbuildError(f"--start_char {start_char} is past the end of {path} ({len(text)} characters)")
    text = text[start_char:start_char + num_chars if num_chars is not None else None]
    if not text.strip():
        raise TrtbuildError(f"--text_file {path} has no text in the chosen range")
    return text


def tokenize_text(tokenizer, text: str, max_tokens: int | None = None) -> list[int]:
    """The text tokenized once, as a whole (special tokens as the tokenizer adds them)."""
    ids = tokenizer.encode(text).ids
    return ids[:max_tokens] if max_tokens is not None else ids


def windows(token_ids: Sequence[int], seq_len: int) -> list[list[int]]:
    """Non-overlapping windows of seq_len tokens; the last partial window is dropped."""
    if seq_len < 2:
        raise TrtbuildError(f"--seq_len {seq_len} must be at least 2 (the first token of a window is not scored)")
    n = len(token_ids) // seq_len
    if n == 0:
        raise TrtbuildError(f"the text has {len(token_ids)} tokens, fewer than one window of --seq_len {seq_len}; "
                            "give more text or a smaller --seq_len")
    return [list(token_ids[i * seq_len:(i + 1) * seq_len]) for i in range(n)]


def perplexity(scorer, token_ids: Sequence[int], seq_len: int = 512, batch_size: int = 1,
               max_tokens: int | None = None, progress: bool = True, desc: str = "perplexity") -> PerplexityResult:
    """Perplexity of already tokenized text under `scorer` (an engine or HF side, or a ModelRunner)."""
    scorer = _as_scorer(scorer)
    if batch_size < 1:
        raise TrtbuildError(f"--batch_size {batch_size} must be at least 1")
    if max_tokens is not None:
        if max_tokens < 1:
            raise TrtbuildError(f"--max_tokens {max_tokens} must be at least 1")
        token_ids = token_ids[:max_tokens]
    wins = windows(token_ids, seq_len)
    limit = getattr(scorer, "max_input_len", None)
    if limit is not None and seq_len > limit:
        raise TrtbuildError(f"--seq_len {seq_len} exceeds the engine's max_input_len {limit}; "
                            f"use --seq_len {limit} or less, or rebuild with trt-build --max_input_len {seq_len}")
    max_batch = getattr(scorer, "max_batch_size", None)
    if max_batch is not None and batch_size > max_batch:
        raise TrtbuildError(f"--batch_size {batch_size} exceeds the engine's max_batch_size {max_batch}")
    from tqdm import tqdm

    total = 0.0
    start = time.perf_counter()
    with tqdm(total=len(wins), desc=desc, unit="window", disable=not progress) as bar:
        for i in range(0, len(wins), batch_size):
            batch = wins[i:i + batch_size]
            logits = scorer.logits(batch)
            for b, w in enumerate(batch):
                total += float(token_nll(logits[b, :seq_len - 1], w[1:]).sum())
            bar.update(len(batch))
            bar.set_postfix(ppl=f"{math.exp(total / ((i + len(batch)) * (seq_len - 1))):.4f}")
    seconds = time.perf_counter() - start
    scored = len(wins) * (seq_len - 1)
    mean = total / scored
    return PerplexityResult(math.exp(mean), mean, len(wins), seq_len, len(wins) * seq_len, scored, seconds)


def conditional_nll(scorer, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
                    batch_size: int = 1, lora_task_ids: Sequence[int] | None = None, progress: bool = True,
                    desc: str = "perplexity") -> list[np.ndarray]:
    """Per-token NLL of each continuation given its prompt (prompt + continuation scored in one pass)."""
    scorer = _as_scorer(scorer)
    from tqdm import tqdm

    out: list[np.ndarray] = []
    with tqdm(total=len(prompts), desc=desc, unit="seq", disable=not progress) as bar:
        for i in range(0, len(prompts), batch_size):
            ps, cs = prompts[i:i + batch_size], continuations[i:i + batch_size]
            seqs = [list(p) + list(c) for p, c in zip(ps, cs)]
            tasks = list(lora_task_ids[i:i + batch_size]) if lora_task_ids is not None else None
            logits = scorer.logits(seqs, lora_task_ids=tasks)
            for b, (p, c) in enumerate(zip(ps, cs)):
                out.append(token_nll(logits[b, len(p) - 1:len(p) + len(c) - 1], c))
            bar.update(len(ps))
    return out


def engine_perplexity(engine_dir: str | Path, text: str | None = None, *, text_file: str | Path | None = None,
                      seq_len: int = 512, max_tokens: int | None = None, batch_size: int = 1, start_char: int = 0,
                      num_chars: int | None = None, tokenizer_dir: str | Path | None = None,
                      num_threads: int | None = None, progress: bool = True) -> PerplexityResult:
    """Perplexity of an engine dir on `text` (or on a slice of `text_file`)."""
    from trtbuild.evaluate.sides import EngineSide, load_text_tokenizer

    text = text if text is not None else read_text(text_file, start_char, num_chars)
    side = EngineSide.from_dir(engine_dir, num_threads=num_threads)
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else Path(engine_dir) / "tokenizer"
    ids = tokenize_text(load_text_tokenizer(tok_dir), text, max_tokens)
    return perplexity(side, ids, seq_len, batch_size, progress=progress, desc="engine perplexity")


def hf_perplexity(hf_model_dir: str | Path, text: str | None = None, *, text_file: str | Path | None = None,
                  seq_len: int = 512, max_tokens: int | None = None, batch_size: int = 1, start_char: int = 0,
                  num_chars: int | None = None, tokenizer_dir: str | Path | None = None,
                  num_threads: int | None = None, data_type: str = "fp32", progress: bool = True) -> PerplexityResult:
    """Perplexity of a transformers model dir, scored exactly as engine_perplexity scores an engine."""
    from trtbuild.evaluate.sides import HFSide, load_text_tokenizer

    text = text if text is not None else read_text(text_file, start_char, num_chars)
    ids = tokenize_text(load_text_tokenizer(tokenizer_dir or hf_model_dir), text, max_tokens)
    side = HFSide(hf_model_dir, data_type=data_type, num_threads=num_threads)
    return perplexity(side, ids, seq_len, batch_size, progress=progress, desc="hf perplexity")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trtbuild-perplexity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--engine_dir", help="engine dir built by trt-build")
    which.add_argument("--hf_model_dir", help="Hugging Face model dir: measure the transformers side instead")
    p.add_argument("--text_file", required=True, help="UTF-8 text (e.g. ../shared/data/ppl.txt)")
    p.add_argument("--seq_len", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--max_tokens", type=int, default=None, help="use only the first N tokens of the text")
    p.add_argument("--batch_size", type=int, default=1, help="windows per engine call (default 1)")
    p.add_argument("--start_char", type=int, default=0, help="first character of the text to use")
    p.add_argument("--num_chars", type=int, default=None, help="characters to use from --start_char")
    p.add_argument("--tokenizer_dir", default=None,
                   help="default: the engine's tokenizer/ dir, or the HF model dir")
    p.add_argument("--data_type", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="dtype of the transformers model (with --hf_model_dir)")
    p.add_argument("--num_threads", type=int, default=None, help="intra-op threads (engine and torch)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.add_argument("--log_level", default="warning")
    return p


@cli_entry
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    text = read_text(args.text_file, args.start_char, args.num_chars)
    leader = launched_rank() == 0  # a multi-rank engine: every rank scores, rank 0 reports
    common = dict(seq_len=args.seq_len, max_tokens=args.max_tokens, batch_size=args.batch_size,
                  tokenizer_dir=args.tokenizer_dir, num_threads=args.num_threads,
                  progress=not args.no_progress and leader)
    if args.engine_dir:
        result = engine_perplexity(args.engine_dir, text, **common)
        what = f"engine {args.engine_dir}"
    else:
        result = hf_perplexity(args.hf_model_dir, text, data_type=args.data_type, **common)
        what = f"transformers {args.hf_model_dir} ({args.data_type})"
    if not leader:
        return
    end = args.start_char + len(text)
    print(f"{what}: {args.text_file} characters [{args.start_char}, {end}), {result.num_windows} windows of "
          f"{result.seq_len} tokens ({result.num_scored_tokens} scored), mean NLL {result.mean_nll:.6f}, "
          f"{result.seconds:.1f} s ({result.tokens_per_s:.0f} tokens/s)")
    print(f"perplexity: {result.perplexity:.4f}")


if __name__ == "__main__":
    main()
