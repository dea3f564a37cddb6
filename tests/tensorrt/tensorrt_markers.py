"""What the TensorRT tests need, found once: the TensorRT package, polygraphy, a GPU."""

from __future__ import annotations

import importlib.util

import pytest

from trtbuild.backends import tensorrt as tb

trt, PACKAGE = tb.tensorrt_available()
HAVE_POLYGRAPHY = importlib.util.find_spec("polygraphy") is not None
GPU, GPU_WHY = tb.can_run_tensorrt()

needs_trt = pytest.mark.skipif(trt is None, reason="TensorRT not installed (pip install tensorrt_rtx==1.7.1.116)")
needs_polygraphy = pytest.mark.skipif(not HAVE_POLYGRAPHY, reason="polygraphy not installed (pip install polygraphy)")
no_gpu_only = pytest.mark.skipif(GPU, reason="this machine has a GPU")
