"""quantize_checkpoint: one entry point for every recipe, shared by convert_checkpoint.py and trt-build.

    recipe = recipe_from_args(args)          # after add_quant_args(parser)
    tensors, config = quantize_checkpoint(weights, config, recipe, calib_texts=path_or_list, tokenizer=tok)

The recipes and their flags: quantization.recipe (torch-free).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Optional

import torch

from trtbuild.checkpoint import PretrainedConfig, linear_names
from trtbuild.models.base import input_groups, linear_spec
from trtbuild.errors import TrtbuildError

from .awq import awq_quantize, awq_search_scales
from .calibration import LayerwiseCalibrator, calib_samples_for
from .gptq import gptq_quantize
from .layout import check_group_size, dequantize_linear, quantize_rtn, to_weight_only_tensors
from .recipe import QuantRecipe, add_quant_args, recipe_from_args
from .reference_model import ReferenceModel
from .smoothquant import kv_cache_scales, smooth_scales, sq_linear

__all__ = ["QuantRecipe", "quantize_checkpoint", "add_quant_args", "recipe_from_args", "dequantize_linear"]

log = logging.getLogger("trtbuild.quantization")


# -- the work ------------------------------------------------------------------------------------
def _prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in tensors.items()}


def _in_features(config: PretrainedConfig, name: str) -> int:
    return linear_spec(config, name).in_features


def _check_inputs(weights: dict[str, torch.Tensor], config: PretrainedConfig, recipe: QuantRecipe) -> None:
    if config.quantization.quant_algo or config.quantization.kv_cache_quant_algo:
        raise TrtbuildError(f"the checkpoint is already quantized ({config.quantization.quant_algo or ''} "
                            f"{config.quantization.kv_cache_quant_algo or ''}): quantize a floating-point checkpoint")
    if config.mapping.world_size != 1:
        raise TrtbuildError("quantize the single-rank checkpoint, then split it with --tp_size")
    for name in linear_names(config):
        w = weights.get(name + ".weight")
        if w is None:
            raise TrtbuildError(f"checkpoint tensor {name}.weight is missing")
        if not w.is_floating_point():
            raise TrtbuildError(f"{name}.weight is {w.dtype}, not floating point: the checkpoint is already quantized")
        if w.dim() != 2 or w.shape[1] != _in_features(config, name):
            raise TrtbuildError(f"{name}.weight has shape {tuple(w.shape)}, the config says {_in_features(config, name)} inputs")
        if recipe.use_weight_only and recipe.per_group:
            check_group_size(recipe.group_size, w.shape[1], name + ".weight")


def _fold_into(out: dict, work: dict, name: str, inv_s: torch.Tensor, rows: Optional[slice] = None,
               suffixes: tuple[str, ...] = (".weight", ".bias")) -> None:
    """Multiply tensor `name` (a norm weight/bias, or rows of a linear weight/bias) by inv_s, in both dicts."""
    for suffix in suffixes:
        key = name + suffix
        if key not in work:
            continue
        t = work[key].float().clone()
        if rows is None:
            t = t * inv_s
        elif t.dim() == 2:
            t[rows] = t[rows] * inv_s.reshape(-1, 1)
        else:
            t[rows] = t[rows] * inv_s
        work[key] = t
        out[key] = t.to(out[key].dtype) if key in out else t


AWQ_BLOCK_GROUPS = ("qkv", "fc")  # input groups whose AWQ scales are searched on their block's output


def _awq_block_error(model: ReferenceModel, work: dict, layer: int, group: list[str], x: Optional[torch.Tensor],
                     token_norm: bool) -> Optional[Callable[[list[torch.Tensor]], float]]:
    """For qkv (the attention) and fc+gate (the MLP): a candidate's squared error of the block's
    output on the kept calibration inputs x, the block's other linears staying float; with
    token_norm each token's error is relative to its input's mean square, as in the Gram matrix.
    None for the other groups, whose block is the linear itself (the Gram error is exact there)."""
    kind = group[0].rsplit(".", 1)[-1]
    if x is None or kind not in AWQ_BLOCK_GROUPS:
        return None
    forward = model.attention if kind == "qkv" else model.mlp
    reference = forward(layer, x)
    weight = 1.0 / x.pow(2).mean(dim=-1, keepdim=True).clamp(min=1e-12) if token_norm else torch.ones(())

    def error(weights: list[torch.Tensor]) -> float:
        saved = {n: work[n + ".weight"] for n in group}
        work.update({n + ".weight": w for n, w in zip(group, weights)})
        try:
            return float(((forward(layer, x) - reference).pow(2) * weight).sum())
        finally:
            work.update({n + ".weight": w for n, w in saved.items()})

    return error


def quantize_checkpoint(weights: dict[str, torch.Tensor], config: PretrainedConfig, recipe: QuantRecipe,
                        calib_texts=None, tokenizer=None, progress: bool = True,
                        ) -> tuple[dict[str, torch.Tensor], PretrainedConfig]:
    """Quantize a floating-point checkpoint's tensors; returns (new tensors, new config).

    calib_texts: a list of documents or a path (--calib_dataset); tokenizer: a tokenizers.Tokenizer
    or a path to tokenizer.json / its dir. `weights` is not modified.
    """
    from tqdm.auto import tqdm

    recipe.validate()
    _check_inputs(weights, config, recipe)
    if recipe.is_noop:
        return dict(weights), config
    method = recipe.method
    samples = None
    if recipe.needs_calibration:
        if calib_texts is None:
            calib_texts = recipe.calib_dataset
        samples = calib_samples_for(config, calib_texts, tokenizer, recipe.calib_size,
                                    recipe.calib_max_seq_length, recipe.calibration_flag)
        log.info("calibrating on %d samples of %d tokens", samples.shape[0], samples.shape[1])

    out = dict(weights)
    work = dict(weights)  # float tensors the reference model runs on (folded / dequantized as we go)
    model = ReferenceModel(work, config, simulate_quant=False)
    gs = recipe.effective_group_size
    hz = recipe.has_zero_point
    pre_quant = False
    layer_prefix = "transformer.layers.{}."

    def put_weight_only(name: str, qw) -> None:
        del out[name + ".weight"]
        out.update(_prefixed(name, to_weight_only_tensors(qw, hz)))

    def put_kv(i: int, st) -> None:
        if recipe.int8_kv_cache:
            out[layer_prefix.format(i) + "attention.kv_cache_scaling_factor"] = kv_cache_scales(st.k_amax, st.v_amax)

    if method == "gptq":
        cal = LayerwiseCalibrator(model, samples, gram=True, kv=recipe.int8_kv_cache, sequential=True,
                                  progress=progress, desc="GPTQ", token_norm=recipe.calib_token_norm)
        for i, st in cal.layers():
            for group in input_groups(config, i):
                H = st.inputs[group[0]].hessian()
                for name in group:
                    qw = gptq_quantize(work[name + ".weight"], H, recipe.bits, gs, hz, act_order=recipe.gptq_act_order,
                                       percdamp=recipe.gptq_percdamp, block_size=recipe.gptq_block_size,
                                       name=name + ".weight")
                    put_weight_only(name, qw)
                    work[name + ".weight"] = qw.dequantize()  # later layers calibrate on the quantized ones
            put_kv(i, st)
    elif method == "awq":
        cal = LayerwiseCalibrator(model, samples, gram=True, kv=recipe.int8_kv_cache, progress=progress, desc="AWQ",
                                  token_norm=recipe.calib_token_norm, keep_sample=AWQ_BLOCK_GROUPS if recipe.awq_block_loss else ())
        c = config
        for i, st in cal.layers():
            p = layer_prefix.format(i)
            scaled = []
            for group in input_groups(config, i):
                stats = st.inputs[group[0]]
                block = (_awq_block_error(model, work, i, group, stats.sample, recipe.calib_token_norm)
                         if recipe.awq_block_loss else None)
                s = awq_search_scales([work[n + ".weight"] for n in group], stats.gram, stats.abs_mean,
                                      recipe.bits, gs, hz, n_grid=recipe.awq_grid, block_error=block)
                stats.sample = None
                inv = 1.0 / s
                fold = linear_spec(c, group[0]).fold
                if fold is not None and fold.kind == "norm":
                    _fold_into(out, work, p + fold.target, inv)
                elif fold is not None and fold.kind == "rows":  # the V rows of qkv feed dense
                    _fold_into(out, work, p + fold.target, inv, slice(c.q_dim + c.kv_dim, None))
                    if st.v_amax is not None:
                        st.v_amax = st.v_amax * inv
                elif fold is not None and fold.kind == "linear":
                    _fold_into(out, work, p + fold.target, inv, slice(None))
                else:
                    for n in group:
                        out[n + ".prequant_scaling_factor"] = inv.float()
                        work[n + ".prequant_scaling_factor"] = inv.float()
                    pre_quant = True
                scaled.append((group, s, stats.gram))
            for group, s, gram in scaled:  # quantize after all folds (dense's fold touches qkv's v rows)
                for name in group:
                    w = work[name + ".weight"].float()
                    qw = awq_quantize(w, s, gram, recipe.bits, gs, hz, clip=recipe.awq_clip, name=name + ".weight")
                    put_weight_only(name, qw)
                    work[name + ".weight"] = qw.dequantize()  # acts on x / s (folded or prequant)
            put_kv(i, st)
    elif method == "smoothquant":
        cal = LayerwiseCalibrator(model, samples, kv=recipe.int8_kv_cache, progress=progress, desc="SmoothQuant")
        for i, st in cal.layers():
            p = layer_prefix.format(i)
            for group in input_groups(config, i):
                amax = st.inputs[group[0]].abs_max
                s = smooth_scales(amax, [work[n + ".weight"] for n in group], recipe.smoothquant)
                spec_fold = linear_spec(config, group[0]).fold
                fold = None
                if spec_fold is not None and spec_fold.kind == "norm":
                    fold = p + spec_fold.target
                    _fold_into(out, work, fold, 1.0 / s)
                elif spec_fold is not None and spec_fold.kind == "linear" and recipe.per_channel:
                    # proj's input is act(fc) * gate: 1/s scales the rows of gate's (already int8)
                    # weight exactly through its per-channel scales, instead of a Mul in the graph
                    gate = p + spec_fold.target
                    out[gate + ".per_channel_scale"] = out[gate + ".per_channel_scale"] / s
                    work[gate + ".weight"] = work[gate + ".weight"] / s.reshape(-1, 1)
                    _fold_into(out, work, gate, 1.0 / s, suffixes=(".bias",))  # the weight is int8 already
                    fold = gate
                else:
                    pre_quant = True
                for name in group:
                    t = sq_linear(work[name + ".weight"], s, amax, recipe.per_channel, keep_prequant=fold is None)
                    del out[name + ".weight"]
                    out.update(_prefixed(name, t))
                    work[name + ".weight"] = t["weight"].float() * t["per_channel_scale"].reshape(-1, 1)
                    if fold is None:
                        work[name + ".prequant_scaling_factor"] = t["prequant_scaling_factor"]
            put_kv(i, st)
    else:
        if recipe.int8_kv_cache:
            cal = LayerwiseCalibrator(model, samples, kv=True, progress=progress, desc="INT8 KV cache")
            for i, st in cal.layers():
                put_kv(i, st)
        if method == "rtn":
            for name in tqdm(linear_names(config), desc=f"{recipe.quant_algo} RTN", unit="linear",
                             disable=not progress):
                put_weight_only(name, quantize_rtn(weights[name + ".weight"], recipe.bits, gs, hz, name + ".weight"))

    return out, dataclasses.replace(config, quantization=recipe.quant_config(pre_quant_scale=pre_quant))
