"""An engine picks, on the CPU it runs on, the exact and fast form of its ops (trtbuild.cpu_forms):
W8A8 engines carry a u8 x u8 form for CPUs whose u8 x s8 GEMM saturates, prompt attention engines
run whichever of trtbuild's kernel and GroupQueryAttention their probes time faster here. Every
form gives the same logits; test_every_cpu.py runs the forms on an emulated AVX2 CPU."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from trtbuild.cpu_forms import write_u8s8_probe
from trtbuild.engine import BuildConfig, PluginConfig
from trtbuild.engine_io import PROBE_DIR, PROMPT_ATTENTION_PROBES, U8S8_GEMM_PROBE, USE_PROMPT_KERNEL, u8u8_engine_path
from trtbuild.errors import TrtbuildError
from trtbuild.runtime import ModelRunner
from trtbuild.runtime.cpu_forms import u8s8_gemm_is_exact

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12], [20, 21, 22], [300, 301, 302, 303, 304, 305, 306, 307, 308, 309, 310]]
W8A8 = {"sq_per_token": ["--smoothquant", "0.5", "--per_channel", "--per_token"],
        "sq_static": ["--smoothquant", "0.5", "--per_channel"],
        "sq_per_tensor": ["--smoothquant", "0.5"]}


def int8_gemms(graph: onnx.GraphProto):
    """Every MatMulIntegerToFloat of a graph and its If branches."""
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from int8_gemms(attr.g)
        if node.op_type == "MatMulIntegerToFloat":
            yield node


def limits(max_input_len=32, **plugins) -> BuildConfig:
    return BuildConfig(max_batch_size=4, max_input_len=max_input_len, max_seq_len=64,
                       plugin_config=PluginConfig(**plugins))


@pytest.fixture(scope="module")
def w8a8_engines(tiny_models, engines):
    """Calibrated on conftest's calib_file, 4 samples of 64 tokens (the factory's)."""
    return {name: engines.engine(tiny_models["llama"], limits(), quant=flags) for name, flags in W8A8.items()}


def test_the_u8s8_probe_sees_saturation(tmp_path):
    """The probe's sum is exact here exactly when onnxruntime's MatMulInteger is exact here."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    probe = tmp_path / "probe.onnx"
    write_u8s8_probe(probe)
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "mmi",
                              [helper.make_tensor_value_info("a", TensorProto.UINT8, [4, 64]),
                               helper.make_tensor_value_info("b", TensorProto.INT8, [64, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [4, 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = session.run(None, {"a": np.full((4, 64), 255, np.uint8), "b": np.full((64, 1), 127, np.int8)})[0]
    assert u8s8_gemm_is_exact(probe) == bool((y == 255 * 127 * 64).all())


@pytest.mark.parametrize("name", list(W8A8))
def test_w8a8_forms_agree(w8a8_engines, name):
    """The u8 x u8 form converts every int8 GEMM (If branches included), stores no weight twice, and
    gives the u8 x s8 form's logits; on this CPU the runtime opens the form the probe says is exact."""
    engine = w8a8_engines[name]
    u8u8 = u8u8_engine_path(engine / "rank0.engine")
    assert u8u8.stat().st_size < (engine / "rank0.engine").stat().st_size * 2  # the graph, not the weights
    graph = onnx.load(str(u8u8), load_external_data=False).graph
    weights = {t.name: t.data_type for t in graph.initializer}
    gemms = list(int8_gemms(graph))
    assert gemms and all(weights.get(n.input[1]) is None and n.input[5] == "u8u8/weight_zero_point" for n in gemms)
    assert {weights.get(n.input[4]) for n in gemms} == {onnx.TensorProto.UINT8}
    exact = u8s8_gemm_is_exact(engine / PROBE_DIR / U8S8_GEMM_PROBE)
    auto = ModelRunner.from_dir(engine, num_threads=1)
    assert auto.forms.int8_gemm == ("u8s8" if exact else "u8u8")
    logits = {form: ModelRunner.from_dir(engine, num_threads=1, int8_gemm=form).score(PROMPTS)
              for form in ("u8s8", "u8u8")}
    for i, p in enumerate(PROMPTS):
        np.testing.assert_allclose(logits["u8u8"][i, :len(p)], auto.score(PROMPTS)[i, :len(p)], atol=1e-5, rtol=0)
        if exact:  # where u8 x s8 saturates its logits are what the u8 x u8 form exists to avoid
            np.testing.assert_allclose(logits["u8s8"][i, :len(p)], logits["u8u8"][i, :len(p)], atol=1e-5, rtol=0)


def test_static_w8a8_quantizes_activations_as_u8(w8a8_engines):
    """Static SmoothQuant's activations are u8 with zero point 128, the input MLAS's fast int8 GEMMs
    take (s8 x s8 runs scalar code on x86 without AVX-VNNI-INT8)."""
    graph = onnx.load(str(w8a8_engines["sq_static"] / "rank0.engine"), load_external_data=False).graph
    weights = {t.name: t.data_type for t in graph.initializer}
    assert {weights.get(n.input[4]) for n in int8_gemms(graph)} == {onnx.TensorProto.UINT8}


def test_forms_are_only_where_there_is_a_choice(tiny_models, engines):
    """An fp32 engine without the prompt kernel has no probes, no u8u8 form and no choice input."""
    engine = engines.engine(tiny_models["llama"], limits(context_fmha=False))
    assert not (engine / PROBE_DIR).exists() and not u8u8_engine_path(engine / "rank0.engine").exists()
    runner = ModelRunner.from_dir(engine, num_threads=1)
    assert USE_PROMPT_KERNEL not in {i.name for i in runner.session.get_inputs()}
    assert runner.forms.int8_gemm is None and runner.forms.prompt_kernel is None
    with pytest.raises(TrtbuildError, match="int8_gemm"):
        ModelRunner.from_dir(engine, int8_gemm="s8s8")


def test_prompt_attention_forms_agree_and_the_choice_is_kept(tiny_models, engines, tmp_path, monkeypatch):
    """Forcing either prompt attention gives the same logits and text; "auto" times the probes once
    and remembers the result in the kernel dir, keyed by this CPU."""
    monkeypatch.setenv("TRTBUILD_KERNEL_DIR", str(tmp_path / "kernels"))
    engine = engines.engine(tiny_models["qwen2"], limits(max_input_len=48))
    assert all((engine / PROBE_DIR / f).is_file() for f in PROMPT_ATTENTION_PROBES.values())
    runners = {form: ModelRunner.from_dir(engine, num_threads=1, prompt_attention=form) for form in ("kernel", "gqa")}
    assert runners["kernel"].forms.prompt_kernel is True and runners["gqa"].forms.prompt_kernel is False
    logits = {form: r.score(PROMPTS) for form, r in runners.items()}
    for i, p in enumerate(PROMPTS):
        np.testing.assert_allclose(logits["kernel"][i, :len(p)], logits["gqa"][i, :len(p)], atol=1e-4, rtol=0)
    choices = tmp_path / "kernels" / "prompt_attention_choices.json"
    assert not choices.exists()
    auto = ModelRunner.from_dir(engine, num_threads=1)
    (entry,) = json.loads(choices.read_text()).values()
    assert auto.forms.prompt_kernel == entry["kernel"] == (entry["kernel_ms"] < entry["gqa_ms"])
    assert entry["prompt_len"] == 48 and entry["threads"] == 1
    before = choices.stat().st_mtime_ns
    assert ModelRunner.from_dir(engine, num_threads=1).forms == auto.forms
    assert choices.stat().st_mtime_ns == before  # timed once
    with pytest.raises(TrtbuildError, match="prompt_attention"):
        ModelRunner.from_dir(engine, prompt_attention="fastest")
