"""trt-build's library side: checkpoint dir → engine dir (config.json + rank{N}.engine)."""

from __future__ import annotations

import logging
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime

from trtbuild.checkpoint import TOKENIZER_DIR, PretrainedConfig, expected_shapes, load_config, rank_file
from trtbuild.engine import BuildConfig, EngineConfig, save_engine_config
from trtbuild.errors import TrtbuildError
from trtbuild.fsutil import atomic_output_dir, check_output_dir, dir_size, human_bytes
from trtbuild.network import NetworkOptions, build_network
from trtbuild.plugins.quant_gemm import accuracy_level
from trtbuild.tensor_file import read_tensors
from trtbuild.version import __version__

log = logging.getLogger(__name__)

BACKENDS = ("onnxruntime", "tensorrt")
QUANTIZED_SUFFIXES = (".weights_scaling_factor", ".zero", ".prequant_scaling_factor", ".per_channel_scale",
                      ".act_scale", ".kv_cache_scaling_factor")


@dataclass
class BuildSummary:
    engine_dir: Path
    architecture: str
    num_layers: int
    dtype: str
    quant_algo: str | None
    size_bytes: int
    seconds: float

    def __str__(self) -> str:
        quant = f", {self.quant_algo}" if self.quant_algo else ""
        return (f"engine {self.engine_dir}: {self.architecture}, {self.num_layers} layers, {self.dtype}{quant}, "
                f"{human_bytes(self.size_bytes)} on disk, built in {self.seconds:.1f} s")


def check_limits(config: PretrainedConfig, build: BuildConfig) -> None:
    if build.max_batch_size < 1:
        raise TrtbuildError(f"--max_batch_size {build.max_batch_size} must be at least 1")
    if build.max_input_len < 1 or build.max_input_len > build.max_seq_len:
        raise TrtbuildError(f"--max_input_len {build.max_input_len} must be between 1 and --max_seq_len "
                            f"{build.max_seq_len}")
    if build.max_seq_len > config.max_position_embeddings:
        raise TrtbuildError(f"--max_seq_len {build.max_seq_len} is above the model's max_position_embeddings "
                            f"{config.max_position_embeddings}")
    if build.backend not in BACKENDS:
        raise TrtbuildError(f"--backend {build.backend!r} is not one of {', '.join(BACKENDS)}")
    lo, hi = build.context_split_min_len, build.context_split_max_len
    if lo < 0 or (lo and hi <= lo):
        raise TrtbuildError(f"--context_split_min_len {lo} --context_split_max_len {hi}: give 0 (never) or a "
                            "token window min < max")


def check_tensors(config: PretrainedConfig, tensors: dict[str, np.ndarray], source: Path) -> None:
    """Every tensor the network reads must be present, with the shape the config implies."""
    quantized = config.quantization.quant_algo is not None
    for name, shape in expected_shapes(config).items():
        if name not in tensors:
            raise TrtbuildError(f"{source}: tensor {name} is missing; re-run convert_checkpoint.py")
        is_linear_weight = name.endswith(".weight") and (".attention." in name or ".mlp." in name)
        if quantized and is_linear_weight:
            continue  # packed layout, checked by the gemm plugin
        if tuple(tensors[name].shape) != shape:
            raise TrtbuildError(f"{source}: tensor {name} has shape {tuple(tensors[name].shape)}, expected {shape} "
                                f"from its config.json")


def resolve_plugins(config: PretrainedConfig, build: BuildConfig) -> NetworkOptions:
    """Turn auto/disable/dtype plugin flags into what the network fuses, per backend."""
    pc = build.plugin_config
    if build.backend == "onnxruntime":
        if config.dtype != "float32":
            log.info("onnxruntime on CPU computes in float32: %s weights are widened at build", config.dtype)
        build.compute_dtype = "float32"
    else:
        # TensorRT compiles the standard-op form; its Attention has no float32 kernel.
        build.compute_dtype = config.dtype if config.dtype != "float32" else "float16"
        for flag in ("gpt_attention_plugin", "gemm_plugin", "norm_plugin"):
            if getattr(pc, flag) not in ("auto", "disable", None):
                raise TrtbuildError(f"--{flag} {getattr(pc, flag)}: the tensorrt backend compiles the standard-op "
                                    "network; use --{flag} disable (or auto)")
            setattr(pc, flag, "disable")

    def resolve(value: str | None) -> str | None:
        return None if value in (None, "disable") else (build.compute_dtype if value == "auto" else value)

    pc.gemm_plugin = resolve(pc.gemm_plugin)
    pc.gpt_attention_plugin = resolve(pc.gpt_attention_plugin)
    pc.norm_plugin = resolve(pc.norm_plugin)
    return NetworkOptions(dtype=build.compute_dtype, fused_attention=pc.gpt_attention_plugin is not None,
                          fused_gemm=pc.gemm_plugin is not None, fused_norm=pc.norm_plugin is not None,
                          max_seq_len=build.max_seq_len, quantize_lm_head=build.quantize_lm_head,
                          weight_only_activations=build.weight_only_activations,
                          context_split=(build.context_split_min_len, build.context_split_max_len)
                          if build.max_input_len >= build.context_split_min_len else (0, 0))


def resolve_kernels(config: PretrainedConfig, build: BuildConfig, options: NetworkOptions) -> None:
    """Which of trtbuild's own kernels the network uses, once the checkpoint's quantization is final
    (plugin_config.context_fmha / smooth_quant_plugins end True only if used): a prompt into an empty
    cache runs CausalPromptAttention where it applies, else GroupQueryAttention in halves for
    prompts in the --context_split window; W8A8 per token quantizes with PerTokenQuantize."""
    from trtbuild.kernels import FMHA_HEAD_SIZES, KernelUnavailable, library_path

    pc = build.plugin_config
    onnxruntime = build.backend == "onnxruntime"
    fmha = pc.context_fmha and options.fused_attention and onnxruntime
    if fmha and config.head_size not in FMHA_HEAD_SIZES:
        log.info("--context_fmha: no kernel for head size %d; prompts use GroupQueryAttention", config.head_size)
        fmha = False
    algo = config.quantization.quant_algo or ""
    per_token = pc.smooth_quant_plugins and options.fused_gemm and onnxruntime and "PER_TOKEN" in algo
    if fmha or per_token:
        try:
            library_path()
        except KernelUnavailable as e:
            log.warning("trtbuild's kernels: %s; the engine uses onnxruntime's ops instead", e)
            fmha = per_token = False
    pc.context_fmha, pc.smooth_quant_plugins = bool(fmha), bool(per_token)
    options.smooth_quant_kernels = pc.smooth_quant_plugins
    lo, hi = options.context_split
    options.prompt_attention = "fmha" if fmha else ("split" if options.fused_attention and 0 < lo < hi else None)


def quantize_at_build(config: PretrainedConfig, tensors: dict[str, np.ndarray], recipe, ckpt: Path,
                      progress: bool) -> tuple[PretrainedConfig, dict[str, np.ndarray]]:
    """Quantize a floating-point checkpoint's tensors on the way into the network (trt-build flags)."""
    if config.quantization.is_quantized:
        raise TrtbuildError(f"{ckpt} is already quantized ({config.quantization.quant_algo or 'INT8 KV'}); "
                            "pass quantization flags only with a floating-point checkpoint")
    import torch

    from trtbuild.quantization.api import quantize_checkpoint

    weights = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in tensors.items()}
    weights, config = quantize_checkpoint(weights, config, recipe, tokenizer=ckpt / TOKENIZER_DIR, progress=progress)
    return config, {k: v.numpy() for k, v in weights.items()}


def build_engine(checkpoint_dir: str | Path, output_dir: str | Path, build: BuildConfig, force: bool = False,
                 progress: bool = True, keep_onnx: bool = False, lora_dirs: list[str] | None = None,
                 recipe=None) -> BuildSummary:
    """Build an engine dir from a checkpoint dir, atomically; `recipe` (a QuantRecipe) quantizes on the way."""
    start = time.time()
    ckpt = Path(checkpoint_dir)
    out = check_output_dir(output_dir, force)
    config = load_config(ckpt)
    check_limits(config, build)
    if build.max_num_tokens is None:
        build.max_num_tokens = build.max_batch_size * build.max_input_len
    if config.mapping.world_size != 1:
        raise TrtbuildError(f"{ckpt}: world_size {config.mapping.world_size} checkpoints are not supported yet")
    accuracy_level(build.weight_only_activations)  # a bad value fails before any work
    options = resolve_plugins(config, build)
    if build.backend == "tensorrt":  # TensorRT missing, bad targets, a recipe it cannot compile: before any work
        from trtbuild.backends.tensorrt_backend import check_tensorrt_build

        check_tensorrt_build(config, build, recipe)
    tensorrt_builds: dict[str, dict] = {}
    kv_scales = None
    with atomic_output_dir(out) as tmp:
        for rank in range(config.mapping.world_size):
            tensors = read_tensors(ckpt / rank_file(rank))
            check_tensors(config, tensors, ckpt / rank_file(rank))
            if recipe is not None and not recipe.is_noop:
                config, tensors = quantize_at_build(config, tensors, recipe, ckpt, progress)
            if lora_dirs:
                from trtbuild.lora_engine import prepare_lora

                options.lora = prepare_lora(config, build, lora_dirs, tmp)
            resolve_kernels(config, build, options)
            onnx_path = tmp / f"rank{rank}.onnx"
            build_network(config, tensors, options, onnx_path, progress)
            engine_path = tmp / f"rank{rank}.engine"
            if build.backend == "onnxruntime":
                from trtbuild.backends.onnxruntime_backend import compile_engine
                from trtbuild.cpu_forms import write_u8u8_form

                compile_engine(onnx_path, engine_path, kernels=build.plugin_config.uses_kernels,
                               matmulnbits_accuracy_level=accuracy_level(build.weight_only_activations))
                build.u8u8_form = write_u8u8_form(engine_path) is not None
                kv_scales = tensors.get("transformer.layers.0.attention.kv_cache_scaling_factor")
            else:
                from trtbuild.backends.tensorrt_backend import (build_for_engine_dir, build_info_for_config,
                                                                layers_report)

                verbose = log.isEnabledFor(logging.DEBUG)
                info = build_for_engine_dir(onnx_path, engine_path, config, build, log_verbose=verbose,
                                            progress=progress, rank=rank)
                tensorrt_builds[f"rank{rank}"] = build_info_for_config(info)
                if verbose:  # `polygraphy inspect model` on the engine (needs a GPU) + the builder's layer list
                    log.debug("%s", layers_report(engine_path, info))
            if not keep_onnx:
                onnx_path.unlink()
                (tmp / (onnx_path.name + ".data")).unlink()
        if build.backend == "onnxruntime":
            from trtbuild.cpu_forms import write_probes

            write_probes(tmp, config, build.max_seq_len, build.plugin_config.context_fmha, build.u8u8_form, kv_scales)
        if (ckpt / TOKENIZER_DIR).is_dir():
            shutil.copytree(ckpt / TOKENIZER_DIR, tmp / TOKENIZER_DIR)
        built_by = {"trtbuild": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                    "python": platform.python_version(), "checkpoint_dir": str(ckpt.resolve())}
        if tensorrt_builds:
            built_by["tensorrt"] = tensorrt_builds
        save_engine_config(EngineConfig(pretrained_config=config, build_config=build, built_by=built_by), tmp)
    return BuildSummary(out, config.architecture, config.num_hidden_layers, build.compute_dtype,
                        config.quantization.quant_algo, dir_size(out), time.time() - start)
