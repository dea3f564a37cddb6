"""Which quantization recipes the tensorrt backend compiles, refused before any work otherwise.

Built and checked (tensorrt_rtx 1.7.1.116, tiny Llama): float16, int8/int4 weight-only (RTN, GPTQ,
AWQ; per channel or per group), SmoothQuant (static per-tensor Q/DQ, and per-token, which stays a
float16 emulation) and int8 KV all build and match the fused onnxruntime engine at the parser
level; asymmetric (zero points) and bfloat16 (written as float32 by the network writer) are
refused up front. SmolLM2-135M, batch 4 / input 256 / seq 512: float16 274 MiB engine in ~37 s,
int4 161 MiB in ~26-30 s (TensorRT build time, 2 loaded cores). More in docs/TENSORRT.md.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from trtbuild.backends.tensorrt.probe import is_rtx, normalize_compute_capabilities, require_trt
from trtbuild.errors import TrtbuildError

if TYPE_CHECKING:
    from trtbuild.checkpoint import PretrainedConfig, QuantConfig
    from trtbuild.engine import BuildConfig
    from trtbuild.quantization.recipe import QuantRecipe


def describe_recipe(config: PretrainedConfig, build: BuildConfig | None = None) -> str:
    """One phrase for what is built: "float16", "float16, int4 weight-only W4A16 (symmetric, per-group 64)"."""
    q = config.quantization
    parts = [build.compute_dtype if build is not None else config.dtype]
    algo = q.algo
    if algo is not None and algo.smoothquant:
        parts.append(f"SmoothQuant {algo.name}")
    elif algo is not None:
        kind = {"gptq": " GPTQ", "awq": " AWQ"}.get(algo.method, "")
        grouping = f"per-group {q.group_size}" if q.per_group and q.group_size > 0 else "per-channel"
        zp = "asymmetric" if q.has_zero_point else "symmetric"
        parts.append(f"int{algo.weight_bits}{kind} weight-only {algo.name} ({zp}, {grouping})")
    if q.kv_cache_quant_algo:
        parts.append(f"{q.kv_cache_quant_algo.lower()} KV cache")
    return ", ".join(parts)


def _effective_quant(config: PretrainedConfig, recipe: QuantRecipe | None = None) -> QuantConfig:
    """The checkpoint's quantization, or what a trt-build recipe (QuantRecipe) will make of it."""
    q = config.quantization
    if recipe is None or recipe.is_noop:
        return q
    return recipe.quant_config(pre_quant_scale=q.pre_quant_scale)


def check_tensorrt_recipe(config: PretrainedConfig, build: BuildConfig, recipe: QuantRecipe | None = None) -> None:
    """Refuse, before any work, what the tensorrt backend cannot compile: one line naming the recipe.

    Built and checked here (tensorrt_rtx 1.7.1.116): float16 (float32 checkpoints are built in
    float16), int8/int4 weight-only symmetric (RTN, GPTQ, AWQ; per channel or per group),
    SmoothQuant W8A8 (per-tensor static and per-token forms), int8 KV cache. Refused: asymmetric
    weight-only (zero points: TensorRT's DequantizeLinear takes only zero zero-points, and has no
    uint4), bfloat16 (the network writer writes it as float32, and TensorRT's Attention has no
    float32 kernel), and per-group sizes that do not divide a linear's inputs (TensorRT needs whole
    blocks).
    """
    view = replace(config, quantization=_effective_quant(config, recipe))
    q = view.quantization
    what = describe_recipe(view, build)

    def refuse(reason: str) -> None:
        raise TrtbuildError(f"--backend tensorrt cannot build {what}: {reason}")

    if build.compute_dtype == "bfloat16" or config.dtype == "bfloat16":
        what = what.replace("bfloat16", "a bfloat16 checkpoint", 1)
        refuse("the network is written in float32 for bfloat16 checkpoints and TensorRT's Attention has no float32 "
               "kernel; convert with --dtype float16 (or float32, which is built in float16), or build with "
               "--backend onnxruntime")
    if q.algo is not None and q.algo.weight_only and q.has_zero_point:
        refuse("TensorRT's DequantizeLinear takes only zero zero-points (and has no uint4 weights); quantize "
               "symmetrically (without --has_zero_point), or build with --backend onnxruntime")
    if q.algo is not None and q.per_group and q.group_size > 0:
        sizes = {"hidden_size": config.hidden_size, "attention output (heads * head_size)": config.q_dim,
                 "intermediate_size": config.intermediate_size}
        bad = [f"{k} {v}" for k, v in sizes.items() if v % q.group_size]
        if bad:
            refuse(f"{', '.join(bad)} is not a multiple of group_size {q.group_size} and TensorRT quantizes in whole "
                   "blocks; use a --group_size that divides it, per-channel scales, or --backend onnxruntime")


def check_tensorrt_build(config: PretrainedConfig, build: BuildConfig, recipe: QuantRecipe | None = None) -> None:
    """Everything the tensorrt backend can refuse before any work: TensorRT installed, the targets
    (--trt_compute_capabilities) and the recipe (check_tensorrt_recipe). One line each."""
    _, package = require_trt()
    targets = normalize_compute_capabilities(build.trt_compute_capabilities, package)
    if targets and not is_rtx(package):
        raise TrtbuildError(f"--trt_compute_capabilities needs tensorrt_rtx; {package} builds for the GPU it runs on")
    check_tensorrt_recipe(config, build, recipe)
