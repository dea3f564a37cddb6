"""convert_checkpoint.py / trtbuild-convert: HF model dir → trtbuild checkpoint dir."""

from __future__ import annotations

import argparse

from trtbuild.convert.converter import convert_checkpoint
from trtbuild.errors import TrtbuildError, cli_entry, setup_logging


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convert_checkpoint.py", description=__doc__)
    p.add_argument("--model_dir", required=True, help="Hugging Face model dir (config.json + weights)")
    p.add_argument("--output_dir", required=True, help="checkpoint dir to write")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--tp_size", type=int, default=1, help="tensor parallel ranks (only 1 today)")
    p.add_argument("--pp_size", type=int, default=1, help="pipeline parallel ranks (only 1 today)")
    p.add_argument("--force", action="store_true", help="replace --output_dir if it exists")
    p.add_argument("--log_level", default="info")
    return p


@cli_entry
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)

    if args.tp_size != 1 or args.pp_size != 1:
        raise TrtbuildError("--tp_size/--pp_size above 1 are not supported yet; the checkpoint layout is per-rank, "
                            "so they will be an addition")
    summary = convert_checkpoint(args.model_dir, args.output_dir, args.dtype, force=args.force)
    print(summary)


if __name__ == "__main__":
    main()
