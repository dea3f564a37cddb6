"""The flags of how an engine's batches run (KV cache reuse, chunked prefill, speculative
decoding), shared by run.py, summarize.py and trtbuild-serve; see trtbuild.runtime.scheduling."""

from __future__ import annotations

import argparse

from trtbuild.engine import SPECULATIVE_MODES


def add_scheduling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scheduling (KV cache reuse, chunked prefill, speculative decoding)")
    g.add_argument("--speculative_decoding_mode", default=None, choices=[*SPECULATIVE_MODES, "none"],
                   help="draft tokens and check them in one step: from n-grams of the prompt and output "
                        "(prompt_lookup) or a draft engine (draft_tokens_external); default: as the engine was "
                        "built (trt-build --speculative_decoding_mode); none: off")
    g.add_argument("--max_draft_len", type=int, default=None, help="drafted tokens per step (default: the engine's, or 4)")
    g.add_argument("--prompt_lookup_num_tokens", type=int, default=None,
                   help="prompt lookup with this many drafted tokens per step")
    g.add_argument("--max_matching_ngram_size", type=int, default=3,
                   help="prompt lookup: the longest n-gram of the last tokens searched for")
    g.add_argument("--min_matching_ngram_size", type=int, default=2,
                   help="prompt lookup: the shortest (a one-token match is a poor guess)")
    g.add_argument("--draft_engine_dir", default=None,
                   help="speculate with this engine's greedy drafts (same tokenizer; e.g. an int4 engine of the "
                        "same model)")
    g.add_argument("--speculative_max_batch_size", type=int, default=1,
                   help="speculate only while at most this many requests decode (each speculating request costs "
                        "an engine call of its own)")
    g.add_argument("--disable_kv_cache_reuse", action="store_true",
                   help="compute every prompt in full instead of copying the keys and values of a cached prefix")
    g.add_argument("--max_num_tokens", type=int, default=None,
                   help="chunked prefill: prompt tokens fed per step while other requests decode (default: the "
                        "engine's --max_num_tokens)")


def runner_options(args: argparse.Namespace) -> dict:
    """ModelRunner.from_dir options the flags need: a target and its draft engine take turns, so
    neither's threads may spin while the other runs."""
    return {"spinning": False} if args.draft_engine_dir else {}


def scheduling_from_args(args: argparse.Namespace, runner, num_threads: int | None = None):
    """The SchedulerConfig the flags ask for on `runner`."""
    from trtbuild.runtime.scheduling import scheduling_config

    mode, drafts = args.speculative_decoding_mode, args.max_draft_len
    if args.prompt_lookup_num_tokens is not None:
        mode, drafts = mode or "prompt_lookup", args.prompt_lookup_num_tokens
    return scheduling_config(runner, kv_cache_reuse=not args.disable_kv_cache_reuse,
                             max_num_tokens=args.max_num_tokens, speculative_decoding_mode=mode,
                             max_draft_len=drafts, max_matching_ngram_size=args.max_matching_ngram_size,
                             min_matching_ngram_size=args.min_matching_ngram_size,
                             draft_engine_dir=args.draft_engine_dir,
                             speculative_max_batch_size=args.speculative_max_batch_size, num_threads=num_threads)


def scheduling_parameters(args: argparse.Namespace) -> dict[str, str]:
    """The scheduling flags as Triton model parameters (strings; "" for a flag not given)."""
    values = {}
    for action in _scheduling_parser()._actions:
        if action.dest == "help":
            continue
        value = getattr(args, action.dest)
        values[action.dest] = "" if value is None or value is False else ("true" if value is True else str(value))
    return values


def args_from_parameters(parameters: dict[str, str | None]) -> argparse.Namespace:
    """scheduling_parameters' strings back to the flags (an absent or empty one: its default)."""
    parser, argv = _scheduling_parser(), []
    for action in parser._actions:
        value = parameters.get(action.dest)
        if action.dest == "help" or not value:
            continue
        if action.nargs == 0:  # a store_true flag
            argv += [action.option_strings[0]] if value.lower() in ("true", "1", "yes") else []
        else:
            argv += [action.option_strings[0], value]
    return parser.parse_args(argv)


def _scheduling_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    add_scheduling_args(p)
    return p
