"""Each plugin's fused form equals its standard-ONNX decomposition, for every quantization recipe.

The standard form is run as written (rank0.onnx, onnxruntime optimizations off), because
onnxruntime's optimizer would otherwise fuse DequantizeLinear→MatMul back into MatMulNBits.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from trtbuild.builder import build_engine
from trtbuild.engine import BuildConfig, PluginConfig, load_engine_config
from trtbuild.runtime import ModelRunner, SamplingConfig

from conftest import op_types
from recipes import QUANT_RECIPES

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12], [20, 21, 22], [300, 301, 302, 303, 304]]

RECIPES = {
    "fp32": [],
    **QUANT_RECIPES,
    # on llama3 (intermediate 96) mlp.proj gets groups of 64 and 32: a partial last group
    "gptq_g64_partial": ["--use_weight_only", "--weight_only_precision", "int4_gptq", "--per_group", "--group_size",
                         "64", "--has_zero_point"],
}
ARCH = {"gptq_g64_partial": "llama3"}


def unoptimized_runner(engine_dir) -> ModelRunner:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(str(engine_dir / "rank0.onnx"), so, providers=["CPUExecutionProvider"])
    return ModelRunner(engine_dir, load_engine_config(engine_dir), session)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_fused_equals_standard(recipe, tiny_models, engines):
    dirs = {}  # calibrated recipes: on conftest's calib_file, 4 samples of 64 tokens (the factory's)
    # SmoothQuant engines read lm_head as int8 weight-only: with float activations it is exact, so
    # that their W8A8 linears are held to float rounding below
    activations = "float" if "--smoothquant" in RECIPES[recipe] else "int8"
    for form in ("auto", "disable"):
        plugins = PluginConfig(gemm_plugin=form, gpt_attention_plugin=form, norm_plugin=form)
        build = BuildConfig(max_batch_size=4, max_input_len=32, max_seq_len=64, plugin_config=plugins,
                            weight_only_activations=activations)
        dirs[form] = engines.engine(tiny_models[ARCH.get(recipe, "llama")], build, quant=RECIPES[recipe],
                                    keep_onnx=True)
    runners = {"fused": ModelRunner.from_dir(dirs["auto"], num_threads=1),
               "standard": unoptimized_runner(dirs["disable"])}
    fused, standard = runners["fused"].score(PROMPTS), runners["standard"].score(PROMPTS)
    # MatMulNBits runs with accuracy_level 4 (activations quantized to int8 per block, for speed),
    # which its standard decomposition does not: weight-only recipes agree to ~5e-3 (logits ~1),
    # every other recipe to float rounding.
    atol = 1e-2 if "--use_weight_only" in RECIPES[recipe] else 1e-4
    for i, p in enumerate(PROMPTS):
        np.testing.assert_allclose(fused[i, :len(p)], standard[i, :len(p)], atol=atol, rtol=0,
                                   err_msg=f"{recipe}: fused != standard, prompt {i}")
    out = runners["fused"].generate(PROMPTS, SamplingConfig(max_new_tokens=6)).output_ids
    assert all(len(o) == 6 for o in out)
    if recipe == "sq_per_token":  # the fused form ran trtbuild's per-token kernels (smooth_quant_plugins)
        graph = onnx.load(str(dirs["auto"] / "rank0.engine"), load_external_data=False).graph
        assert {"PerTokenQuantize", "SwiGLUQuantize"} <= op_types(graph)
        assert runners["fused"].config.build_config.plugin_config.smooth_quant_plugins


def test_merged_linears_compute_what_the_separate_ones_do():
    """fc and gate (one input) become one GEMM: the merged tensors dequantize to the two weights
    stacked, per-tensor SmoothQuant scales become per-channel, and differing per-input scales or
    tensor sets keep the linears apart."""
    import dataclasses

    import torch

    from trtbuild.checkpoint import PretrainedConfig, QuantConfig
    from trtbuild.plugins.gemm import merge_linears
    from trtbuild.quantization.layout import dequantize_linear, quantize_rtn, to_weight_only_tensors

    rng = np.random.default_rng(0)
    config = PretrainedConfig(architecture="LlamaForCausalLM", dtype="float32", hidden_size=64,
                              intermediate_size=96, num_hidden_layers=1, num_attention_heads=4, vocab_size=128,
                              num_key_value_heads=4, head_size=16, hidden_act="silu", norm_type="rms_norm",
                              norm_epsilon=1e-5, position_embedding_type="rope_gpt_neox", max_position_embeddings=64)
    weights = {p: torch.from_numpy(rng.standard_normal((96 if p != "c" else 48, 64)).astype(np.float32))
               for p in ("a", "b", "c")}
    for group_size, zero_point in ((None, False), (32, True)):
        tensors = {}
        for p, w in weights.items():
            qw = quantize_rtn(w, 4, group_size, zero_point)
            tensors.update({f"{p}.{k}": v.numpy() for k, v in to_weight_only_tensors(qw, zero_point).items()})
        merged = merge_linears(tensors, ["a", "c"], "a+c")
        qc = QuantConfig(quant_algo="W4A16", group_size=group_size or -1, has_zero_point=zero_point,
                         per_group=group_size is not None)
        cfg = dataclasses.replace(config, quantization=qc)
        as_torch = lambda d: {k: torch.from_numpy(np.asarray(v)) for k, v in d.items()}  # noqa: E731
        expect = torch.cat([dequantize_linear(as_torch(tensors), p, cfg) for p in ("a", "c")])
        torch.testing.assert_close(dequantize_linear(as_torch(merged), "a+c", cfg), expect)

    sq = {"a.weight": np.ones((3, 4), np.int8), "a.per_channel_scale": np.array([0.5], np.float32),
          "a.act_scale": np.array([0.1], np.float32),
          "b.weight": np.ones((2, 4), np.int8), "b.per_channel_scale": np.array([0.25, 2.0], np.float32),
          "b.act_scale": np.array([0.1], np.float32)}
    merged = merge_linears(sq, ["a", "b"], "ab")
    np.testing.assert_array_equal(merged["ab.per_channel_scale"], [0.5, 0.5, 0.5, 0.25, 2.0])
    assert merged["ab.act_scale"] is sq["a.act_scale"]
    assert merged["ab.weight"].shape == (5, 4)
    assert merge_linears({**sq, "b.act_scale": np.array([0.2], np.float32)}, ["a", "b"], "ab") is None
    assert merge_linears({**sq, "b.bias": np.zeros(2, np.float32)}, ["a", "b"], "ab") is None


def test_per_token_int8_linear_zero_row_and_shared_zero_point(tmp_path):
    """W8A8 per token, fused: an all-zero row (scale 0, no epsilon guard) comes out exactly 0 and
    finite, the other rows match the standard Q/DQ form (in the u8 x u8 form everywhere, in the u8 x s8
    form where this CPU's u8 x s8 GEMM is exact), and two linears share one zero point."""
    from onnx import TensorProto

    from trtbuild.cpu_forms import write_u8s8_probe, write_u8u8_form
    from trtbuild.onnx_graph import GraphBuilder
    from trtbuild.plugins.quant_gemm import smoothquant_linear
    from trtbuild.runtime.cpu_forms import u8s8_gemm_is_exact

    probe = tmp_path / "u8s8_probe.onnx"
    write_u8s8_probe(probe)
    rng = np.random.default_rng(0)
    k, n = 64, 48
    tensors = {f"{p}.{s}": v for p in ("a", "b") for s, v in (
        ("weight", rng.integers(-127, 128, (n, k)).astype(np.int8)),
        ("per_channel_scale", (rng.random(n) * 0.01 + 0.001).astype(np.float32)))}
    outputs = {}
    for fused in (True, False):
        g = GraphBuilder(tmp_path / f"lin_{fused}.onnx")
        x = g.input("x", TensorProto.FLOAT, ["batch", "seq", k])
        for p in ("a", "b"):
            g.op("Identity", [smoothquant_linear(g, x, tensors, p, per_token=True, fused=fused)], outputs=[f"y_{p}"])
            g.output(f"y_{p}", TensorProto.FLOAT, ["batch", "seq", n])
        if fused:
            assert sum(node.op_type == "Expand" for node in g.nodes) == 1
        path = g.save()
        g.close()
        x_value = rng.standard_normal((2, 3, k)).astype(np.float32) if not outputs else outputs["x"]
        x_value[1, 2] = 0.0
        outputs["x"] = x_value
        # the fused graph in both CPU forms (u8 x s8; u8 x u8 for CPUs where u8 x s8 saturates)
        forms = {"u8u8": write_u8u8_form(path), **({"u8s8": path} if u8s8_gemm_is_exact(probe) else {})} \
            if fused else {False: path}
        for form, form_path in forms.items():
            session = ort.InferenceSession(str(form_path), providers=["CPUExecutionProvider"])
            outputs[form] = session.run(None, {"x": x_value})
    for fused_y, standard_y in [(y, s) for form in ("u8u8", "u8s8") if form in outputs
                                for y, s in zip(outputs[form], outputs[False])]:
        assert np.isfinite(fused_y).all()
        np.testing.assert_array_equal(fused_y[1, 2], 0.0)
        # x / scale near .5 may round the other way in one form (QuantizeLinear vs Div, Round): a few
        # int8 steps of an input, each moving an output by up to max|w| * w_scale * x_scale
        x_scale = np.abs(outputs["x"]).max() / 127
        step = 127 * max(tensors["a.per_channel_scale"].max(), tensors["b.per_channel_scale"].max()) * x_scale
        np.testing.assert_allclose(fused_y, standard_y, rtol=0, atol=4 * step)


def _matmulnbits_attrs(engine_dir, op_type: str = "MatMulNBits") -> list[dict]:
    graph = onnx.load(str(engine_dir / "rank0.engine"), load_external_data=False).graph
    nodes = []

    def walk(g):
        for node in g.node:
            if node.op_type == op_type:
                nodes.append({a.name: onnx.helper.get_attribute_value(a) for a in node.attribute})
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)
    walk(graph)
    return nodes


@pytest.mark.parametrize("recipe", ["w8a16", "w4a16_g32_zp"])
def test_weight_only_activations_float_is_exact(recipe, tiny_models, engines):
    """--weight_only_activations float: MatMulNBits at accuracy_level 0 (float activations) equals
    the standard DequantizeLinear → MatMul form to float rounding, fused by the gemm plugin, fused
    by onnxruntime from the standard form, and unfused (the standard form in the attention plugin's
    prompt branch, where onnxruntime cannot fuse it). The default quantizes activations per block of
    32 (per-channel weights) or of the group, in trtbuild's WeightOnlyQuantMatMul or (its flag off)
    in MatMulNBits at accuracy_level 4."""
    dirs = {}
    for name, gemm, attention, activations in (("fused", "auto", "auto", "float"), ("standard", "disable", "disable", "float"),
                                               ("standard_in_branch", "disable", "auto", "float"),
                                               ("default", "auto", "auto", "int8"), ("kernel", "auto", "auto", "int8")):
        plugins = PluginConfig(gemm_plugin=gemm, gpt_attention_plugin=attention, norm_plugin=attention,
                               weight_only_quant_matmul_plugin=name == "kernel")
        build = BuildConfig(max_batch_size=4, max_input_len=32, max_seq_len=64, plugin_config=plugins,
                            weight_only_activations=activations)
        dirs[name] = engines.engine(tiny_models["llama"], build, quant=RECIPES[recipe], keep_onnx=name == "standard")
    levels = {name: {a["accuracy_level"] for a in _matmulnbits_attrs(d)} for name, d in dirs.items()}
    assert levels["fused"] == levels["standard"] == {0} and levels["default"] == {4}, levels
    assert levels["standard_in_branch"] <= {0} and levels["kernel"] == set(), levels
    for name, op_type in (("default", "MatMulNBits"), ("kernel", "WeightOnlyQuantMatMul")):
        blocks = {a["block_size"] for a in _matmulnbits_attrs(dirs[name], op_type) if a["K"] >= 32}
        assert blocks == {32}, (name, blocks)
    reference = unoptimized_runner(dirs["standard"]).score(PROMPTS)
    for name in ("fused", "standard", "standard_in_branch"):
        scores = ModelRunner.from_dir(dirs[name], num_threads=1).score(PROMPTS)
        for i, p in enumerate(PROMPTS):
            np.testing.assert_allclose(scores[i, :len(p)], reference[i, :len(p)], atol=1e-4, rtol=0,
                                       err_msg=f"{recipe} {name}: prompt {i}")


def test_bad_weight_only_activations_named(tiny_models, engines, tmp_path):
    from trtbuild.errors import TrtbuildError

    ckpt = engines.checkpoint(tiny_models["llama"], quant=RECIPES["w8a16"])
    with pytest.raises(TrtbuildError, match="--weight_only_activations 'fp8'"):
        build_engine(ckpt, tmp_path / "e", BuildConfig(max_input_len=32, max_seq_len=64, weight_only_activations="fp8"), progress=False)
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("arch", ["llama", "llama3"])  # tied, untied lm_head
def test_weight_only_engines_store_the_vocabulary_table_in_int8_once(arch, tiny_models, engines):
    """A weight-only engine gathers its embeddings from an int8 table (GatherBlockQuantized) that a
    tied lm_head reads too (WeightOnlyQuantMatMul on the same initializer, which it then leaves in
    place for the Gather); no float table is left."""
    engine = engines.engine(tiny_models[arch], BuildConfig(max_batch_size=2, max_input_len=32, max_seq_len=64),
                            quant=RECIPES["w4a16"])
    model = onnx.load(str(engine / "rank0.engine"), load_external_data=False)
    nodes = {n.name or n.output[0]: n for n in model.graph.node}
    gather = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    lm_head = nodes["lm_head/WeightOnlyQuantMatMul"]
    assert len(gather) == 1 and gather[0].input[0] == "transformer.vocab_embedding.qweight"
    tied = arch == "llama"
    assert (lm_head.input[1] == gather[0].input[0]) == tied, (lm_head.input, gather[0].input)
    shared = {a.name: onnx.helper.get_attribute_value(a) for a in lm_head.attribute}["weights_shared"]
    assert shared == int(tied), shared
    names = {i.name for i in model.graph.initializer}
    assert "transformer.vocab_embedding.weight" not in names and "lm_head.weight" not in names


@pytest.mark.parametrize("arch", ["llama", "llama3"])  # tied, untied lm_head
def test_int4_lm_head_reads_its_own_int4_weights(arch, tiny_models, engines):
    """--lm_head_precision int4: lm_head multiplies its own int4 weights in blocks of 32 (tied or not:
    the embedding table stays int8, for the Gather alone), the kernel's logits equal the standard
    DequantizeLinear form's to the int8 activations' rounding, and they stay near the int8 lm_head's."""
    dirs = {}
    for name, form, precision in (("fused", "auto", "int4"), ("standard", "disable", "int4"), ("int8", "auto", "int8")):
        plugins = PluginConfig(gemm_plugin=form, gpt_attention_plugin=form, norm_plugin=form)
        build = BuildConfig(max_batch_size=4, max_input_len=32, max_seq_len=64, plugin_config=plugins,
                            lm_head_precision=precision)
        dirs[name] = engines.engine(tiny_models[arch], build, quant=RECIPES["w4a16"], keep_onnx=name == "standard")
    graph = onnx.load(str(dirs["fused"] / "rank0.engine"), load_external_data=False).graph
    lm_head = next(n for n in graph.node if n.name == "lm_head/WeightOnlyQuantMatMul")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in lm_head.attribute}
    assert (attrs["bits"], attrs["block_size"], attrs["weights_shared"]) == (4, 32, 0), attrs
    gather = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(gather) == 1 and lm_head.input[1] not in gather[0].input
    assert load_engine_config(dirs["fused"]).build_config.lm_head_precision == "int4"
    scores = {"fused": ModelRunner.from_dir(dirs["fused"], num_threads=1).score(PROMPTS),
              "standard": unoptimized_runner(dirs["standard"]).score(PROMPTS),
              "int8": ModelRunner.from_dir(dirs["int8"], num_threads=1).score(PROMPTS)}
    for i, p in enumerate(PROMPTS):
        np.testing.assert_allclose(scores["fused"][i, :len(p)], scores["standard"][i, :len(p)], atol=1e-2, rtol=0,
                                   err_msg=f"int4 lm_head: fused != standard, prompt {i}")
        gap = np.abs(scores["fused"][i, :len(p)] - scores["int8"][i, :len(p)]).max()
        assert 0 < gap < 0.2, f"int4 against int8 lm_head, prompt {i}: {gap}"


@pytest.mark.parametrize("quant, build, match", [
    ([], {}, "linears are not quantized"),
    (RECIPES["w4a16"], {"quantize_lm_head": False}, "--no_quantize_lm_head"),
    (RECIPES["w4a16"], {"lm_head_precision": "int2"}, "--lm_head_precision 'int2' is not one of int8, int4"),
])
def test_bad_lm_head_precision_named(quant, build, match, tiny_models, engines, tmp_path):
    from trtbuild.errors import TrtbuildError

    ckpt = engines.checkpoint(tiny_models["llama"], quant=quant)
    with pytest.raises(TrtbuildError, match=match):
        build_engine(ckpt, tmp_path / "e", BuildConfig(max_input_len=32, max_seq_len=64,
                                                       **{"lm_head_precision": "int4", **build}), progress=False)
    assert not (tmp_path / "e").exists()
