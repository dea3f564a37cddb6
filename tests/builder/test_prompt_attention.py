"""Prompt attention: prompts into an empty cache take an If branch of the engine where they run
trtbuild's causal kernel (--context_fmha, the default; batches too; every other step then runs its
generation kernel) or, without it, GroupQueryAttention
in two causal halves (one prompt in the --context_split window). Every output (prefill logits,
scores, generated tokens, the KV cache it leaves behind) equals the one-call engine's, at batch 1,
for ragged batches and with an int8 KV cache."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from trtbuild.builder import build_engine
from trtbuild.cli.build import main as build_main
from trtbuild.engine import BuildConfig, PluginConfig
from trtbuild.errors import TrtbuildError
from trtbuild.runtime import ModelRunner, SamplingConfig

from conftest import op_types

WINDOW = (8, 40)


@pytest.fixture(scope="module", params=["fp32", "int8_kv"])
def runners(request, tiny_models, engines):
    """int8_kv: calibrated on conftest's calib_file (the factory's), 4 samples of 64 tokens."""
    quant = ["--int8_kv_cache"] if request.param == "int8_kv" else []
    out = {}
    for name, fmha, (lo, hi) in (("fmha", True, WINDOW), ("split", False, WINDOW), ("one_call", False, (0, 0))):
        build = BuildConfig(max_batch_size=4, max_input_len=48, max_seq_len=96, context_split_min_len=lo,
                            context_split_max_len=hi, plugin_config=PluginConfig(context_fmha=fmha))
        out[name] = engines.runner(tiny_models["llama"], build, quant=quant)
    out["int8_kv"] = request.param == "int8_kv"
    return out


def prompt(n: int, seed: int = 0) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(3, 250, n)]


def engine_graph(runner: ModelRunner) -> onnx.GraphProto:
    return onnx.load(str(runner.engine_dir / "rank0.engine"), load_external_data=False).graph


def test_prompt_engines_have_the_two_branch_if(runners):
    fmha, split, one_call = (engine_graph(runners[name]) for name in ("fmha", "split", "one_call"))
    assert "If" in {n.op_type for n in split.node} and "If" not in op_types(one_call)
    assert "If" in {n.op_type for n in fmha.node}
    assert "GroupQueryAttention" in op_types(split)
    # an int8 KV engine's kernel writes the int8 cache and attends over what it holds
    kernel = "CausalPromptAttentionInt8KV" if runners["int8_kv"] else "CausalPromptAttention"
    assert kernel in op_types(fmha) and "CausalPromptAttention" not in op_types(split)
    # every other step runs trtbuild's generation kernel; the prompt branch holds an If of its own
    # on the runtime's choice (use_context_fmha): the prompt kernel or GroupQueryAttention
    generation = "GenerationAttentionInt8KV" if runners["int8_kv"] else "GenerationAttention"
    assert generation in op_types(fmha) and generation not in op_types(split)
    layer_if = next(n for n in fmha.node if n.op_type == "If")
    then, orelse = (next(a.g for a in layer_if.attribute if a.name == name) for name in ("then_branch", "else_branch"))
    assert [n.op_type for n in then.node] == ["If"] and generation in {n.op_type for n in orelse.node}
    assert {kernel, "GroupQueryAttention"} <= op_types(then)
    assert runners["fmha"].config.build_config.plugin_config.context_fmha
    assert not runners["split"].config.build_config.plugin_config.context_fmha



def test_if_branches_hold_only_attention(runners):
    """The If wraps each layer's attention, not the layers: a weight read inside both branches
    would stay resident beside its prepacked copy while onnxruntime loads the engine (an fp32
    SmolLM2 engine peaked at 1.6x its steady memory that way)."""
    for name in ("fmha", "split"):
        graph = engine_graph(runners[name])
        ifs = [n for n in graph.node if n.op_type == "If"]
        assert len(ifs) == runners[name].config.pretrained_config.num_hidden_layers
        big = {t.name for t in graph.initializer if np.prod(t.dims) > 4096}
        for node in ifs:
            for branch in node.attribute:
                read = {i for n in branch.g.node for i in n.input} & big
                assert not read, f"{node.name} reads {sorted(read)}"
                assert not {"MatMul", "MatMulNBits", "Gemm"} & {n.op_type for n in branch.g.node}

@pytest.mark.parametrize("lengths", [[7], [8], [21], [39], [40], [33, 20, 9]])
@pytest.mark.parametrize("engine", ["fmha", "split"])
def test_prompt_engine_equals_one_call_engine(runners, lengths, engine):
    split, one_call = runners[engine], runners["one_call"]
    prompts = [prompt(n, seed=i) for i, n in enumerate(lengths)]
    np.testing.assert_allclose(split.prefill(prompts), one_call.prefill(prompts), atol=1e-5, rtol=0)
    # the cache the prefill left: decode steps read it
    s, o = split.score(prompts), one_call.score(prompts)
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(s[i, :n], o[i, :n], atol=1e-5, rtol=0)
    sampling = SamplingConfig(max_new_tokens=10)
    assert split.generate(prompts, sampling).output_ids == one_call.generate(prompts, sampling).output_ids


def test_split_window_flags_are_checked(tiny_models, engines, tmp_path, capsys):
    ckpt = engines.checkpoint(tiny_models["llama"])
    with pytest.raises(SystemExit) as exit_info:
        build_main(["--checkpoint_dir", str(ckpt), "--output_dir", str(tmp_path / "e"),
                    "--context_split_min_len", "64", "--context_split_max_len", "32"])
    assert exit_info.value.code == 2
    assert "--context_split_max_len 32" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()
    with pytest.raises(TrtbuildError, match="context_split_min_len -1"):  # the same check for API callers
        build_engine(ckpt, tmp_path / "e", BuildConfig(max_input_len=32, max_seq_len=64, context_split_min_len=-1))
    assert not (tmp_path / "e").exists()


def test_context_fmha_flag(tiny_models, engines, tmp_path):
    ckpt = engines.checkpoint(tiny_models["qwen2"])
    common = ["--checkpoint_dir", str(ckpt), "--max_input_len", "32", "--max_seq_len", "64"]
    build_main([*common, "--output_dir", str(tmp_path / "on")])
    build_main([*common, "--output_dir", str(tmp_path / "off"), "--context_fmha", "disable"])
    on, off = (ModelRunner.from_dir(tmp_path / name, num_threads=1) for name in ("on", "off"))
    assert "CausalPromptAttention" in op_types(engine_graph(on))
    assert "CausalPromptAttention" not in op_types(engine_graph(off))
    assert on.config.build_config.plugin_config.context_fmha and not off.config.build_config.plugin_config.context_fmha
    prompts = [prompt(n, seed=n) for n in (1, 5, 31)]
    for p in prompts:  # one at a time: each takes the kernel's branch (qkv biases, Qwen2)
        np.testing.assert_allclose(on.prefill([p]), off.prefill([p]), atol=1e-5, rtol=0)
