"""The build asked for → the build that happens: every default filled, every plugin flag turned into
what the network fuses, once, before any work (the caller's BuildConfig is never changed).

    build = resolve_build(config, asked, quant_algo)   # frozen; what the engine's config.json records
    options = network_options(build)                   # what trtbuild.network writes
"""

from __future__ import annotations

import logging
from dataclasses import replace

from trtbuild.checkpoint import PretrainedConfig
from trtbuild.engine import DEFAULT_MAX_DRAFT_LEN, LM_HEAD_PRECISIONS, SPECULATIVE_MODES, BuildConfig, PluginConfig
from trtbuild.errors import TrtbuildError
from trtbuild.network import LM_HEAD_INT4_BLOCK, NetworkOptions, lm_head_in_int8
from trtbuild.plugins.quant_gemm import accuracy_level
from trtbuild.quant_algo import QuantAlgo

log = logging.getLogger(__name__)

BACKENDS = ("onnxruntime", "tensorrt")
DEFAULT_MAX_INPUT_LEN = 1024
DEFAULT_MAX_SEQ_LEN = 2048


def resolve_limits(config: PretrainedConfig, build: BuildConfig) -> BuildConfig:
    """Fill max_seq_len / max_input_len / max_num_tokens from the model, then check them."""
    max_seq_len = build.max_seq_len
    if max_seq_len is None:
        max_seq_len = max(min(DEFAULT_MAX_SEQ_LEN, config.max_position_embeddings), build.max_input_len or 1)
    max_input_len = build.max_input_len if build.max_input_len is not None else min(DEFAULT_MAX_INPUT_LEN,
                                                                                     max_seq_len)
    if build.max_batch_size < 1:
        raise TrtbuildError(f"--max_batch_size {build.max_batch_size} must be at least 1")
    if max_input_len < 1 or max_input_len > max_seq_len:
        raise TrtbuildError(f"--max_input_len {max_input_len} must be between 1 and --max_seq_len {max_seq_len}")
    if max_seq_len > config.max_position_embeddings:
        raise TrtbuildError(f"--max_seq_len {max_seq_len} is above the model's max_position_embeddings "
                            f"{config.max_position_embeddings}")
    if build.backend not in BACKENDS:
        raise TrtbuildError(f"--backend {build.backend!r} is not one of {', '.join(BACKENDS)}")
    lo, hi = build.context_split_min_len, build.context_split_max_len
    if lo < 0 or (lo and hi <= lo):
        raise TrtbuildError(f"--context_split_min_len {lo} --context_split_max_len {hi}: give 0 (never) or a "
                            "token window min < max")
    accuracy_level(build.weight_only_activations)  # a bad value fails here
    max_num_tokens = build.max_num_tokens if build.max_num_tokens is not None else build.max_batch_size * max_input_len
    if max_num_tokens < 1:
        raise TrtbuildError(f"--max_num_tokens {max_num_tokens} must be at least 1")
    mode, drafts = build.speculative_decoding_mode, build.max_draft_len
    if mode is not None:
        if mode not in SPECULATIVE_MODES:
            raise TrtbuildError(f"--speculative_decoding_mode {mode!r} is not one of {', '.join(SPECULATIVE_MODES)}")
        if build.plugin_config.gpt_attention_plugin in (None, "disable") or build.backend != "onnxruntime":
            raise TrtbuildError("--speculative_decoding_mode needs the onnxruntime backend's attention plugin "
                                "(its shared KV buffer rolls rejected drafts back): drop --gpt_attention_plugin "
                                "disable")
        drafts = drafts or DEFAULT_MAX_DRAFT_LEN
    if drafts < 0:
        raise TrtbuildError(f"--max_draft_len {drafts} must be at least 1")
    return replace(build, max_seq_len=max_seq_len, max_input_len=max_input_len, max_num_tokens=max_num_tokens,
                   max_draft_len=drafts)


def resolve_plugins(config: PretrainedConfig, build: BuildConfig) -> BuildConfig:
    """The compute dtype, and auto/disable/dtype plugin flags as a dtype or None, per backend."""
    pc = build.plugin_config
    if build.backend == "onnxruntime":
        if config.dtype != "float32":
            log.info("onnxruntime on CPU computes in float32: %s weights are widened at build", config.dtype)
        compute_dtype = "float32"
    else:
        # TensorRT compiles the standard-op form; its Attention has no float32 kernel.
        compute_dtype = config.dtype if config.dtype != "float32" else "float16"
        for flag in ("gpt_attention_plugin", "gemm_plugin", "norm_plugin"):
            value = getattr(pc, flag)
            if value not in ("auto", "disable", None):
                raise TrtbuildError(f"--{flag} {value}: the tensorrt backend compiles the standard-op "
                                    f"network; use --{flag} disable (or auto)")
        pc = replace(pc, gpt_attention_plugin=None, gemm_plugin=None, norm_plugin=None)

    def resolve(value: str | None) -> str | None:
        return None if value in (None, "disable") else (compute_dtype if value == "auto" else value)

    pc = replace(pc, gemm_plugin=resolve(pc.gemm_plugin), gpt_attention_plugin=resolve(pc.gpt_attention_plugin),
                 norm_plugin=resolve(pc.norm_plugin))
    return replace(build, compute_dtype=compute_dtype, plugin_config=pc)


def resolve_kernels(config: PretrainedConfig, build: BuildConfig, algo: QuantAlgo | None) -> PluginConfig:
    """Which of trtbuild's own kernels the network uses, given the linears' final quant_algo
    (context_fmha / smooth_quant_plugins / lm_head_plugin / weight_only_quant_matmul_plugin stay True
    only if used): a prompt into an empty cache runs CausalPromptAttention where it applies; W8A8 per
    token quantizes with PerTokenQuantize; a tied float32 lm_head runs LmHead; weight-only linears
    and an int8 lm_head with int8 activations run WeightOnlyQuantMatMul."""
    from trtbuild.kernels import FMHA_HEAD_SIZES, KernelUnavailable, library_path

    pc = build.plugin_config
    onnxruntime = build.backend == "onnxruntime"
    fmha = pc.context_fmha and pc.gpt_attention_plugin is not None and onnxruntime
    if fmha and config.head_size not in FMHA_HEAD_SIZES:
        log.info("--context_fmha: no kernel for head size %d; prompts use GroupQueryAttention", config.head_size)
        fmha = False
    per_token = (pc.smooth_quant_plugins and pc.gemm_plugin is not None and onnxruntime
                 and algo is not None and algo.per_token)
    float_lm_head = not lm_head_in_int8(algo, build.quantize_lm_head)
    # only a tied lm_head: there the packed copy is the embedding table twice for good; an untied
    # one's copy replaces its original after load, and Gemm decodes 8 rows faster (benchmarks/README.md)
    lm_head = (pc.lm_head_plugin and pc.gemm_plugin is not None and onnxruntime and float_lm_head
               and build.compute_dtype == "float32" and config.tie_word_embeddings)
    weight_only = (pc.weight_only_quant_matmul_plugin and pc.gemm_plugin is not None and onnxruntime
                   and build.weight_only_activations == "int8" and algo is not None
                   and (algo.weight_only or lm_head_in_int8(algo, build.quantize_lm_head)))
    if fmha or per_token or lm_head or weight_only:
        try:
            library_path()
        except KernelUnavailable as e:
            log.warning("trtbuild's kernels: %s; the engine uses onnxruntime's ops instead", e)
            fmha = per_token = lm_head = weight_only = False
    return replace(pc, context_fmha=bool(fmha), smooth_quant_plugins=bool(per_token), lm_head_plugin=bool(lm_head),
                   weight_only_quant_matmul_plugin=bool(weight_only))


def resolve_build(config: PretrainedConfig, build: BuildConfig, algo: QuantAlgo | None) -> BuildConfig:
    """The build that happens for this checkpoint whose linears end as `algo` (LoRA capacity is
    resolved with the adapters, trtbuild.lora_engine)."""
    check_lm_head_precision(config, build, algo)
    build = resolve_plugins(config, resolve_limits(config, build))
    return replace(build, plugin_config=resolve_kernels(config, build, algo))


def check_lm_head_precision(config: PretrainedConfig, build: BuildConfig, algo: QuantAlgo | None) -> None:
    """--lm_head_precision: int8, or int4 where lm_head is quantized and in whole blocks."""
    precision = build.lm_head_precision
    if precision not in LM_HEAD_PRECISIONS:
        raise TrtbuildError(f"--lm_head_precision {precision!r} is not one of {', '.join(LM_HEAD_PRECISIONS)}")
    if precision == "int8":
        return
    if not lm_head_in_int8(algo, build.quantize_lm_head):
        why = "--no_quantize_lm_head keeps it in floating point" if algo is not None else \
            "this engine's linears are not quantized (add --use_weight_only or --smoothquant)"
        raise TrtbuildError(f"--lm_head_precision {precision} quantizes lm_head, but {why}")
    if config.hidden_size % LM_HEAD_INT4_BLOCK:
        raise TrtbuildError(f"--lm_head_precision {precision}: hidden_size {config.hidden_size} is not a multiple of "
                            f"its blocks of {LM_HEAD_INT4_BLOCK}; use int8")


def network_options(build: BuildConfig) -> NetworkOptions:
    """What the network writer fuses, from a resolved build."""
    pc = build.plugin_config
    fused_attention = pc.gpt_attention_plugin is not None
    assert build.max_input_len is not None and build.max_seq_len is not None and build.compute_dtype is not None
    split = ((build.context_split_min_len, build.context_split_max_len)
             if build.max_input_len >= build.context_split_min_len else (0, 0))
    lo, hi = split
    return NetworkOptions(dtype=build.compute_dtype, fused_attention=fused_attention,
                          fused_gemm=pc.gemm_plugin is not None, fused_norm=pc.norm_plugin is not None,
                          max_seq_len=build.max_seq_len, quantize_lm_head=build.quantize_lm_head,
                          lm_head_precision=build.lm_head_precision,
                          weight_only_activations=build.weight_only_activations, context_split=split,
                          smooth_quant_kernels=pc.smooth_quant_plugins, lm_head_kernel=pc.lm_head_plugin,
                          weight_only_kernel=pc.weight_only_quant_matmul_plugin,
                          prompt_attention="fmha" if pc.context_fmha else
                          ("split" if fused_attention and 0 < lo < hi else None))
