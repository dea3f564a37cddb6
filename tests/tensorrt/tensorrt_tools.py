"""Test-only TensorRT helpers: numeric checks of a standard-op network with polygraphy's onnxrt runner.

Without a GPU an engine cannot run, so the tests check the network TensorRT compiles instead:
`polygraphy run --onnxrt` on the same inputs, compared with a reference. polygraphy passes an
element when abs diff <= atol OR rel diff <= rtol (relative to the loaded reference), unlike
numpy.allclose; with one output on each side it pairs them whatever their names (so
polygraphy_compare checks names first). One `polygraphy run --onnxrt`: ~1.5 s.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from trtbuild.backends.tensorrt.engine_info import polygraphy_env, polygraphy_exe
from trtbuild.backends.tensorrt.onnx_rewrite import onnx_structure
from trtbuild.errors import TrtbuildError

_SUMMARY_RE = re.compile(r"(PASSED|FAILED|Minimum Required Tolerance|Absolute Difference \| Stats|"
                         r"Relative Difference \| Stats|Difference exceeds|Accuracy Summary|\[!\]|\[E\])")


def polygraphy_compare(onnx_path: str | os.PathLike, inputs: dict[str, np.ndarray],
                       reference_outputs: dict[str, np.ndarray], rtol: float = 1e-3,
                       atol: float = 1e-3, timeout: float = 600,
                       save_dir: str | os.PathLike | None = None,
                       graph_optimization_level: str = "ORT_DISABLE_ALL") -> tuple[bool, str]:
    """Run `polygraphy run ONNX --onnxrt` on `inputs` and compare with `reference_outputs`.

    The reference is saved as a polygraphy RunResults (--load-outputs) and the inputs as a feed
    dict (--load-inputs). polygraphy passes an element when |diff| <= atol OR |diff|/|ref| <= rtol.
    With `save_dir`, inputs.json, reference.json and polygraphy's outputs.json (RunResults.load)
    are kept there; otherwise in a temporary dir. onnxruntime's graph optimizations are off by
    default so that the graph runs as written: ORT_ENABLE_ALL would fuse DequantizeLinear -> MatMul
    into MatMulNBits, which quantizes activations to int8 (measured on SmolLM2 int4: logits 3.0 off
    instead of 0.5), i.e. check onnxruntime's rewrite instead of what TensorRT compiles.
    Returns (passed, summary of polygraphy's verdict lines).
    """
    try:
        from polygraphy.comparator import RunResults
        from polygraphy.comparator.struct import IterationResult
        from polygraphy.json import save_json
    except ImportError as e:
        raise TrtbuildError("polygraphy is not installed: pip install polygraphy") from e
    from polygraphy.logger import G_LOGGER

    exe = polygraphy_exe()
    # polygraphy matches a lone output with a lone reference whatever their names: check names here.
    graph = onnx_structure(Path(onnx_path)).graph
    outputs = [o.name for o in graph.output]
    unknown = [k for k in reference_outputs if k not in outputs]
    if unknown or not reference_outputs:
        return False, (f"reference outputs {unknown or '(none)'} are not outputs of {onnx_path} "
                       f"(outputs: {', '.join(outputs)})")
    if save_dir is not None:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
    workdir = contextlib.nullcontext(str(save_dir)) if save_dir is not None else \
        tempfile.TemporaryDirectory(prefix="trtbuild-polygraphy-")
    with workdir as d, G_LOGGER.verbosity(G_LOGGER.WARNING):
        d = Path(d)
        save_json([{k: np.asarray(v) for k, v in inputs.items()}], str(d / "inputs.json"))
        ref = RunResults()
        ref.append(("reference", [IterationResult({k: np.asarray(v) for k, v in reference_outputs.items()},
                                                  runner_name="reference")]))
        ref.save(str(d / "reference.json"))
        cmd = exe + ["run", str(onnx_path), "--onnxrt", "--load-inputs", str(d / "inputs.json"),
                     "--load-outputs", str(d / "reference.json"), "--save-outputs", str(d / "outputs.json"),
                     "--rtol", repr(float(rtol)), "--atol", repr(float(atol)),
                     "--graph-optimization-level", graph_optimization_level]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=polygraphy_env(False))
        except subprocess.TimeoutExpired:
            return False, f"polygraphy run timed out after {timeout:.0f} s"
    text = r.stdout + r.stderr
    lines = [ln.strip() for ln in text.splitlines() if _SUMMARY_RE.search(ln)]
    compared = any("Accuracy Summary" in ln for ln in lines)
    passed = r.returncode == 0 and compared
    if not compared and r.returncode == 0:
        lines.append("polygraphy compared nothing: do the reference output names match the model's outputs?")
    return passed, "\n".join(lines) or text.strip()[-2000:]
