"""The engines on an AVX2 CPU without VNNI, whichever CPU runs the suite: qemu-user runs a process as
a Haswell (AVX2, FMA, no AVX-512, no VNNI), where onnxruntime's u8 x s8 GEMM saturates
(../shared/DESIGN.md, "Every CPU"). Engines built here must pick there the forms that are exact,
and trtbuild's kernels must be built for the CPU the process sees, not the host's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from trtbuild.engine import BuildConfig
from trtbuild.runtime import ModelRunner

QEMU = shutil.which("qemu-x86_64")
AVX2_CPU = "Haswell-v4"
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12], [20, 21, 22], [300, 301, 302, 303, 304, 305, 306, 307, 308, 309, 310]]

pytestmark = pytest.mark.skipif(
    QEMU is None and not os.environ.get("CI"),
    reason="qemu-user is not installed (apt-get install qemu-user; scripts/test.sh installs it)")

# Runs under qemu: reports what the emulated CPU computes, as JSON on the last line of stdout.
AVX2_PROCESS = textwrap.dedent("""
    import json, sys
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper
    from trtbuild.kernels import ISA_FLAGS, default_isa, isa_flags
    from trtbuild.runtime import ModelRunner

    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "mmi",
                              [helper.make_tensor_value_info("a", TensorProto.UINT8, [1, 64]),
                               helper.make_tensor_value_info("b", TensorProto.INT8, [64, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    u8s8 = session.run(None, {"a": np.full((1, 64), 255, np.uint8), "b": np.full((64, 1), 127, np.int8)})[0]
    out_dir, prompts = sys.argv[1], json.loads(sys.argv[2])
    report = {"u8s8_sum": int(u8s8[0, 0]), "isa": default_isa(), "engines": {},
              "native_is_avx2": isa_flags("native") == ISA_FLAGS["avx2"]}
    for i, engine in enumerate(sys.argv[3:]):
        runner = ModelRunner.from_dir(engine, num_threads=1, prompt_attention="kernel")
        np.save(f"{out_dir}/avx2_logits_{i}.npy", runner.score(prompts))
        report["engines"][engine] = {"int8_gemm": runner.forms.int8_gemm, "prompt_kernel": runner.forms.prompt_kernel}
    print(json.dumps(report))
""")


@pytest.fixture(scope="module")
def cpu_engines(tiny_models, engines):
    """W8A8 per token (trtbuild's quantize kernels) and static, weight-only int8 and int4 (MatMulNBits'
    int8 compute), an int8 KV cache (the attention kernels' int8 reads and writes), and an fp32 prompt kernel engine (calibrated: on conftest's calib_file, 4 samples
    of 64 tokens, the factory's)."""
    recipes = {"sq_per_token": ["--smoothquant", "0.5", "--per_channel", "--per_token"],
               "sq_static": ["--smoothquant", "0.5", "--per_channel"],
               "w8a16": ["--use_weight_only", "--weight_only_precision", "int8"],
               "w4a16_g32": ["--use_weight_only", "--weight_only_precision", "int4", "--per_group", "--group_size", "32"],
               "int8_kv": ["--int8_kv_cache"],
               "fp32": []}
    build = BuildConfig(max_batch_size=4, max_input_len=32, max_seq_len=64)
    return {name: engines.engine(tiny_models["llama"], build, quant=flags) for name, flags in recipes.items()}


def test_an_avx2_cpu_runs_every_engine_exactly(cpu_engines, tmp_path):
    assert QEMU is not None, "qemu-user is needed to check the AVX2 CPU (apt-get install qemu-user)"
    script = tmp_path / "avx2_process.py"
    script.write_text(AVX2_PROCESS)
    env = dict(os.environ, TRTBUILD_KERNEL_DIR=str(tmp_path / "kernels"))
    env.pop("TRTBUILD_KERNEL_ISA", None)
    result = subprocess.run([QEMU, "-cpu", AVX2_CPU, sys.executable, str(script), str(tmp_path), json.dumps(PROMPTS),
                             *map(str, cpu_engines.values())], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    # the emulated CPU is the one the issue describes: pairs of u8 x s8 products saturate in int16
    assert report["u8s8_sum"] == 1_048_544 != 255 * 127 * 64
    assert report["isa"] == "avx2"  # the host's -march=native would be illegal instructions there
    assert report["native_is_avx2"]  # even asked for "native" (the compiler would see the host)
    for i, (name, engine) in enumerate(cpu_engines.items()):
        seen = report["engines"][str(engine)]
        assert seen["int8_gemm"] == ("u8u8" if name.startswith("sq") else None), name
        assert seen["prompt_kernel"] is True
        here = ModelRunner.from_dir(engine, num_threads=1, prompt_attention="kernel").score(PROMPTS)
        there = np.load(tmp_path / f"avx2_logits_{i}.npy")
        for i, p in enumerate(PROMPTS):  # the same integer GEMMs; float rounding of 8- vs 16-lane sums
            np.testing.assert_allclose(there[i, :len(p)], here[i, :len(p)], atol=1e-4, rtol=0,
                                       err_msg=f"{name}: the AVX2 CPU's logits differ, prompt {i}")


# Runs natively and under qemu: one model's outputs for the saved inputs, into an .npz.
RUN_GRAPH = textwrap.dedent("""
    import sys
    import numpy as np
    import onnxruntime as ort

    from trtbuild import kernels

    model, inputs, out = sys.argv[1:4]
    so = ort.SessionOptions()
    kernels.register(so)  # the form for the CPU this process sees (AVX2 under qemu's Haswell)
    session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    feeds = dict(np.load(inputs))
    names = [o.name for o in session.get_outputs()]
    np.savez(out, **dict(zip(names, session.run(None, feeds))))
""")


def _weight_only_model(path, shapes: dict[str, tuple[int, int, int]], rng) -> dict[str, np.ndarray]:
    """Per (in_features, out_features, bits) one MatMulNBits at accuracy_level 4 (int8 activations in
    blocks of 32) and one trtbuild WeightOnlyQuantMatMul (the same, the engines' default), with a
    model's outlier input channels; returns the feeds (1, 8 and 128 rows)."""
    from onnx import TensorProto

    from trtbuild.onnx_graph import GraphBuilder
    from trtbuild.plugins.quant_gemm import pack_int4, weight_only_linear

    g = GraphBuilder(path)
    feeds = {}
    for name, (k, n, bits) in shapes.items():
        q = rng.integers(0, 1 << bits, (n, k)).astype(np.uint8)
        tensors = {f"{name}.weight": pack_int4(q) if bits == 4 else q,
                   f"{name}.weights_scaling_factor": (rng.random((n, 1)) * 0.02 + 0.001).astype(np.float32)}
        for rows in (1, 8, 128):
            x = g.input(f"{name}_x{rows}", TensorProto.FLOAT, [rows, k])
            for kernel in (False, True):
                prefix = f"{name}_{rows}{'_kernel' * kernel}"  # weights are named by prefix: one copy per node
                y = weight_only_linear(g, x, {key.replace(name, prefix): v for key, v in tensors.items()},
                                       prefix, bits, 128, fused=True, kernel=kernel)
                g.op("Identity", [y], outputs=[f"{prefix}_y"])
                g.output(f"{prefix}_y", TensorProto.FLOAT, [rows, n])
            value = rng.standard_normal((rows, k)).astype(np.float32)
            value[:, rng.choice(k, 4, replace=False)] *= 40  # outlier channels, as real residual streams have
            value[0] *= 8  # an attention-sink row
            feeds[f"{name}_x{rows}"] = value
    g.save()
    g.close()
    return feeds


def test_an_avx2_cpu_runs_weight_only_gemms_at_model_shapes_alike(tmp_path):
    """The tiny engines above have K of 64: MatMulNBits' and trtbuild's int8-activation kernels at a
    real model's K and N (SmolLM2's 576 and 1536 in, 3072 out), 8- and 4-bit, must give the AVX2 CPU
    what they give this one. (A whole real engine cannot be compared so: rounding activations to int8 makes it
    jump at float noise, so two exact attention forms on one CPU already differ by 0.15 in logits.)"""
    assert QEMU is not None, "qemu-user is needed to check the AVX2 CPU (apt-get install qemu-user)"
    rng = np.random.default_rng(0)
    model = tmp_path / "weight_only.onnx"
    feeds = _weight_only_model(model, {"fc_gate8": (576, 3072, 8), "proj8": (1536, 576, 8),
                                       "fc_gate4": (576, 3072, 4), "proj4": (1536, 576, 4)}, rng)
    np.savez(tmp_path / "x.npz", **feeds)
    script = tmp_path / "run_graph.py"
    script.write_text(RUN_GRAPH)
    outputs = {}
    for cpu, prefix in (("here", []), ("avx2", [QEMU, "-cpu", AVX2_CPU])):
        result = subprocess.run([*prefix, sys.executable, str(script), str(model), str(tmp_path / "x.npz"),
                                 str(tmp_path / f"{cpu}.npz")], capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[cpu] = np.load(tmp_path / f"{cpu}.npz")
    for name in outputs["here"].files:
        here, there = outputs["here"][name], outputs["avx2"][name]
        scale = float(np.sqrt(np.mean(here ** 2)))
        # the same int8 products; only the float sums of block results may round differently
        assert float(np.abs(there - here).max()) <= 5e-5 * scale, f"{name}: the AVX2 CPU's outputs differ"
