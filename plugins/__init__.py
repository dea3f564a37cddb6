"""Plugins: fused ops with a standard-ONNX decomposition and a fused lowering (installed as trtbuild.plugins)."""
