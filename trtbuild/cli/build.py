"""trt-build: compile a checkpoint dir into an engine dir (TensorRT-LLM's trtllm-build flags)."""

from __future__ import annotations

import argparse

from trtbuild.builder import build_engine
from trtbuild.cli.helpformat import HelpFormatter
from trtbuild.engine import EXTRA_LORA_SLOTS, LM_HEAD_PRECISIONS, PLUGIN_CHOICES, BuildConfig, LoraConfig, PluginConfig
from trtbuild.errors import cli_entry, setup_logging
from trtbuild.resolve import BACKENDS, DEFAULT_MAX_INPUT_LEN, DEFAULT_MAX_SEQ_LEN


def enabled(on: bool) -> str:
    return "enable" if on else "disable"


def build_parser() -> argparse.ArgumentParser:
    d = BuildConfig()  # every default comes from the library's BuildConfig
    p = argparse.ArgumentParser(prog="trt-build", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--checkpoint_dir", required=True, help="checkpoint dir made by convert_checkpoint.py")
    p.add_argument("--output_dir", required=True, help="engine dir to write")
    p.add_argument("--max_batch_size", type=int, default=d.max_batch_size, help="sequences run together, at most")
    p.add_argument("--max_input_len", type=int, default=d.max_input_len,
                   help=f"default: min({DEFAULT_MAX_INPUT_LEN}, max_seq_len)")
    p.add_argument("--max_seq_len", type=int, default=d.max_seq_len,
                   help=f"prompt + output tokens per sequence (default: min({DEFAULT_MAX_SEQ_LEN}, "
                        "max_position_embeddings), at least --max_input_len)")
    p.add_argument("--max_num_tokens", type=int, default=d.max_num_tokens,
                   help="tokens per prefill batch (default: max_batch_size x max_input_len)")
    p.add_argument("--gpt_attention_plugin", default=d.plugin_config.gpt_attention_plugin, choices=PLUGIN_CHOICES,
                   help="attention as onnxruntime's fused GroupQueryAttention (auto: in the engine's compute "
                        "dtype) or, with disable, standard ONNX ops (what the tensorrt backend always uses)")
    p.add_argument("--gemm_plugin", default=d.plugin_config.gemm_plugin, choices=PLUGIN_CHOICES,
                   help="quantized linears as fused MatMulNBits / MatMulIntegerToFloat or, with disable, "
                        "DequantizeLinear + MatMul")
    p.add_argument("--norm_plugin", default=d.plugin_config.norm_plugin, choices=PLUGIN_CHOICES,
                   help="fused residual-add + RMSNorm/LayerNorm")
    p.add_argument("--lora_plugin", default=d.plugin_config.lora_plugin, choices=PLUGIN_CHOICES,
                   help="per-request LoRA adapters (default: auto when --lora_dir is given)")
    p.add_argument("--lora_dir", nargs="+", default=list(d.lora_config.lora_dir), help="PEFT adapter dirs stored in the engine")
    p.add_argument("--max_lora_rank", type=int, default=d.lora_config.max_lora_rank,
                   help="rank capacity of every adapter slot (default: the largest rank among --lora_dir)")
    p.add_argument("--lora_target_modules", nargs="+", default=list(d.lora_config.lora_target_modules),
                   help="modules that take adapters (default: every module the --lora_dir adapters have)")
    p.add_argument("--max_loras", type=int, default=d.lora_config.max_loras,
                   help=f"adapter slots (default: adapters given + {EXTRA_LORA_SLOTS})")
    p.add_argument("--backend", default=d.backend, choices=BACKENDS,
                   help="onnxruntime (CPU) or tensorrt (NVIDIA GPUs; builds without one)")
    p.add_argument("--trt_compute_capabilities", nargs="+", default=d.trt_compute_capabilities, help="tensorrt backend: SM targets")
    p.add_argument("--no_quantize_lm_head", action="store_true",
                   help="engines with quantized linears (weight-only, SmoothQuant): keep lm_head and the embedding "
                        "table in floating point (default: int8 in blocks of 32 along the hidden size)")
    p.add_argument("--lm_head_precision", default=d.lm_head_precision, choices=list(LM_HEAD_PRECISIONS),
                   help="engines with quantized linears: lm_head's weights in int8 or int4 (blocks of 32 along "
                        "the hidden size: half the bytes a decode step reads for lm_head, at some accuracy: "
                        "see the README's Quantization section); the embedding table stays int8")
    p.add_argument("--weight_only_activations", default=d.weight_only_activations, choices=["int8", "float"],
                   help="weight-only engines (W8A16, W4A16*): multiply the int8/int4 weights by activations "
                        "quantized to int8 per block of 32 (or of the group; onnxruntime's fast kernel), or by "
                        "float activations (exactly A16, ~8x slower decode than fp32 on CPU)")
    p.add_argument("--context_fmha", default=enabled(d.plugin_config.context_fmha), choices=["enable", "disable"],
                   help="attention plugin: prompts into an empty cache run trtbuild's causal attention kernel, "
                        "every step after its generation attention kernel (compiled for this machine on first "
                        "use; needs g++)")
    p.add_argument("--smooth_quant_plugins", default=enabled(d.plugin_config.smooth_quant_plugins), choices=["enable", "disable"],
                   help="gemm plugin, SmoothQuant W8A8 per token: quantize activations with trtbuild's per-token "
                        "kernels (one pass per row; compiled on first use, needs g++)")
    p.add_argument("--lm_head_plugin", default=enabled(d.plugin_config.lm_head_plugin), choices=["enable", "disable"],
                   help="gemm plugin, a float32 lm_head tied to the embedding table: trtbuild's kernel reads the "
                        "table where it lies instead of onnxruntime's packed copy of it (the table once less in "
                        "memory, 8-row decode ~5%% slower; compiled on first use, needs g++)")
    p.add_argument("--weight_only_quant_matmul_plugin", default=enabled(d.plugin_config.weight_only_quant_matmul_plugin),
                   choices=["enable", "disable"],
                   help="gemm plugin, weight-only engines with int8 activations: trtbuild's kernel multiplies "
                        "every row of a step with weights decoded once (onnxruntime's MatMulNBits decodes them "
                        "again for each row; the same results); compiled on first use, needs g++")
    p.add_argument("--context_split_min_len", type=int, default=d.context_split_min_len,
                   help="attention plugin without --context_fmha: one prompt of min <= tokens < "
                        "--context_split_max_len attends in two causal halves, skipping a quarter of the score "
                        "matrix (0: never)")
    p.add_argument("--context_split_max_len", type=int, default=d.context_split_max_len,
                   help="the end of --context_split_min_len's window (exclusive)")
    p.add_argument("--speculative_decoding_mode", default=d.speculative_decoding_mode,
                   choices=["prompt_lookup", "draft_tokens_external"],
                   help="speculative decoding the engine runs by default: drafts from n-grams of the prompt and "
                        "output (prompt_lookup), or from a draft engine given at run time (run.py --draft_engine_dir)")
    p.add_argument("--max_draft_len", type=int, default=d.max_draft_len,
                   help="drafted tokens checked per step (default 4 with --speculative_decoding_mode)")
    p.add_argument("--tp_size", type=int, default=None,
                   help="split an unsplit checkpoint over this many tensor-parallel ranks (an engine per rank; "
                        "run them with mpiexec -n N); default: the checkpoint's own split")
    p.add_argument("--pp_size", type=int, default=None,
                   help="split an unsplit checkpoint's layers over this many pipeline stages (default: the "
                        "checkpoint's own split)")
    p.add_argument("--workers", type=int, default=1, help="rank engines built at once (multi-rank builds)")
    p.add_argument("--keep_onnx", action="store_true", help="keep the network's ONNX file in the engine dir")
    p.add_argument("--force", action="store_true", help="replace --output_dir if it exists")
    p.add_argument("--log_level", default="info", help="internal_error, error, warning, info, verbose or debug")
    from trtbuild.quantization.recipe import add_quant_args

    add_quant_args(p)  # quantize a floating-point checkpoint while building
    return p


@cli_entry
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    build = BuildConfig(
        max_batch_size=args.max_batch_size, max_input_len=args.max_input_len, max_seq_len=args.max_seq_len,
        max_num_tokens=args.max_num_tokens,
        plugin_config=PluginConfig(gemm_plugin=args.gemm_plugin, gpt_attention_plugin=args.gpt_attention_plugin,
                                   norm_plugin=args.norm_plugin, context_fmha=args.context_fmha == "enable",
                                   smooth_quant_plugins=args.smooth_quant_plugins == "enable",
                                   lm_head_plugin=args.lm_head_plugin == "enable",
                                   weight_only_quant_matmul_plugin=args.weight_only_quant_matmul_plugin == "enable",
                                   lora_plugin=args.lora_plugin),
        lora_config=LoraConfig(lora_dir=args.lora_dir, max_lora_rank=args.max_lora_rank,
                               lora_target_modules=args.lora_target_modules, max_loras=args.max_loras),
        backend=args.backend, trt_compute_capabilities=args.trt_compute_capabilities,
        quantize_lm_head=not args.no_quantize_lm_head, lm_head_precision=args.lm_head_precision,
        weight_only_activations=args.weight_only_activations,
        context_split_min_len=args.context_split_min_len,
        context_split_max_len=args.context_split_max_len,
        speculative_decoding_mode=args.speculative_decoding_mode, max_draft_len=args.max_draft_len)
    from trtbuild.quantization.recipe import recipe_from_args

    recipe = recipe_from_args(args)
    summary = build_engine(args.checkpoint_dir, args.output_dir, build, force=args.force, keep_onnx=args.keep_onnx,
                           recipe=recipe, tp_size=args.tp_size, pp_size=args.pp_size,
                           workers=args.workers)
    print(summary)


if __name__ == "__main__":
    main()
