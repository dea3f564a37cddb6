"""The engine-dir step of trt-build --backend tensorrt: prepare the network, profile from the build
limits (BuildConfig), build, and what config.json records about it.

End to end, `trt-build --backend tensorrt` on SmolLM2-135M fp16 (30 layers; batch 8, input 1024,
seq 2048): 274 MiB engine, 21 s build (10 s CPU on a loaded box), 1.5 GiB peak RSS. A 7B fp16
model (~14 GB) will not build in 24 GiB of host memory; 7B int4 should (docs/TENSORRT.md).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trtbuild.backends.tensorrt.compile import Profile, build_tensorrt_engine
from trtbuild.backends.tensorrt.onnx_rewrite import onnx_structure, prepare_onnx_for_tensorrt
from trtbuild.backends.tensorrt.recipe import describe_recipe
from trtbuild.errors import TrtbuildError

if TYPE_CHECKING:
    from trtbuild.checkpoint import PretrainedConfig
    from trtbuild.engine import BuildConfig

log = logging.getLogger("trtbuild.tensorrt")


def profile_from_dim_ranges(onnx_path: str | os.PathLike, dim_ranges: dict[str, tuple[int, int, int]]) -> Profile:
    """Build a profile from the ONNX inputs' symbolic dims: {"batch_size": (1, 4, 8), ...}.

    Fixed dims are kept; a symbolic dim with no range (or an unnamed dynamic dim) is an error that
    names the input and the dim.
    """
    onnx_path = Path(onnx_path)
    model = onnx_structure(onnx_path)
    inits = {t.name for t in model.graph.initializer}
    profile: Profile = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = vi.type.tensor_type.shape.dim
        if not any(d.HasField("dim_param") or not d.HasField("dim_value") for d in dims):
            continue
        mn, opt, mx = [], [], []
        for axis, d in enumerate(dims):
            if d.HasField("dim_value"):
                v = int(d.dim_value)
                mn.append(v), opt.append(v), mx.append(v)
                continue
            if not d.dim_param or d.dim_param not in dim_ranges:
                raise TrtbuildError(f"{onnx_path}: input {vi.name!r} axis {axis} is dynamic "
                                    f"({d.dim_param or 'unnamed'}) and has no min/opt/max range")
            a, b, c = dim_ranges[d.dim_param]
            mn.append(int(a)), opt.append(int(b)), mx.append(int(c))
        profile[vi.name] = (tuple(mn), tuple(opt), tuple(mx))
    return profile


def dim_ranges_for_build(build: BuildConfig) -> dict[str, tuple[int, int, int]]:
    """min/opt/max of the decoder network's symbolic dims from a BuildConfig (trtllm-build limits)."""
    def rng(lo: int, hi: int) -> tuple[int, int, int]:
        hi = max(lo, int(hi))
        return lo, max(lo, (hi + 1) // 2), hi

    max_input = int(build.max_input_len)
    if build.max_num_tokens:
        max_input = min(max_input, int(build.max_num_tokens))
    max_seq = int(build.max_seq_len)
    return {
        "batch_size": rng(1, build.max_batch_size),
        "sequence_length": rng(1, max_input),
        "num_logits": rng(1, max_input),
        "past_sequence_length": rng(0, max_seq - 1),
        "total_sequence_length": rng(1, max_seq),
        "max_sequence_length": (max_seq, max_seq, max_seq),
    }


def build_for_engine_dir(onnx_path: str | os.PathLike, engine_path: str | os.PathLike,
                         config: PretrainedConfig | None, build: BuildConfig, log_verbose: bool = False,
                         progress: bool = False, rank: int = 0) -> dict[str, Any]:
    """The engine-dir step (trtbuild.builder): prepare the network, profile from the limits, build.

    `build.trt_compute_capabilities` (--trt_compute_capabilities, a list of targets) picks the GPUs.
    The ONNX file is rewritten in place into the form TensorRT accepts (prepare_onnx_for_tensorrt),
    so a kept rank{N}.onnx is exactly what TensorRT compiled. Errors name the rank and the recipe.
    `config` None (a hand-made network) names the compute dtype instead of the recipe.
    Returns the build info of build_tensorrt_engine plus "recipe" and "onnx_rewrites".
    """
    recipe = describe_recipe(config, build) if config is not None else build.compute_dtype
    label = f"rank{rank} network ({recipe})"
    dtype = build.compute_dtype
    try:
        rewrites = prepare_onnx_for_tensorrt(onnx_path, dtype)
    except TrtbuildError as e:
        raise TrtbuildError(f"{label}: {e}") from None
    for line in rewrites:
        log.info("prepared for TensorRT: %s", line)
    profile = profile_from_dim_ranges(onnx_path, dim_ranges_for_build(build))
    info = build_tensorrt_engine(onnx_path, engine_path, profile, compute_capabilities=build.trt_compute_capabilities,
                                 fp16=dtype != "float32", log_verbose=log_verbose, progress=progress, label=label)
    info["recipe"] = recipe
    info["onnx_rewrites"] = rewrites
    return info


def build_info_for_config(info: dict[str, Any]) -> dict[str, Any]:
    """What an engine dir's config.json records under built_by.tensorrt.rank{N} (no temporary paths,
    the engine's layer list reduced to counts)."""
    keep = ("package", "version", "recipe", "compute_capabilities", "header", "engine_bytes", "parse_seconds",
            "build_seconds", "strongly_typed", "onnx_rewrites", "inputs", "outputs", "network_layers", "memory")
    out = {k: info[k] for k in keep if k in info}
    for key in ("inputs", "outputs"):  # one entry for the 2 x num_layers KV tensors that share a profile
        merged: dict[tuple, dict[str, Any]] = {}
        for t in out.get(key, []):
            pattern = re.sub(r"\.\d+\.", ".{i}.", t["name"])
            sig = (pattern, t["dtype"], json.dumps(t.get("shape")), json.dumps(t.get("profile"), sort_keys=True))
            if sig in merged:
                merged[sig]["count"] = merged[sig].get("count", 1) + 1
            else:
                merged[sig] = dict(t)
        out[key] = [{**t, "name": re.sub(r"\.\d+\.", ".{i}.", t["name"])} if t.get("count") else t
                    for t in merged.values()]
    layers = info.get("engine_layers") or []
    out["engine_layers"] = len(layers)
    out["engine_layer_types"] = dict(Counter(layer["type"] for layer in layers))
    out["warnings"] = len(info.get("warnings") or [])
    return out
