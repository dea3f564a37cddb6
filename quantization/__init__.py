"""Quantization recipes: RTN, GPTQ, AWQ, SmoothQuant, KV-cache calibration (installed as trtbuild.quantization).

Modules: recipe (QuantRecipe and the flags; torch-free), api (quantize_checkpoint, dequantize_linear),
importers (pre-quantized HF checkpoints: PrequantizedSpec, import_gptq_linear, import_awq_linear,
concat_linears), calib_files (reading --calib_dataset; torch-free). Tensor layout: docs/CONTRACTS.md.
Import the module you need: this package imports nothing itself, so the torch-free parts stay so.
"""
