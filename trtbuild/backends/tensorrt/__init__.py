"""TensorRT backend: compile the standard-op ONNX network into a serialized TensorRT engine.

probe (finding tensorrt / tensorrt_rtx, a GPU), logs (TensorRT's log, progress, Ctrl-C), errors
(one-line parser/build messages), onnx_rewrite (the ONNX form TensorRT accepts), recipe (which
quantization recipes it compiles), compile (build_tensorrt_engine), engine_dir (the trt-build step),
engine_info (engine header and layers). Running an engine: trtbuild.runtime.tensorrt_session.
What TensorRT-RTX accepts and rejects, measured: docs/TENSORRT.md.
"""

from trtbuild.backends.tensorrt.compile import build_tensorrt_engine
from trtbuild.backends.tensorrt.engine_dir import (build_for_engine_dir, build_info_for_config, dim_ranges_for_build,
                                                   profile_from_dim_ranges)
from trtbuild.backends.tensorrt.engine_info import engine_header_info, layers_report, polygraphy_inspect_engine
from trtbuild.backends.tensorrt.onnx_rewrite import prepare_onnx_for_tensorrt
from trtbuild.backends.tensorrt.probe import (INSTALL_HINT, RTX_TARGETS, can_run_tensorrt,
                                              normalize_compute_capabilities, tensorrt_available)
from trtbuild.backends.tensorrt.recipe import check_tensorrt_build, check_tensorrt_recipe, describe_recipe

__all__ = [
    "tensorrt_available", "can_run_tensorrt", "normalize_compute_capabilities", "RTX_TARGETS", "INSTALL_HINT",
    "build_tensorrt_engine", "engine_header_info", "layers_report", "polygraphy_inspect_engine",
    "profile_from_dim_ranges", "dim_ranges_for_build", "build_for_engine_dir", "build_info_for_config",
    "prepare_onnx_for_tensorrt", "describe_recipe", "check_tensorrt_recipe", "check_tensorrt_build",
]
