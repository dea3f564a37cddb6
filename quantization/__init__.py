"""Quantization recipes: RTN, GPTQ, AWQ, SmoothQuant, KV-cache calibration (installed as trtbuild.quantization)."""
