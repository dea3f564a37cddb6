"""trt-build's library side: checkpoint dir → engine dir (config.json + rank{N}.engine)."""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import multiprocessing
import platform
import shutil
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnxruntime

from trtbuild.checkpoint import TOKENIZER_DIR, Mapping, PretrainedConfig, expected_shapes, load_config, rank_file
from trtbuild.ranks import check_mapping, rank_config, rank_place, rank_shapes, split_tensors
from trtbuild.engine import BUILD_ID_KEY, BuildConfig, EngineConfig, save_engine_config
from trtbuild.errors import TrtbuildError
from trtbuild.fsutil import atomic_output_dir, check_output_dir, dir_size, human_bytes
from trtbuild.lora_engine import prepare_lora, wants_lora
from trtbuild.network import build_network
from trtbuild.plugins.quant_gemm import accuracy_level
from trtbuild.resolve import network_options, resolve_build
from trtbuild.tensor_file import read_tensors
from trtbuild.version import __version__

if TYPE_CHECKING:
    from trtbuild.quantization.recipe import QuantRecipe

log = logging.getLogger(__name__)

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


def check_tensors(config: PretrainedConfig, tensors: dict[str, np.ndarray], source: Path,
                  shapes: dict[str, tuple[int, ...]] | None = None) -> None:
    """Every tensor the network reads must be present, with the shape the config implies (or
    `shapes`: a rank's share of them)."""
    quantized = config.quantization.quant_algo is not None
    for name, shape in (shapes if shapes is not None else expected_shapes(config)).items():
        if name not in tensors:
            raise TrtbuildError(f"{source}: tensor {name} is missing; re-run convert_checkpoint.py")
        is_linear_weight = name.endswith(".weight") and (".attention." in name or ".mlp." in name)
        if quantized and is_linear_weight:
            continue  # packed layout, checked by the gemm plugin
        if tuple(tensors[name].shape) != shape:
            raise TrtbuildError(f"{source}: tensor {name} has shape {tuple(tensors[name].shape)}, expected {shape} "
                                f"from its config.json")


def quantize_at_build(config: PretrainedConfig, tensors: dict[str, np.ndarray], recipe: QuantRecipe, ckpt: Path,
                      progress: bool) -> tuple[PretrainedConfig, dict[str, np.ndarray]]:
    """Quantize a floating-point checkpoint's tensors on the way into the network (trt-build flags)."""
    import torch

    from trtbuild.quantization.api import quantize_checkpoint

    weights = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in tensors.items()}
    weights, config = quantize_checkpoint(weights, config, recipe, tokenizer=ckpt / TOKENIZER_DIR, progress=progress)
    return config, {k: v.numpy() for k, v in weights.items()}


def _compile_onnxruntime(onnx_path: Path, engine_path: Path, build: BuildConfig, kernels: bool) -> bool:
    """The engine file of one rank's network; returns whether its W8A8 u8 x u8 form was written too."""
    from trtbuild.backends.onnxruntime_backend import compile_engine
    from trtbuild.cpu_forms import write_u8u8_form

    compile_engine(onnx_path, engine_path, kernels=kernels,
                   matmulnbits_accuracy_level=accuracy_level(build.weight_only_activations))
    return write_u8u8_form(engine_path) is not None


def _remove_onnx(onnx_path: Path) -> None:
    onnx_path.unlink()
    onnx_path.with_name(onnx_path.name + ".data").unlink()


def _rank_engine(rank: int, *, config: PretrainedConfig, ckpt: Path, whole: dict[str, np.ndarray] | None,
                 options, tmp: Path, build: BuildConfig, build_id: str, keep_onnx: bool,
                 progress: bool) -> tuple[bool, np.ndarray | None]:
    """Rank `rank`'s engine of a multi-rank build (its share of `whole`, else its checkpoint file):
    (its u8 x u8 form written, its KV cache scales)."""
    if whole is not None:
        tensors = split_tensors(config, whole, config.mapping, rank)
    else:
        tensors = read_tensors(ckpt / rank_file(rank))
        check_tensors(config, tensors, ckpt / rank_file(rank), rank_shapes(config, rank))
    if options.lora is not None:  # this rank's share of each low-rank product
        options = replace(options, lora=replace(options.lora, config=rank_config(config, rank)))
    onnx_path = tmp / f"rank{rank}.onnx"
    build_network(rank_config(config, rank), tensors, options, onnx_path, progress,
                  metadata={BUILD_ID_KEY: build_id, "trtbuild_rank": str(rank)}, place=rank_place(config, rank))
    u8u8_form = _compile_onnxruntime(onnx_path, tmp / f"rank{rank}.engine", build, kernels=True)
    if not keep_onnx:
        _remove_onnx(onnx_path)
    return u8u8_form, tensors.get("transformer.layers.0.attention.kv_cache_scaling_factor")


def build_engine(checkpoint_dir: str | Path, output_dir: str | Path, build: BuildConfig, force: bool = False,
                 progress: bool = True, keep_onnx: bool = False, recipe: QuantRecipe | None = None,
                 tp_size: int | None = None, pp_size: int | None = None, workers: int = 1) -> BuildSummary:
    """Build an engine dir from a checkpoint dir, atomically; `recipe` quantizes on the way, and
    build.lora_config.lora_dir names the adapters the lora plugin stores. `build` is not changed:
    the engine's config.json records the resolved one (trtbuild.resolve). `tp_size` / `pp_size`
    split a one-rank checkpoint over tensor-parallel ranks and pipeline stages (default: the
    checkpoint's own mapping); `workers` rank engines are built at once."""
    start = time.time()
    if workers < 1:
        raise TrtbuildError(f"--workers {workers} must be at least 1")
    ckpt = Path(checkpoint_dir)
    out = check_output_dir(output_dir, force)
    config = load_config(ckpt)
    split = (tp_size or config.mapping.tp_size, pp_size or config.mapping.pp_size)
    split_here = split != (config.mapping.tp_size, config.mapping.pp_size)
    if split_here:
        if config.mapping.world_size != 1:
            raise TrtbuildError(f"--tp_size {split[0]} --pp_size {split[1]}: {ckpt} is already split over "
                                f"{config.mapping.world_size} ranks; convert the model again with --tp_size / "
                                "--pp_size, or build it as it is")
        config = replace(config, mapping=check_mapping(config, *split))
    quantizes = recipe is not None and not recipe.is_noop
    if quantizes and config.quantization.is_quantized:
        raise TrtbuildError(f"{ckpt} is already quantized ({config.quantization.quant_algo or 'INT8 KV'}); "
                            "pass quantization flags only with a floating-point checkpoint")
    build = resolve_build(config, build, recipe.algo if quantizes else config.quantization.algo)
    ranks = config.mapping.world_size
    if ranks > 1:
        check_mapping(config, config.mapping.tp_size, config.mapping.pp_size, str(ckpt / "config.json"))
        missing = [rank_file(r) for r in range(1 if split_here else ranks) if not (ckpt / rank_file(r)).is_file()]
        if missing:
            raise TrtbuildError(f"{ckpt} is split over {ranks} ranks (its config.json) but lacks {', '.join(missing)}; "
                                "re-run convert_checkpoint.py")
        if quantizes and not split_here:
            raise TrtbuildError(f"{ckpt} is split over {ranks} ranks: quantize with the split (convert_checkpoint.py "
                                "--tp_size with the quantization flags), or build the one-rank checkpoint with "
                                "--tp_size and the quantization flags")
        if build.backend != "onnxruntime":
            raise TrtbuildError(f"{ckpt} is split over {ranks} ranks: multi-rank engines are built for the "
                                "onnxruntime backend (--backend onnxruntime)")
    if build.backend == "tensorrt":  # TensorRT missing, bad targets, a recipe it cannot compile: before any work
        from trtbuild.backends.tensorrt import check_tensorrt_build

        check_tensorrt_build(config, build, recipe)
    tensorrt_builds: dict[str, dict] = {}
    build_id = uuid.uuid4().hex  # in config.json and in every rank's engine: ranks of one build run together
    kv_scales = None
    u8u8_form = False
    with atomic_output_dir(out) as tmp:
        lora_options = None
        if wants_lora(build):
            build, lora_options = prepare_lora(config, build, tmp)
        options = replace(network_options(build), lora=lora_options)
        whole = read_tensors(ckpt / rank_file(0)) if split_here else None
        if whole is not None:  # quantized whole (calibrated on the whole model), then split with its scales
            check_tensors(config, whole, ckpt / rank_file(0))
            if quantizes:
                whole_config, whole = quantize_at_build(replace(config, mapping=Mapping()), whole, recipe, ckpt,
                                                        progress)
                config = replace(whole_config, mapping=check_mapping(whole_config, *split))
        if ranks > 1:  # every rank alike (onnxruntime): `workers` at once
            make = functools.partial(_rank_engine, config=config, ckpt=ckpt, whole=whole, options=options, tmp=tmp,
                                     build=build, build_id=build_id, keep_onnx=keep_onnx,
                                     progress=progress and workers == 1)
            if workers > 1:  # forked: the workers share the whole checkpoint's pages
                context = multiprocessing.get_context("fork")
                with concurrent.futures.ProcessPoolExecutor(min(workers, ranks), mp_context=context) as pool:
                    results = list(pool.map(make, range(ranks)))
            else:
                results = [make(rank) for rank in range(ranks)]
            u8u8_form, kv_scales = results[0]
        else:
            tensors = read_tensors(ckpt / rank_file(0))
            check_tensors(config, tensors, ckpt / rank_file(0))
            if quantizes:
                config, tensors = quantize_at_build(config, tensors, recipe, ckpt, progress)
            onnx_path, engine_path = tmp / "rank0.onnx", tmp / "rank0.engine"
            build_network(config, tensors, options, onnx_path, progress, metadata={BUILD_ID_KEY: build_id})
            if build.backend == "onnxruntime":
                u8u8_form = _compile_onnxruntime(onnx_path, engine_path, build, kernels=build.plugin_config.uses_kernels)
                kv_scales = tensors.get("transformer.layers.0.attention.kv_cache_scaling_factor")
            else:
                from trtbuild.backends.tensorrt import build_for_engine_dir, build_info_for_config, layers_report

                verbose = log.isEnabledFor(logging.DEBUG)
                info = build_for_engine_dir(onnx_path, engine_path, config, build, log_verbose=verbose,
                                            progress=progress, rank=0)
                tensorrt_builds["rank0"] = build_info_for_config(info)
                if verbose:  # `polygraphy inspect model` on the engine (needs a GPU) + the builder's layer list
                    log.debug("%s", layers_report(engine_path, info))
            if not keep_onnx:
                _remove_onnx(onnx_path)
        if build.backend == "onnxruntime":
            from trtbuild.cpu_forms import write_probes

            build = replace(build, u8u8_form=u8u8_form)
            write_probes(tmp, rank_config(config, 0), build.max_seq_len, build.plugin_config.context_fmha, u8u8_form, kv_scales)
        if (ckpt / TOKENIZER_DIR).is_dir():
            shutil.copytree(ckpt / TOKENIZER_DIR, tmp / TOKENIZER_DIR)
        built_by = {"trtbuild": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                    "python": platform.python_version(), "checkpoint_dir": str(ckpt.resolve()), "build_id": build_id}
        if tensorrt_builds:
            built_by["tensorrt"] = tensorrt_builds
        save_engine_config(EngineConfig(pretrained_config=config, build_config=build, built_by=built_by), tmp)
    return BuildSummary(out, config.architecture, config.num_hidden_layers, build.compute_dtype,
                        config.quantization.quant_algo, dir_size(out), time.time() - start)
