"""trt-build: compile a checkpoint dir into an engine dir (TensorRT-LLM's trtllm-build flags)."""

from __future__ import annotations

import argparse

from trtbuild.builder import BACKENDS, build_engine
from trtbuild.cli.helpformat import HelpFormatter
from trtbuild.engine import PLUGIN_CHOICES, BuildConfig, LoraConfig, PluginConfig
from trtbuild.errors import TrtbuildError, cli_entry, setup_logging


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trt-build", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--checkpoint_dir", required=True, help="checkpoint dir made by convert_checkpoint.py")
    p.add_argument("--output_dir", required=True, help="engine dir to write")
    p.add_argument("--max_batch_size", type=int, default=8, help="sequences run together, at most")
    p.add_argument("--max_input_len", type=int, default=None, help="default: min(1024, max_seq_len)")
    p.add_argument("--max_seq_len", type=int, default=None,
                   help="prompt + output tokens per sequence (default: min(2048, max_position_embeddings))")
    p.add_argument("--max_num_tokens", type=int, default=None,
                   help="tokens per prefill batch (default: max_batch_size x max_input_len)")
    p.add_argument("--gpt_attention_plugin", default="auto", choices=PLUGIN_CHOICES,
                   help="attention as onnxruntime's fused GroupQueryAttention (auto: in the engine's compute "
                        "dtype) or, with disable, standard ONNX ops (what the tensorrt backend always uses)")
    p.add_argument("--gemm_plugin", default="auto", choices=PLUGIN_CHOICES,
                   help="quantized linears as fused MatMulNBits / MatMulIntegerToFloat or, with disable, "
                        "DequantizeLinear + MatMul")
    p.add_argument("--norm_plugin", default="auto", choices=PLUGIN_CHOICES,
                   help="fused residual-add + RMSNorm/LayerNorm")
    p.add_argument("--lora_plugin", default=None, choices=PLUGIN_CHOICES,
                   help="per-request LoRA adapters (default: auto when --lora_dir is given)")
    p.add_argument("--lora_dir", nargs="+", default=None, help="PEFT adapter dirs stored in the engine")
    p.add_argument("--max_lora_rank", type=int, default=None,
                   help="rank capacity of every adapter slot (default: the largest rank among --lora_dir)")
    p.add_argument("--lora_target_modules", nargs="+", default=None,
                   help="modules that take adapters (default: every module the --lora_dir adapters have)")
    p.add_argument("--max_loras", type=int, default=None, help="adapter slots (default: adapters given + 4)")
    p.add_argument("--backend", default="onnxruntime", choices=BACKENDS,
                   help="onnxruntime (CPU) or tensorrt (NVIDIA GPUs; builds without one)")
    p.add_argument("--trt_compute_capabilities", nargs="+", default=None, help="tensorrt backend: SM targets")
    p.add_argument("--no_quantize_lm_head", action="store_true",
                   help="weight-only engines: keep lm_head in floating point (default: int8 per channel)")
    p.add_argument("--weight_only_activations", default="int8", choices=["int8", "float"],
                   help="weight-only engines (W8A16, W4A16*): multiply the int8/int4 weights by activations "
                        "quantized to int8 per block of 32 (or of the group; onnxruntime's fast kernel), or by "
                        "float activations (exactly A16, ~8x slower decode than fp32 on CPU)")
    p.add_argument("--context_fmha", default="enable", choices=["enable", "disable"],
                   help="attention plugin: prompts into an empty cache run trtbuild's causal attention kernel "
                        "(compiled for this machine on first use; needs g++)")
    p.add_argument("--smooth_quant_plugins", default="enable", choices=["enable", "disable"],
                   help="gemm plugin, SmoothQuant W8A8 per token: quantize activations with trtbuild's per-token "
                        "kernels (one pass per row; compiled on first use, needs g++)")
    p.add_argument("--context_split_min_len", type=int, default=128,
                   help="attention plugin without --context_fmha: one prompt of min <= tokens < "
                        "--context_split_max_len attends in two causal halves, skipping a quarter of the score "
                        "matrix (0: never)")
    p.add_argument("--context_split_max_len", type=int, default=768,
                   help="the end of --context_split_min_len's window (exclusive)")
    p.add_argument("--keep_onnx", action="store_true", help="keep the network's ONNX file in the engine dir")
    p.add_argument("--force", action="store_true", help="replace --output_dir if it exists")
    p.add_argument("--log_level", default="info", help="internal_error, error, warning, info, verbose or debug")
    from trtbuild.quantization.api import add_quant_args

    add_quant_args(p)  # quantize a floating-point checkpoint while building
    return p


@cli_entry
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    max_seq_len = args.max_seq_len
    if max_seq_len is None:
        from trtbuild.checkpoint import load_config

        max_seq_len = min(2048, load_config(args.checkpoint_dir).max_position_embeddings)
        if args.max_input_len is not None:
            max_seq_len = max(max_seq_len, args.max_input_len)
    max_input_len = args.max_input_len if args.max_input_len is not None else min(1024, max_seq_len)
    if args.lora_dir and args.lora_plugin in (None, "disable"):
        args.lora_plugin = "auto"
    if args.lora_plugin not in (None, "disable") and not args.lora_dir:
        raise TrtbuildError("--lora_plugin needs --lora_dir with at least one adapter")
    lora = LoraConfig()
    if args.lora_dir:
        lora = LoraConfig(lora_dir=list(args.lora_dir), max_lora_rank=args.max_lora_rank or 0,
                          lora_target_modules=list(args.lora_target_modules or []),
                          max_loras=args.max_loras or len(args.lora_dir) + 4)
    build = BuildConfig(
        max_batch_size=args.max_batch_size, max_input_len=max_input_len, max_seq_len=max_seq_len,
        max_num_tokens=args.max_num_tokens,
        plugin_config=PluginConfig(gemm_plugin=args.gemm_plugin, gpt_attention_plugin=args.gpt_attention_plugin,
                                   norm_plugin=args.norm_plugin, context_fmha=args.context_fmha == "enable",
                                   smooth_quant_plugins=args.smooth_quant_plugins == "enable",
                                   lora_plugin=None if args.lora_plugin in (None, "disable") else args.lora_plugin),
        lora_config=lora, backend=args.backend, trt_compute_capabilities=args.trt_compute_capabilities,
        quantize_lm_head=not args.no_quantize_lm_head, weight_only_activations=args.weight_only_activations,
        context_split_min_len=args.context_split_min_len,
        context_split_max_len=args.context_split_max_len)
    from trtbuild.quantization.api import recipe_from_args

    recipe = recipe_from_args(args)
    summary = build_engine(args.checkpoint_dir, args.output_dir, build, force=args.force, keep_onnx=args.keep_onnx,
                           lora_dirs=args.lora_dir, recipe=recipe)
    print(summary)


if __name__ == "__main__":
    main()
