"""quantize_checkpoint: one entry point for every recipe, shared by convert_checkpoint.py and trt-build.

    recipe = recipe_from_args(args)          # after add_quant_args(parser)
    tensors, config = quantize_checkpoint(weights, config, recipe, calib_texts=path_or_list, tokenizer=tok)

Recipes (TensorRT-LLM flags → quant_algo):
  --use_weight_only --weight_only_precision int8|int4   RTN          W8A16 | W4A16
                                            int4_gptq    GPTQ         W4A16_GPTQ   (calibrated)
                                            int4_awq     AWQ          W4A16_AWQ    (calibrated)
     [--per_group --group_size 32|64|128] [--has_zero_point] [--gptq_act_order] [--calib_plain_gram]
     [--awq_linear_objective]
  --smoothquant α [--per_channel] [--per_token]         SmoothQuant  W8A8_SQ_*_PLUGIN (calibrated)
  --int8_kv_cache                                       kv_cache_quant_algo INT8 (calibrated)
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from trtbuild.checkpoint import PretrainedConfig, QuantConfig, linear_names
from trtbuild.models.base import input_groups, linear_spec
from trtbuild.errors import TrtbuildError

from .awq import awq_quantize, awq_search_scales
from .calibration import LayerwiseCalibrator, calib_samples_for, check_calib_path
from .gptq import gptq_quantize
from .layout import check_group_size, dequantize_linear, quantize_rtn, to_weight_only_tensors
from .reference_model import ReferenceModel
from .smoothquant import kv_cache_scales, smooth_scales, sq_linear

__all__ = ["QuantRecipe", "quantize_checkpoint", "add_quant_args", "recipe_from_args", "dequantize_linear"]

log = logging.getLogger("trtbuild.quantization")

WEIGHT_ONLY_PRECISIONS = {"int8": ("W8A16", 8), "int4": ("W4A16", 4), "int4_gptq": ("W4A16_GPTQ", 4),
                          "int4_awq": ("W4A16_AWQ", 4)}
GROUP_SIZES = (16, 32, 64, 128, 256)
DEFAULT_CALIB_SIZE = 64
DEFAULT_CALIB_MAX_SEQ_LENGTH = 512


@dataclass
class QuantRecipe:
    """What to quantize and how, with TensorRT-LLM's flag names."""

    use_weight_only: bool = False
    weight_only_precision: str = "int8"
    per_group: bool = False
    group_size: int = 128
    has_zero_point: bool = False
    smoothquant: Optional[float] = None
    per_channel: bool = False
    per_token: bool = False
    int8_kv_cache: bool = False
    calib_dataset: Optional[str] = None  # used when quantize_checkpoint gets no calib_texts
    calib_size: int = DEFAULT_CALIB_SIZE
    calib_max_seq_length: int = DEFAULT_CALIB_MAX_SEQ_LENGTH
    gptq_act_order: bool = False
    gptq_percdamp: float = 0.01
    gptq_block_size: int = 128
    awq_grid: int = 20
    awq_clip: bool = True
    awq_block_loss: bool = True  # qkv / fc+gate scales judged on the attention / MLP output (AutoAWQ)
    calib_token_norm: bool = True  # GPTQ/AWQ objective over RMS-normalized tokens (calibration.InputStats)

    # -- what it means --------------------------------------------------------------------------
    @property
    def method(self) -> Optional[str]:
        """rtn | gptq | awq | smoothquant | None (weights stay floating point)."""
        if self.use_weight_only:
            return {"int4_gptq": "gptq", "int4_awq": "awq"}.get(self.weight_only_precision, "rtn")
        if self.smoothquant is not None:
            return "smoothquant"
        return None

    @property
    def bits(self) -> int:
        return WEIGHT_ONLY_PRECISIONS[self.weight_only_precision][1]

    @property
    def effective_group_size(self) -> int:
        return self.group_size if self.per_group else -1

    @property
    def needs_calibration(self) -> bool:
        return self.method in ("gptq", "awq", "smoothquant") or self.int8_kv_cache

    @property
    def is_noop(self) -> bool:
        return self.method is None and not self.int8_kv_cache

    @property
    def quant_algo(self) -> Optional[str]:
        m = self.method
        if m is None:
            return None
        if m == "smoothquant":
            return ("W8A8_SQ_PER_CHANNEL" if self.per_channel else "W8A8_SQ_PER_TENSOR") + \
                   ("_PER_TOKEN_PLUGIN" if self.per_token else ("_PER_TENSOR_PLUGIN" if self.per_channel else "_PLUGIN"))
        return WEIGHT_ONLY_PRECISIONS[self.weight_only_precision][0]

    def describe(self) -> str:
        parts = []
        if self.method:
            parts.append(self.quant_algo)
            if self.use_weight_only:
                parts.append(f"group {self.group_size}" if self.per_group else "per-channel")
                parts.append("asymmetric" if self.has_zero_point else "symmetric")
            else:
                parts.append(f"alpha {self.smoothquant}")
        if self.int8_kv_cache:
            parts.append("INT8 KV cache")
        return ", ".join(parts) or "none"

    def validate(self, require_calibration: bool = False) -> None:
        """TrtbuildError naming the flag for any inconsistent choice.

        require_calibration: also check that a recipe needing calibration has a --calib_dataset file
        (what a command line checks before doing any work)."""
        if self.weight_only_precision not in WEIGHT_ONLY_PRECISIONS:
            raise TrtbuildError(f"--weight_only_precision {self.weight_only_precision!r} is not one of "
                                f"{', '.join(WEIGHT_ONLY_PRECISIONS)}")
        if self.use_weight_only and self.smoothquant is not None:
            raise TrtbuildError("--use_weight_only and --smoothquant cannot be combined: choose one")
        if self.smoothquant is not None:
            a = self.smoothquant
            if not isinstance(a, (int, float)) or math.isnan(a) or not 0.0 <= a <= 1.0:
                raise TrtbuildError(f"--smoothquant {a}: alpha must be in [0, 1] (0.5 is usual)")
        elif self.per_channel or self.per_token:
            raise TrtbuildError("--per_channel / --per_token apply to SmoothQuant: add --smoothquant ALPHA")
        if self.per_group and not self.use_weight_only:
            raise TrtbuildError("--per_group applies to weight-only quantization: add --use_weight_only")
        if self.has_zero_point and not self.use_weight_only:
            raise TrtbuildError("--has_zero_point applies to weight-only quantization: add --use_weight_only")
        if self.gptq_act_order and self.method != "gptq":
            raise TrtbuildError("--gptq_act_order applies to --weight_only_precision int4_gptq")
        if not self.awq_block_loss and self.method != "awq":
            raise TrtbuildError("--awq_linear_objective applies to --weight_only_precision int4_awq")
        if not self.calib_token_norm and self.method not in ("gptq", "awq"):
            raise TrtbuildError("--calib_plain_gram applies to --weight_only_precision int4_gptq or int4_awq")
        if self.per_group and self.group_size not in GROUP_SIZES:
            raise TrtbuildError(f"--group_size {self.group_size} is not one of {', '.join(map(str, GROUP_SIZES))}")
        if self.calib_size < 1:
            raise TrtbuildError(f"--calib_size {self.calib_size}: must be at least 1")
        if self.calib_max_seq_length < 2:
            raise TrtbuildError(f"--calib_max_seq_length {self.calib_max_seq_length}: must be at least 2")
        if not 0.0 < self.gptq_percdamp < 1.0:
            raise TrtbuildError(f"GPTQ percdamp {self.gptq_percdamp}: must be in (0, 1)")
        if require_calibration and self.needs_calibration:
            if self.calib_dataset is None:
                raise TrtbuildError(f"{self.calibration_flag} needs calibration text: pass --calib_dataset PATH "
                                    "(a local .txt/.json/.jsonl/.parquet file, e.g. ../shared/data/ppl.txt)")
            check_calib_path(self.calib_dataset)

    @property
    def calibration_flag(self) -> str:
        """The flag that asked for calibration (for messages)."""
        if self.method in ("gptq", "awq"):
            return f"--weight_only_precision {self.weight_only_precision}"
        return "--smoothquant" if self.method == "smoothquant" else "--int8_kv_cache"


def add_quant_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The quantization flags of convert_checkpoint.py / trt-build (TensorRT-LLM's names)."""
    g = parser.add_argument_group("quantization")
    g.add_argument("--use_weight_only", action="store_true",
                   help="quantize linear weights only (int8 or int4; the activations they meet: trt-build "
                        "--weight_only_activations)")
    g.add_argument("--weight_only_precision", default="int8",
                   help="int8 | int4 (round-to-nearest), int4_gptq (GPTQ), int4_awq (AWQ); default int8")
    g.add_argument("--per_group", action="store_true", help="one scale per --group_size inputs instead of per channel")
    g.add_argument("--group_size", type=int, default=128,
                   help=f"inputs per scale with --per_group: {', '.join(map(str, GROUP_SIZES[:-1]))} or "
                        f"{GROUP_SIZES[-1]} (default 128), at most a linear's input size; where it does not divide "
                        "that size the last group is partial (onnxruntime backend; tensorrt refuses it)")
    g.add_argument("--has_zero_point", action="store_true", help="asymmetric weight-only quantization (zero points)")
    g.add_argument("--gptq_act_order", action="store_true", help="GPTQ: quantize columns by decreasing activation energy")
    g.add_argument("--awq_linear_objective", dest="awq_block_loss", action="store_false", default=True,
                   help="AWQ: judge scales by each linear's own output error only (2-3x faster calibration) "
                        "instead of by the attention's and the MLP's output, as AutoAWQ does")
    g.add_argument("--calib_plain_gram", dest="calib_token_norm", action="store_false", default=True,
                   help="GPTQ/AWQ: weigh calibration tokens by their input norm (upstream's plain X Xᵀ) "
                        "instead of by relative error, which keeps attention-sink tokens from dominating")
    g.add_argument("--smoothquant", "-sq", type=float, default=None, metavar="ALPHA",
                   help="SmoothQuant W8A8 with migration strength ALPHA in [0, 1] (0.5 is usual)")
    g.add_argument("--per_channel", action="store_true", help="SmoothQuant: one weight scale per output channel")
    g.add_argument("--per_token", action="store_true", help="SmoothQuant: dynamic per-token activation scales")
    g.add_argument("--int8_kv_cache", action="store_true", help="store the KV cache in int8 with calibrated scales")
    g.add_argument("--calib_dataset", default=None, metavar="PATH",
                   help="local calibration text: .txt, .json, .jsonl (a 'text' field) or .parquet")
    g.add_argument("--calib_size", type=int, default=DEFAULT_CALIB_SIZE,
                   help=f"number of calibration samples (default {DEFAULT_CALIB_SIZE})")
    g.add_argument("--calib_max_seq_length", type=int, default=DEFAULT_CALIB_MAX_SEQ_LENGTH,
                   help=f"tokens per calibration sample (default {DEFAULT_CALIB_MAX_SEQ_LENGTH})")
    return parser


def recipe_from_args(args: argparse.Namespace) -> QuantRecipe:
    """QuantRecipe from parsed add_quant_args flags (missing attributes take their defaults); validated,
    including that --calib_dataset names an existing file of a known format when the recipe needs one."""
    names = {f.name for f in dataclasses.fields(QuantRecipe)}
    recipe = QuantRecipe(**{k: v for k, v in vars(args).items() if k in names and (v is not None or k == "smoothquant")})
    recipe.validate(require_calibration=True)
    return recipe


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

    per_group = bool(recipe.use_weight_only and recipe.per_group)
    qc = QuantConfig(quant_algo=recipe.quant_algo, kv_cache_quant_algo="INT8" if recipe.int8_kv_cache else None,
                     group_size=recipe.group_size if per_group else -1,
                     has_zero_point=bool(recipe.use_weight_only and hz), pre_quant_scale=pre_quant,
                     exclude_modules=["lm_head"] if recipe.quant_algo else None,
                     smoothquant_val=float(recipe.smoothquant) if method == "smoothquant" else None,
                     per_group=per_group)
    return out, dataclasses.replace(config, quantization=qc)
