"""convert_checkpoint.py / trtbuild-convert: HF model dir → trtbuild checkpoint dir.

Optionally merges PEFT LoRA adapters (--hf_lora_dir) and quantizes (TensorRT-LLM's flags).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from trtbuild.cli.helpformat import HelpFormatter
from trtbuild.convert.converter import convert_checkpoint
from trtbuild.errors import cli_entry, setup_logging
from trtbuild.quantization.api import quantize_checkpoint
from trtbuild.quantization.recipe import add_quant_args, recipe_from_args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convert_checkpoint.py", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model_dir", required=True, help="Hugging Face model dir (config.json + weights)")
    p.add_argument("--output_dir", required=True, help="checkpoint dir to write")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--hf_lora_dir", nargs="+", default=None,
                   help="PEFT adapter dirs (.safetensors or .bin) merged into the weights")
    p.add_argument("--tp_size", type=int, default=1,
                   help="tensor-parallel ranks: rank{r}.safetensors split as TensorRT-LLM splits them")
    p.add_argument("--pp_size", type=int, default=1, help="pipeline stages: the layers divided over them (ranks = tp_size x pp_size)")
    p.add_argument("--force", action="store_true", help="replace --output_dir if it exists")
    p.add_argument("--log_level", default="info")
    add_quant_args(p)
    return p


def make_transform(args: argparse.Namespace, model_dir: Path):
    """LoRA merge, then quantization, between reading the HF weights and writing the checkpoint."""
    recipe = recipe_from_args(args)
    adapters_dirs = args.hf_lora_dir or []
    if not adapters_dirs and recipe.is_noop:
        return None

    def transform(weights, config):
        if adapters_dirs:
            from trtbuild.convert.lora import load_lora_adapter, merge_lora

            adapters = [load_lora_adapter(d, config) for d in adapters_dirs]
            weights, config = merge_lora(weights, config, adapters)
        if not recipe.is_noop:
            weights, config = quantize_checkpoint(weights, config, recipe, tokenizer=model_dir)
        return weights, config

    return transform


@cli_entry
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    transform = make_transform(args, Path(args.model_dir))
    summary = convert_checkpoint(args.model_dir, args.output_dir, args.dtype, force=args.force, transform=transform,
                                 tp_size=args.tp_size, pp_size=args.pp_size)
    print(summary)


if __name__ == "__main__":
    main()
