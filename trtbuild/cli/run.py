"""run.py / trtbuild-run: generate text with an engine (TensorRT-LLM's examples/run.py)."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

from trtbuild.cli.helpformat import HelpFormatter
from trtbuild.cli.scheduling_args import add_scheduling_args, runner_options, scheduling_from_args
from trtbuild.errors import TrtbuildError, cli_entry, setup_logging
from trtbuild.runtime import ModelRunner, SamplingConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run.py", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--engine_dir", required=True, help="engine dir built by trt-build")
    p.add_argument("--tokenizer_dir", default=None, help="default: the tokenizer stored in the engine dir")
    p.add_argument("--input_text", nargs="+", default=None, help="prompts, run as one batch")
    p.add_argument("--input_file", default=None, help=".txt (a prompt a line), .json (list of strings), "
                   ".csv (token ids a row) or .npy (token ids, padded with --pad_id/end id)")
    p.add_argument("--max_output_len", type=int, default=32, help="new tokens per prompt, at most")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature (0: greedy); samples only with --top_k other than 1")
    p.add_argument("--top_k", type=int, default=1,
                   help="sample from the k most likely tokens; 1 = greedy (as in TensorRT-LLM), 0 = no top-k "
                        "limit (then greedy unless --top_p is set)")
    p.add_argument("--top_p", type=float, default=0.0,
                   help="sample from the smallest set of tokens whose probabilities reach p (0 = off); needs "
                        "--top_k 0 or above 1")
    p.add_argument("--repetition_penalty", type=float, default=1.0, help="1 = off")
    p.add_argument("--presence_penalty", type=float, default=0.0,
                   help="subtracted from the logit of every token already generated (0 = off)")
    p.add_argument("--frequency_penalty", type=float, default=0.0,
                   help="subtracted from a token's logit per time it was generated (0 = off)")
    p.add_argument("--random_seed", type=int, default=0, help="seed of the sampling")
    p.add_argument("--end_id", type=int, default=None, help="default: the model's eos token")
    p.add_argument("--pad_id", type=int, default=None, help="padding token id (default: the end id)")
    p.add_argument("--stop_words", nargs="+", default=None, help="generation of a prompt stops after any of these")
    p.add_argument("--bad_words", nargs="+", default=None, help="never generated")
    p.add_argument("--streaming", action="store_true", help="print tokens as they are generated")
    p.add_argument("--apply_chat_template", action="store_true", help="wrap each prompt as a user chat turn")
    p.add_argument("--output_csv", default=None, help="write the output token ids here")
    p.add_argument("--output_npy", default=None, help="write the output token ids here, [batch, 1, len], padded")
    p.add_argument("--lora_dir", nargs="+", default=None, help="adapter dirs to load into the engine")
    p.add_argument("--lora_task_uids", nargs="+", type=int, default=None,
                   help="adapter (lora task id) per prompt, or one for all; -1 = base model")
    p.add_argument("--num_threads", type=int, default=None, help="onnxruntime intra-op threads (default: its own)")
    p.add_argument("--log_level", default="warning")
    add_scheduling_args(p)
    return p


def greedy_note(args, argv: list[str] | None) -> str | None:
    """The line to tell a user who set --temperature/--top_p that --top_k 1 (the default) decodes greedily."""
    if args.top_k != 1:
        return None
    given = vars(explicit_args(argv))
    flags = [f"--{name}" for name in ("temperature", "top_p") if name in given]
    if not flags or ("temperature" in given and args.temperature == 0):
        return None
    return (f"note: {' and '.join(flags)} {'have' if len(flags) > 1 else 'has'} no effect: --top_k is 1 "
            f"(TensorRT-LLM's default), so decoding is greedy; pass --top_k 0 (no top-k limit) or --top_k N to "
            f"sample")


def explicit_args(argv: list[str] | None) -> argparse.Namespace:
    """Only the flags given on the command line (each parser default suppressed)."""
    p = build_parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
        action.required = False
    return p.parse_args(argv)


def read_prompts(args, tokenizer, tokenizer_dir) -> list[list[int]]:
    texts: list[str] | None = None
    if args.input_text:
        texts = list(args.input_text)
    elif args.input_file:
        path = Path(args.input_file)
        if not path.is_file():
            raise TrtbuildError(f"--input_file {path} not found")
        if path.suffix == ".npy":
            arr = np.load(path)
            pad = args.pad_id if args.pad_id is not None else args.end_id
            return [[int(t) for t in row if pad is None or t != pad] for row in np.atleast_2d(arr)]
        if path.suffix == ".csv":
            with open(path) as f:
                return [[int(t) for t in row if t.strip()] for row in csv.reader(f) if row]
        if path.suffix == ".json":
            texts = json.loads(path.read_text())
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise TrtbuildError(f"--input_file {path}: expected a JSON list of strings")
        else:
            texts = [line for line in path.read_text().splitlines() if line.strip()]
    if not texts:
        raise TrtbuildError("no prompts: pass --input_text or --input_file")
    if tokenizer is None:
        raise TrtbuildError(f"{args.engine_dir} has no tokenizer: pass --tokenizer_dir")
    if args.apply_chat_template:
        from trtbuild.runtime.chat import apply_chat_template

        texts = [apply_chat_template(tokenizer_dir, [{"role": "user", "content": t}]) for t in texts]
    return [tokenizer.encode(t).ids for t in texts]


def default_end_id(runner: ModelRunner) -> int | None:
    eos = runner.config.pretrained_config.eos_token_id
    return eos[0] if isinstance(eos, list) else eos


@cli_entry
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    note = greedy_note(args, argv)
    if note:
        print(note, file=sys.stderr)
    runner = ModelRunner.from_dir(args.engine_dir, num_threads=args.num_threads, tokenizer_dir=args.tokenizer_dir,
                                  **runner_options(args))
    runner.scheduling = scheduling_from_args(args, runner, args.num_threads)
    tok = runner.tokenizer
    tokenizer_dir = Path(args.tokenizer_dir) if args.tokenizer_dir else Path(args.engine_dir) / "tokenizer"
    prompts = read_prompts(args, tok, tokenizer_dir)
    leader = runner.world is None or runner.world.is_leader  # a multi-rank engine: rank 0 prints
    if runner.world is not None:  # every rank runs the same steps over rank 0's prompts
        prompts = runner.world.broadcast(prompts if leader else None)
    end_id = args.end_id if args.end_id is not None else default_end_id(runner)

    def words(items):
        return [tok.encode(w, add_special_tokens=False).ids for w in items or []]

    sampling = SamplingConfig(max_new_tokens=args.max_output_len, end_id=end_id, pad_id=args.pad_id,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                              frequency_penalty=args.frequency_penalty, random_seed=args.random_seed,
                              stop_words=words(args.stop_words), bad_words=words(args.bad_words))
    task_ids = None
    if args.lora_dir:
        if runner.lora is None:
            raise TrtbuildError(f"--lora_dir given, but {args.engine_dir} was built without --lora_plugin")
        for d in args.lora_dir:
            runner.add_lora(d)
    if args.lora_task_uids:
        task_ids = list(args.lora_task_uids)
        if len(task_ids) == 1:
            task_ids *= len(prompts)
    callback = None
    if args.streaming and leader:
        def callback(i: int, new_ids: list[int]) -> None:
            text = tok.decode(new_ids, skip_special_tokens=True) if tok else str(new_ids)
            prefix = f"[Text {i}] " if len(prompts) > 1 else ""
            sys.stdout.write(prefix + text + ("\n" if prefix else ""))
            sys.stdout.flush()
    out = runner.generate(prompts, sampling, lora_task_ids=task_ids, streaming_callback=callback)
    if not leader:
        return
    if args.streaming:
        print()
    for i, (p, ids) in enumerate(zip(prompts, out.output_ids)):
        in_text = tok.decode(p, skip_special_tokens=False) if tok else str(p)
        out_text = tok.decode(ids, skip_special_tokens=True) if tok else str(ids)
        print(f'Input [Text {i}]: "{in_text}"')
        print(f'Output [Text {i} Beam 0]: "{out_text}"')
    if args.output_csv:
        with open(args.output_csv, "w", newline="") as f:
            csv.writer(f).writerows(out.output_ids)
    if args.output_npy:
        width = max(len(ids) for ids in out.output_ids) or 1
        pad = end_id if end_id is not None else 0
        arr = np.full((len(prompts), 1, width), pad, np.int32)
        for i, ids in enumerate(out.output_ids):
            arr[i, 0, :len(ids)] = ids
        np.save(args.output_npy, arr)


if __name__ == "__main__":
    main()
