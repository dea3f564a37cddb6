"""Tensor parallelism: convert --tp_size N → trt-build (an engine per rank) → mpiexec -n N: every
rank's logits equal the single-rank engine's and the greedy text is the same; sampling takes rank
0's tokens on every rank; a wrong launch or a bad split is one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trtbuild.builder import build_engine
from trtbuild.convert.converter import convert_checkpoint
from trtbuild.engine import BuildConfig
from trtbuild.errors import TrtbuildError
from trtbuild.runtime import ModelRunner, SamplingConfig

MPIEXEC = Path(sys.executable).parent / "mpiexec"
WORKER = Path(__file__).with_name("rank_worker.py")
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12], [20, 21, 22], [300, 301, 302, 303, 304]]
NEW_TOKENS = 8

pytestmark = pytest.mark.skipif(not MPIEXEC.is_file(), reason="needs trtbuild[mpi] (mpiexec beside python)")


def build(model_dir: Path, root: Path, tp: int) -> Path:
    ckpt, engine = root / f"ckpt-tp{tp}", root / f"engine-tp{tp}"
    convert_checkpoint(model_dir, ckpt, "float32", progress=False, tp_size=tp)
    build_engine(ckpt, engine, BuildConfig(max_batch_size=4, max_input_len=32, max_seq_len=64), progress=False)
    return engine


def run_ranks(engine: Path, ranks: int, out: Path) -> dict[str, np.ndarray]:
    proc = subprocess.run([str(MPIEXEC), "-n", str(ranks), sys.executable, str(WORKER), str(engine), str(out),
                           json.dumps(PROMPTS), str(NEW_TOKENS)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return dict(np.load(out))


@pytest.mark.parametrize("arch,tp", [("llama", 2), ("llama3", 2), ("qwen2", 2), ("mistral", 2), ("phi3", 2),
                                     ("gpt2", 2), ("qwen3", 2), ("gemma3", 2), ("llama_tp3", 3)])
def test_tp_engine_equals_one_rank(arch, tp, tiny_models, tmp_path):
    """llama3 has one KV head (each rank repeats it), llama_tp3 a vocabulary 3 does not divide (padded
    lm_head), gpt2 biases on its row-parallel linears (added once), phi3 fused qkv and gate_up."""
    model = tiny_models[arch]
    one = ModelRunner.from_dir(build(model, tmp_path, 1), num_threads=1)
    want_scores = one.score(PROMPTS)
    want_tokens = one.generate(PROMPTS, SamplingConfig(max_new_tokens=NEW_TOKENS, end_id=-1)).output_ids
    engine = build(model, tmp_path, tp)
    assert sorted(p.name for p in engine.glob("rank*.engine")) == [f"rank{r}.engine" for r in range(tp)]
    got = run_ranks(engine, tp, tmp_path / "out.npz")
    for rank in range(tp):
        scores = got[f"scores_{rank}"]
        for b, prompt in enumerate(PROMPTS):  # rows are right-padded to the longest prompt
            np.testing.assert_allclose(scores[b, :len(prompt)], want_scores[b, :len(prompt)], atol=1e-4, rtol=0)
        assert got[f"greedy_{rank}"].tolist() == want_tokens
        assert got[f"sampled_{rank}"].tolist() == got["sampled_0"].tolist()  # rank 0's tokens everywhere


def test_tp_split_shapes_and_config(tiny_models, tmp_path):
    ckpt = tmp_path / "ckpt"
    convert_checkpoint(tiny_models["llama_tp3"], ckpt, "float32", progress=False, tp_size=3)
    config = json.loads((ckpt / "config.json").read_text())
    assert config["mapping"] == {"world_size": 3, "tp_size": 3, "pp_size": 1}
    from safetensors.numpy import load_file

    rank1 = load_file(str(ckpt / "rank1.safetensors"))
    # 6 heads of 16, 3 KV heads: a rank holds 2 query heads and 1 KV head; MLP 192 / 3; vocab 512 → 171 rows
    assert rank1["transformer.layers.0.attention.qkv.weight"].shape == ((2 + 2 * 1) * 16, 96)
    assert rank1["transformer.layers.0.attention.dense.weight"].shape == (96, 2 * 16)
    assert rank1["transformer.layers.0.mlp.proj.weight"].shape == (96, 64)
    assert rank1["lm_head.weight"].shape == (171, 96)
    assert rank1["transformer.vocab_embedding.weight"].shape == (512, 96)


def test_wrong_launch_is_one_line(tiny_models, tmp_path):
    engine = build(tiny_models["llama"], tmp_path, 2)
    with pytest.raises(TrtbuildError, match=r"engine of 2 ranks, started without mpiexec: launch it as mpiexec -n 2"):
        ModelRunner.from_dir(engine)
    # the command line, under a world of the wrong size: every rank says so, exit 2, no hang
    proc = subprocess.run([str(MPIEXEC), "-n", "3", sys.executable, "-m", "trtbuild.cli.run", "--engine_dir",
                           str(engine), "--input_text", "hello"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    # every rank raises it; once one has exited, mpiexec may end the others before they print
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert 1 <= len(errors) <= 3 and all("in a world of 3 ranks" in e and "mpiexec -n 2" in e for e in errors)
    assert "Traceback" not in proc.stderr


def test_tp_run_py_prints_once(tiny_models, tmp_path):
    engine = build(tiny_models["llama"], tmp_path, 2)
    proc = subprocess.run([str(MPIEXEC), "-n", "2", sys.executable, "-m", "trtbuild.cli.run", "--engine_dir",
                           str(engine), "--input_text", "The history of", "--max_output_len", "6"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    one = subprocess.run([sys.executable, "-m", "trtbuild.cli.run", "--engine_dir", str(build(
        tiny_models["llama"], tmp_path, 1)), "--input_text", "The history of", "--max_output_len", "6"],
        capture_output=True, text=True, timeout=300)
    assert proc.stdout.count("Output [Text 0 Beam 0]") == 1
    assert proc.stdout == one.stdout


def test_bad_splits_are_one_line(tiny_models, tmp_path):
    with pytest.raises(TrtbuildError, match="tp_size 3 does not divide the model's 4 attention heads"):
        convert_checkpoint(tiny_models["llama"], tmp_path / "c3", "float32", progress=False, tp_size=3)
    engine_ckpt = tmp_path / "c2"
    convert_checkpoint(tiny_models["llama"], engine_ckpt, "float32", progress=False, tp_size=2)
    (engine_ckpt / "rank1.safetensors").unlink()
    with pytest.raises(TrtbuildError, match="rank1.safetensors"):
        build_engine(engine_ckpt, tmp_path / "e", BuildConfig(max_input_len=32, max_seq_len=64), progress=False)
    assert not (tmp_path / "e").exists()


def test_rank_engine_from_another_build_is_refused_on_every_rank(tiny_models, tmp_path):
    engine = build(tiny_models["llama"], tmp_path / "a", 2)
    other = build(tiny_models["llama"], tmp_path / "b", 2)
    for name in ("rank1.engine", "rank1.engine.data"):
        (engine / name).write_bytes((other / name).read_bytes())
    proc = subprocess.run([str(MPIEXEC), "-n", "2", sys.executable, "-m", "trtbuild.cli.run", "--engine_dir",
                           str(engine), "--input_text", "hello"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    # each rank raises (rank 0: "rank 1 failed: ..."); mpiexec may end rank 1 before it prints
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert errors and all("rank1.engine comes from another build" in line for line in errors), errors
    assert "Traceback" not in proc.stderr


def test_trt_build_splits_an_unsplit_checkpoint(tiny_models, tmp_path):
    """trt-build --tp_size on a one-rank checkpoint gives the engines convert --tp_size would."""
    from trtbuild.cli.build import main as build_main

    one_ckpt = tmp_path / "ckpt"
    convert_checkpoint(tiny_models["qwen2"], one_ckpt, "float32", progress=False)
    build_main(["--checkpoint_dir", str(one_ckpt), "--output_dir", str(tmp_path / "split"), "--tp_size", "2",
                "--max_batch_size", "4", "--max_input_len", "32", "--max_seq_len", "64"])
    converted = build(tiny_models["qwen2"], tmp_path, 2)
    a, b = (run_ranks(e, 2, tmp_path / f"{e.name}.npz") for e in (tmp_path / "split", converted))
    assert np.array_equal(a["scores_0"], b["scores_0"]) and a["greedy_0"].tolist() == b["greedy_0"].tolist()
    with pytest.raises(TrtbuildError, match="already split over 2 ranks"):
        build_engine(tmp_path / "ckpt-tp2", tmp_path / "x", BuildConfig(max_input_len=32, max_seq_len=64), tp_size=3)


@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 3])
def test_smollm2_tp(tp, real_model_dir, tmp_path):
    """SmolLM2-135M (9 heads, 3 KV heads): tp 2 does not divide its heads (one line); tp 3 gives one
    rank's logits and greedy tokens."""
    if tp == 2:
        with pytest.raises(TrtbuildError, match="tp_size 2 does not divide the model's 9 attention heads"):
            convert_checkpoint(real_model_dir, tmp_path / "c", "float32", progress=False, tp_size=2)
        return
    from trtbuild.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(real_model_dir)
    prompts = [tokenizer.encode(t).ids for t in ("The capital of France is", "def fibonacci(n):", "Once upon a time")]
    one = ModelRunner.from_dir(build(real_model_dir, tmp_path, 1), num_threads=2)
    want_scores = one.score(prompts)
    want_tokens = one.generate(prompts, SamplingConfig(max_new_tokens=NEW_TOKENS, end_id=-1)).output_ids
    engine = build(real_model_dir, tmp_path, tp)
    proc = subprocess.run([str(MPIEXEC), "-n", str(tp), sys.executable, str(WORKER), str(engine),
                           str(tmp_path / "out.npz"), json.dumps(prompts), str(NEW_TOKENS)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = dict(np.load(tmp_path / "out.npz"))
    for b, prompt in enumerate(prompts):
        np.testing.assert_allclose(got["scores_0"][b, :len(prompt)], want_scores[b, :len(prompt)], atol=1e-4, rtol=0)
    assert got["greedy_0"].tolist() == want_tokens


def test_tp_perplexity_reports_once(tiny_models, tmp_path):
    from tiny_models import PPL_TEXT

    def perplexity(engine: Path, ranks: int) -> list[str]:
        cmd = [str(Path(sys.executable).parent / "trtbuild-perplexity"), "--engine_dir", str(engine), "--text_file",
               str(PPL_TEXT), "--num_chars", "4000", "--seq_len", "32", "--no_progress"]
        proc = subprocess.run([str(MPIEXEC), "-n", str(ranks), *cmd] if ranks > 1 else cmd, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return [line for line in proc.stdout.splitlines() if line.startswith("perplexity:")]

    tp2 = perplexity(build(tiny_models["llama"], tmp_path, 2), 2)
    tp1 = perplexity(build(tiny_models["llama"], tmp_path, 1), 1)
    assert len(tp2) == 1 and abs(float(tp2[0].split()[1]) - float(tp1[0].split()[1])) < 1e-3


QUANT_RECIPES = {
    "w8a16": ["--use_weight_only", "--weight_only_precision", "int8"],
    "w4a16": ["--use_weight_only", "--weight_only_precision", "int4"],
    "w4a16_g32_zp": ["--use_weight_only", "--weight_only_precision", "int4", "--per_group", "--group_size", "32",
                     "--has_zero_point"],
    "gptq": ["--use_weight_only", "--weight_only_precision", "int4_gptq", "--per_group", "--group_size", "32"],
    "awq": ["--use_weight_only", "--weight_only_precision", "int4_awq", "--per_group", "--group_size", "32"],
    "sq_per_token": ["--smoothquant", "0.5", "--per_channel", "--per_token"],
    "sq_static": ["--smoothquant", "0.5", "--per_channel"],
    "sq_per_tensor": ["--smoothquant", "0.5"],
    "int8_kv": ["--int8_kv_cache"],
}


@pytest.mark.parametrize("recipe", list(QUANT_RECIPES))
def test_every_quantization_recipe_at_tp2(recipe, tiny_models, engines, tmp_path):
    """Quantized (and calibrated) on the whole model, then split with its scales: a rank computes
    what its share of the one-rank engine computes. Per-token SmoothQuant quantizes each rank's share
    of a row-parallel input with its own scale (as TensorRT-LLM does), so its logits are close, not
    equal; so are int4 per channel's (onnxruntime's int4 GEMM over a rank's 32 inputs differs from
    it over 64 by up to 2e-3 here, both deterministic)."""
    model, flags = tiny_models["llama"], QUANT_RECIPES[recipe]
    limits = BuildConfig(max_batch_size=4, max_input_len=32, max_seq_len=64)
    one = engines.runner(model, limits, quant=flags)
    want = one.score(PROMPTS)
    engine = tmp_path / "tp2"
    build_engine(engines.checkpoint(model), engine, limits, progress=False, recipe=engines.recipe(flags), tp_size=2)
    got = run_ranks(engine, 2, tmp_path / "out.npz")
    tolerance = {"sq_per_token": 0.05, "w4a16": 1e-2}.get(recipe, 1e-4)
    for b, prompt in enumerate(PROMPTS):
        np.testing.assert_allclose(got["scores_0"][b, :len(prompt)], want[b, :len(prompt)], atol=tolerance, rtol=0)
