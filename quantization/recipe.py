"""What to quantize and how: QuantRecipe, the quantization flags, and their validation (torch-free).

Recipes (TensorRT-LLM flags → quant_algo, trtbuild.quant_algo):
  --use_weight_only --weight_only_precision int8|int4   RTN          W8A16 | W4A16
                                            int4_gptq    GPTQ         W4A16_GPTQ   (calibrated)
                                            int4_awq     AWQ          W4A16_AWQ    (calibrated)
     [--per_group --group_size 32|64|128] [--has_zero_point] [--gptq_act_order] [--calib_plain_gram]
     [--awq_linear_objective]
  --smoothquant α [--per_channel] [--per_token]         SmoothQuant  W8A8_SQ_*_PLUGIN (calibrated)
  --int8_kv_cache                                       kv_cache_quant_algo INT8 (calibrated)

Running a recipe (quantization.api.quantize_checkpoint) needs torch; reading the flags does not,
so trt-build on a checkpoint that needs no quantizing never imports it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from trtbuild.checkpoint import QuantConfig
from trtbuild.errors import TrtbuildError
from trtbuild.quant_algo import QuantAlgo, smoothquant_algo, weight_only_algo

from .calib_files import check_calib_path

# --weight_only_precision → (bits, method)
WEIGHT_ONLY_PRECISIONS = {"int8": (8, "rtn"), "int4": (4, "rtn"), "int4_gptq": (4, "gptq"), "int4_awq": (4, "awq")}
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
    def algo(self) -> QuantAlgo | None:
        """The quant_algo the recipe's linears end in (None: weights stay floating point)."""
        if self.use_weight_only:
            return weight_only_algo(*WEIGHT_ONLY_PRECISIONS[self.weight_only_precision])
        if self.smoothquant is not None:
            return smoothquant_algo(self.per_channel, self.per_token)
        return None

    @property
    def quant_algo(self) -> str | None:
        """TensorRT-LLM's name of `algo`."""
        return self.algo.name if self.algo else None

    @property
    def method(self) -> str | None:
        """rtn | gptq | awq | smoothquant | None (weights stay floating point)."""
        return self.algo.method if self.algo else None

    @property
    def bits(self) -> int:
        return WEIGHT_ONLY_PRECISIONS[self.weight_only_precision][0]

    @property
    def effective_group_size(self) -> int:
        return self.group_size if self.per_group else -1

    @property
    def needs_calibration(self) -> bool:
        return self.method in ("gptq", "awq", "smoothquant") or self.int8_kv_cache

    @property
    def is_noop(self) -> bool:
        return self.algo is None and not self.int8_kv_cache

    def quant_config(self, pre_quant_scale: bool = False) -> QuantConfig:
        """The checkpoint's quantization block once this recipe has run."""
        weight_only = self.use_weight_only
        return QuantConfig.for_algo(self.algo, group_size=self.effective_group_size if weight_only else -1,
                                    has_zero_point=weight_only and self.has_zero_point,
                                    pre_quant_scale=pre_quant_scale,
                                    smoothquant_val=None if self.smoothquant is None else float(self.smoothquant),
                                    int8_kv_cache=self.int8_kv_cache)

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
