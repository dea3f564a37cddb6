"""Quantization recipes: RTN, GPTQ, AWQ, SmoothQuant, KV-cache calibration (installed as trtbuild.quantization).

Entry points (see api.py): QuantRecipe, quantize_checkpoint, add_quant_args, recipe_from_args,
dequantize_linear; pre-quantized HF checkpoints: importers.PrequantizedSpec, import_gptq_linear,
import_awq_linear, concat_linears. Tensor layout: docs/CONTRACTS.md.
"""

from .api import QuantRecipe, add_quant_args, dequantize_linear, quantize_checkpoint, recipe_from_args
from .importers import PrequantizedSpec, concat_linears, import_awq_linear, import_gptq_linear

__all__ = ["QuantRecipe", "add_quant_args", "dequantize_linear", "quantize_checkpoint", "recipe_from_args",
           "PrequantizedSpec", "concat_linears", "import_awq_linear", "import_gptq_linear"]
