"""trtbuild-serve ENGINE_DIR: an OpenAI-compatible server (trtbuild.serve.app) on one engine.

    trtbuild-serve engine --port 8000 [--host 127.0.0.1] [--served_model_name NAME] [--api_key KEY]
                   [--max_queue 64] [--num_threads N] [--tokenizer_dir DIR] [--lora_dir NAME=DIR ...]

Each --lora_dir adapter (a PEFT dir, .bin or .safetensors) is served as the model NAME (default:
the dir's name) beside the base model; the engine must be built with --lora_plugin.

The scheduling flags (--prompt_lookup_num_tokens, --draft_engine_dir, --max_num_tokens,
--disable_kv_cache_reuse, ...) are run.py's: speculative decoding, chunked prefill, KV cache reuse.

The engine loads in the background: /health answers 503 until it is ready, 200 after. Binds
127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
from pathlib import Path

from trtbuild.cli.helpformat import HelpFormatter
from trtbuild.cli.scheduling_args import add_scheduling_args, runner_options, scheduling_from_args
from trtbuild.errors import TrtbuildError, cli_entry, setup_logging

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trtbuild-serve", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("engine_dir", help="engine dir built by trt-build")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--tokenizer_dir", default=None, help="default: the engine dir's tokenizer/")
    p.add_argument("--served_model_name", default=None, help="the model name clients send (default: the engine "
                                                              "dir's name)")
    p.add_argument("--api_key", default=os.environ.get("TRTBUILD_API_KEY"),
                   help="require Authorization: Bearer KEY (default: $TRTBUILD_API_KEY, else none)")
    p.add_argument("--max_queue", type=int, default=64, help="requests in flight at most; more get 429")
    p.add_argument("--num_threads", type=int, default=None, help="the engine's intra-op threads")
    p.add_argument("--lora_dir", nargs="+", action="extend", default=[], metavar="NAME=DIR",
                   help="PEFT adapter dirs to serve, each as the model NAME (default: the dir's name)")
    p.add_argument("--log_level", default="info")
    add_scheduling_args(p)
    return p


def load(served, args: argparse.Namespace) -> None:
    """Open the engine and start its batcher (in a thread: /health is 503 meanwhile)."""
    from trtbuild.runtime import InflightBatcher, ModelRunner

    try:
        adapters = lora_adapters(args.lora_dir, served.model_name)
        runner = ModelRunner.from_dir(args.engine_dir, num_threads=args.num_threads, tokenizer_dir=args.tokenizer_dir,
                                      spawn_ranks=True, lora_dirs=list(adapters.values()), **runner_options(args))
        served.adapters = dict(zip(adapters, runner.adapter_task_ids))
        if runner.tokenizer is None:
            raise TrtbuildError(f"{args.engine_dir} has no tokenizer: pass --tokenizer_dir")
        runner.scheduling = scheduling_from_args(args, runner, args.num_threads)
        served.runner, served.batcher = runner, InflightBatcher(runner)
        served.ready.set()
        log.info("serving %s as %r", args.engine_dir, served.model_name)
    except TrtbuildError as e:
        served.load_error = str(e)
        log.error("%s", e)


def lora_adapters(specs: list[str], base_name: str) -> dict[str, Path]:
    """--lora_dir NAME=DIR (or DIR) values → {name: dir}; a name used twice, or the base model's, is an error."""
    adapters: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        d = Path(path if sep else spec)
        name = name if sep else d.resolve().name
        if not name or not str(d):
            raise TrtbuildError(f"--lora_dir {spec!r}: give NAME=DIR or DIR")
        if name in adapters or name == base_name:
            raise TrtbuildError(f"--lora_dir {spec!r}: the model name {name!r} is taken already (the base model is "
                                f"{base_name!r}); give each adapter its own NAME=DIR")
        adapters[name] = d
    return adapters


@cli_entry
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        import uvicorn

        from trtbuild.serve.app import ServedEngine, create_app
    except ImportError as e:
        raise TrtbuildError(f"trtbuild-serve needs the serve extra ({e.name} is missing): "
                            "pip install 'trtbuild[serve]'") from None
    engine_dir = Path(args.engine_dir)
    if not (engine_dir / "config.json").is_file():
        raise TrtbuildError(f"{engine_dir} is not an engine dir (no config.json); build one with trt-build")
    if args.max_queue < 1:
        raise TrtbuildError(f"--max_queue {args.max_queue} must be at least 1")
    tokenizer_dir = Path(args.tokenizer_dir) if args.tokenizer_dir else engine_dir / "tokenizer"
    served = ServedEngine(model_name=args.served_model_name or engine_dir.resolve().name, tokenizer_dir=tokenizer_dir,
                          api_key=args.api_key, max_queue=args.max_queue)
    lora_adapters(args.lora_dir, served.model_name)  # a bad --lora_dir is an error before the server starts
    threading.Thread(target=load, args=(served, args), daemon=True, name="trtbuild-load").start()
    try:
        uvicorn.run(create_app(served), host=args.host, port=args.port, log_level=args.log_level.lower(),
                    access_log=False)
    finally:
        if served.batcher is not None:
            served.batcher.shutdown()
            if served.runner.world is not None:  # the ranks it started follow the batcher's shutdown
                served.runner.world.close()


if __name__ == "__main__":
    main()
