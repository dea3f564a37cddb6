"""Ranks: convert --tp_size N --pp_size M → trt-build (an engine per rank) → mpiexec -n N*M: every
rank's logits equal the single-rank engine's and the greedy text is the same; every rank takes the
sampling rank's tokens; a wrong launch or a bad split is one line."""

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

from recipes import QUANT_RECIPES

MPIEXEC = Path(sys.executable).parent / "mpiexec"
WORKER = Path(__file__).with_name("rank_worker.py")
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12], [20, 21, 22], [300, 301, 302, 303, 304]]
NEW_TOKENS = 8

pytestmark = pytest.mark.skipif(not MPIEXEC.is_file(), reason="needs trtbuild[mpi] (mpiexec beside python)")


def build(model_dir: Path, root: Path, tp: int, pp: int = 1) -> Path:
    ckpt, engine = root / f"ckpt-tp{tp}-pp{pp}", root / (f"engine-tp{tp}" + (f"-pp{pp}" if pp > 1 else ""))
    convert_checkpoint(model_dir, ckpt, "float32", progress=False, tp_size=tp, pp_size=pp)
    build_engine(ckpt, engine, BuildConfig(max_batch_size=4, max_input_len=32, max_seq_len=64), progress=False)
    return engine


def run_ranks(engine: Path, ranks: int, out: Path) -> dict[str, np.ndarray]:
    proc = subprocess.run([str(MPIEXEC), "-n", str(ranks), sys.executable, str(WORKER), str(engine), str(out),
                           json.dumps(PROMPTS), str(NEW_TOKENS)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return dict(np.load(out))


FAMILIES = ("llama", "llama3", "qwen2", "mistral", "phi3", "gpt2", "qwen3", "gemma3")


@pytest.mark.parametrize("arch,tp,pp", [(arch, tp, pp) for tp, pp in ((2, 1), (1, 2), (2, 2)) for arch in FAMILIES]
                         + [("llama_tp3", 3, 1), ("gemma3", 1, 3)])
def test_multi_rank_engine_equals_one_rank(arch, tp, pp, tiny_models, tmp_path):
    """tp: llama3 has one KV head (each rank repeats it), llama_tp3 a vocabulary 3 does not divide
    (padded lm_head), gpt2 biases on its row-parallel linears (added once), phi3 fused qkv and
    gate_up. pp: the layers over stages (gemma3's 4 over 3: 2, 1, 1, its sliding layers among them),
    gpt2's learned positions on the first stage only; tp x pp: 4 ranks."""
    model = tiny_models[arch]
    one = ModelRunner.from_dir(build(model, tmp_path, 1), num_threads=1)
    want_scores = one.score(PROMPTS)
    want_tokens = one.generate(PROMPTS, SamplingConfig(max_new_tokens=NEW_TOKENS, end_id=-1)).output_ids
    engine = build(model, tmp_path, tp, pp)
    ranks = tp * pp
    assert sorted(p.name for p in engine.glob("rank*.engine")) == [f"rank{r}.engine" for r in range(ranks)]
    got = run_ranks(engine, ranks, tmp_path / "out.npz")
    for rank in range(ranks):
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


def test_pp_split_gives_each_stage_its_layers(tiny_models, tmp_path):
    """gemma3's 4 layers over 3 stages: 2, 1, 1, numbered from 0 in each stage's file; the embedding
    on the first stage only, the final norm and lm_head (untied) on the last only."""
    from safetensors.numpy import load_file

    ckpt = tmp_path / "ckpt"
    convert_checkpoint(tiny_models["gemma3"], ckpt, "float32", progress=False, pp_size=3)
    assert json.loads((ckpt / "config.json").read_text())["mapping"] == {"world_size": 3, "tp_size": 1, "pp_size": 3}
    files = [load_file(str(ckpt / f"rank{r}.safetensors")) for r in range(3)]
    layers = [sorted({int(k.split(".")[2]) for k in f if k.startswith("transformer.layers.")}) for f in files]
    assert layers == [[0, 1], [0], [0]]
    assert ["transformer.vocab_embedding.weight" in f for f in files] == [True, False, False]
    assert ["lm_head.weight" in f and "transformer.ln_f.weight" in f for f in files] == [False, False, True]
    whole = load_file(str(build_dir_one_rank_ckpt(tiny_models["gemma3"], tmp_path) / "rank0.safetensors"))
    np.testing.assert_array_equal(files[2]["transformer.layers.0.mlp.proj.weight"],
                                  whole["transformer.layers.3.mlp.proj.weight"])
    np.testing.assert_array_equal(files[2]["lm_head.weight"], whole["transformer.vocab_embedding.weight"])


def build_dir_one_rank_ckpt(model_dir: Path, root: Path) -> Path:
    ckpt = root / "one-rank-ckpt"
    convert_checkpoint(model_dir, ckpt, "float32", progress=False)
    return ckpt


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


def test_bad_splits_are_one_line(tiny_models, engines, tmp_path):
    with pytest.raises(TrtbuildError, match="tp_size 3 does not divide the model's 4 attention heads"):
        convert_checkpoint(tiny_models["llama"], tmp_path / "c3", "float32", progress=False, tp_size=3)
    with pytest.raises(TrtbuildError, match="pp_size 3 exceeds the model's 2 layers"):
        convert_checkpoint(tiny_models["llama"], tmp_path / "p3", "float32", progress=False, pp_size=3)
    with pytest.raises(TrtbuildError, match="tp_size 2 gives each rank 32 of attention.dense's 64 inputs, not a "
                                            "multiple of --group_size 64"):
        build_engine(build_dir_one_rank_ckpt(tiny_models["llama"], tmp_path), tmp_path / "q", BuildConfig(
            max_input_len=32, max_seq_len=64), progress=False, tp_size=2, recipe=engines.recipe(
            ["--use_weight_only", "--weight_only_precision", "int4", "--per_group", "--group_size", "64"]))
    assert not (tmp_path / "q").exists()
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
        build_engine(tmp_path / "ckpt-tp2-pp1", tmp_path / "x", BuildConfig(max_input_len=32, max_seq_len=64), tp_size=3)


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 1), (3, 1), (1, 2)])
def test_smollm2_ranks(tp, pp, real_model_dir, tmp_path):
    """SmolLM2-135M (9 heads, 3 KV heads, 30 layers): tp 2 does not divide its heads (one line); tp 3
    and pp 2 give one rank's logits and greedy tokens."""
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
    engine = build(real_model_dir, tmp_path, tp, pp)
    proc = subprocess.run([str(MPIEXEC), "-n", str(tp * pp), sys.executable, str(WORKER), str(engine),
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



def test_int4_lm_head_at_tp2(tiny_models, engines, tmp_path):
    """--lm_head_precision int4 over 2 ranks: each quantizes its vocabulary rows alone, which are the
    one-rank engine's rows, so the gathered logits are the one-rank engine's."""
    model, flags = tiny_models["llama"], QUANT_RECIPES["w4a16"]
    limits = BuildConfig(max_batch_size=4, max_input_len=32, max_seq_len=64, lm_head_precision="int4")
    want = engines.runner(model, limits, quant=flags).score(PROMPTS)
    engine = tmp_path / "tp2"
    build_engine(engines.checkpoint(model), engine, limits, progress=False, recipe=engines.recipe(flags), tp_size=2)
    got = run_ranks(engine, 2, tmp_path / "out.npz")
    for b, prompt in enumerate(PROMPTS):
        np.testing.assert_allclose(got["scores_0"][b, :len(prompt)], want[b, :len(prompt)], atol=1e-2, rtol=0)


LONG_RUN = """
import os, sys
from pathlib import Path
from trtbuild.runtime import ModelRunner, SamplingConfig
runner = ModelRunner.from_dir(sys.argv[1])
Path(sys.argv[2], f"rank{runner.world.rank}.pid").write_text(str(os.getpid()))
while True:  # until a rank is ended
    runner.generate([[5, 6, 7]], SamplingConfig(max_new_tokens=40, end_id=-1))
"""


@pytest.mark.parametrize("how", ["kill one rank", "ctrl-c"])
def test_one_rank_ending_ends_every_rank(how, tiny_models, tmp_path):
    """A rank that dies (or Ctrl-C to mpiexec) ends the whole run: no rank waits forever in a
    collective for it."""
    import os
    import signal
    import time

    engine = build(tiny_models["llama"], tmp_path, 2)
    proc = subprocess.Popen([str(MPIEXEC), "-n", "2", sys.executable, "-c", LONG_RUN, str(engine), str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"rank{r}.pid").is_file() for r in range(2)):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
            time.sleep(0.2)
        time.sleep(1)  # mid-generation
        if how == "ctrl-c":
            proc.send_signal(signal.SIGINT)
        else:
            os.kill(int((tmp_path / "rank1.pid").read_text()), signal.SIGKILL)
        assert proc.wait(timeout=60) != 0
        for r in range(2):  # and no rank is left behind (a zombie has ended)
            stat = Path(f"/proc/{(tmp_path / f'rank{r}.pid').read_text()}/stat")
            assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"
    finally:
        if proc.poll() is None:
            proc.kill()


BATCHER_RUN = """
import json, sys, time
from trtbuild.runtime import ModelRunner, SamplingConfig
from trtbuild.runtime.batcher import InflightBatcher, follow
runner = ModelRunner.from_dir(sys.argv[1])
prompts = json.loads(sys.argv[3])
if runner.world.is_leader:
    batcher = InflightBatcher(runner)
    handles = []
    for p in prompts:  # requests arriving while others decode
        handles.append(batcher.submit(p, SamplingConfig(max_new_tokens=12, end_id=-1)))
        time.sleep(0.02)
    doomed = batcher.submit(prompts[0], SamplingConfig(max_new_tokens=50, end_id=-1))
    next(doomed.stream())
    doomed.cancel()
    results = [h.result(timeout=120) for h in handles]
    late = batcher.submit(prompts[1], SamplingConfig(max_new_tokens=12, end_id=-1)).result(timeout=120)
    batcher.shutdown()
    with open(sys.argv[2], "w") as f:
        json.dump({"results": results, "late": late, "doomed": doomed.finish_reason}, f)
else:
    follow(runner)
"""


def test_inflight_batcher_over_ranks(tiny_models, tmp_path):
    """Rank 0 runs the in-flight batcher, the other rank follows it step for step: requests that join
    a running batch, one cancelled mid-stream and one after the batch emptied give the one-rank
    engine's greedy tokens, and shutdown ends the follower."""
    model = tiny_models["llama"]
    one = ModelRunner.from_dir(build(model, tmp_path, 1), num_threads=1)
    want = [one.generate([p], SamplingConfig(max_new_tokens=12, end_id=-1)).output_ids[0] for p in PROMPTS]
    engine = build(model, tmp_path, 2)
    out = tmp_path / "batcher.json"
    proc = subprocess.run([str(MPIEXEC), "-n", "2", sys.executable, "-c", BATCHER_RUN, str(engine), str(out),
                           json.dumps(PROMPTS)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["results"] == want and got["late"] == want[1] and got["doomed"] == "cancelled"


def test_summarize_on_ranks_reports_once(tiny_models, tmp_path):
    """summarize.py under mpiexec: every rank runs the engine side, rank 0 alone reports and writes;
    its ROUGE, outputs and perplexity equal the one-rank engine's."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"id": i, "article": f"The council met on day {i} to discuss the park. "
                                        "Residents asked for more trees.", "highlights": "Council met."}) + "\n"
                            for i in range(4)))

    def summarize(engine: Path, ranks: int, out: Path) -> subprocess.CompletedProcess:
        cmd = [str(Path(sys.executable).parent / "trtbuild-summarize"), "--engine_dir", str(engine), "--dataset_file",
               str(data), "--max_ite", "2", "--batch_size", "2", "--max_input_length", "24", "--output_len", "6",
               "--eval_ppl", "--no_progress", "--output_dir", str(out)]
        proc = subprocess.run([str(MPIEXEC), "-n", str(ranks), *cmd] if ranks > 1 else cmd, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    tp2 = summarize(build(tiny_models["llama"], tmp_path, 2), 2, tmp_path / "tp2")
    summarize(build(tiny_models["llama"], tmp_path, 1), 1, tmp_path / "tp1")
    assert tp2.stdout.count("(total latency:") == 1 and tp2.stdout.count("samples (seed") == 1  # rank 0 alone
    got, want = (json.loads((tmp_path / d / "metrics.json").read_text())["engine"] for d in ("tp2", "tp1"))
    assert got["rouge1"] == want["rouge1"] and abs(got["perplexity"] - want["perplexity"]) < 1e-3
    outputs = [(tmp_path / d / "engine_outputs.jsonl").read_text() for d in ("tp2", "tp1")]
    assert outputs[0] == outputs[1]


LORA_RUN = """
import json, sys
import numpy as np
from trtbuild.runtime import ModelRunner, SamplingConfig
runner = ModelRunner.from_dir(sys.argv[1])
runner.add_lora(sys.argv[3])  # task id 1, added to the running engine on every rank
prompts = json.loads(sys.argv[4])
got = {f"scores_{t}": runner.score(prompts, lora_task_ids=[t] * len(prompts)) for t in (-1, 0, 1)}
got["mixed"] = runner.generate(prompts, SamplingConfig(max_new_tokens=8, end_id=-1), lora_task_ids=[0, 1, -1]).output_ids
if runner.world.is_leader:
    np.savez(sys.argv[2], **{k: np.array(v) for k, v in got.items()})
"""


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_runtime_lora_on_ranks(tp, pp, tiny_models, tmp_path):
    """The lora plugin on a multi-rank engine: each rank holds its share of every adapter (B's rows
    of a column-parallel module, A's columns of a row-parallel one, its stage's layers); an adapter
    stored at build and one added to the running engine give the one-rank engine's logits and tokens,
    per request in a mixed batch."""
    from trtbuild.convert.lora import make_peft_adapter
    from trtbuild.engine import LoraConfig

    model = tiny_models["llama"]
    stored = make_peft_adapter(model, tmp_path / "stored", r=4, seed=1)
    added = make_peft_adapter(model, tmp_path / "added", r=2, seed=2, target_modules=["q_proj", "v_proj", "down_proj"])
    limits = BuildConfig(max_batch_size=4, max_input_len=32, max_seq_len=64,
                         lora_config=LoraConfig(lora_dir=(str(stored),), max_lora_rank=4))
    ckpt = tmp_path / "ckpt"
    convert_checkpoint(model, ckpt, "float32", progress=False)
    for ranks, (t, p) in ((1, (1, 1)), (tp * pp, (tp, pp))):
        engine = tmp_path / f"engine{ranks}"
        build_engine(ckpt, engine, limits, progress=False, tp_size=t, pp_size=p)
        cmd = [sys.executable, "-c", LORA_RUN, str(engine), str(tmp_path / f"out{ranks}.npz"), str(added),
               json.dumps(PROMPTS)]
        if ranks == 1:  # a one-rank engine has no MPI world: run it as a plain process
            cmd[2] = LORA_RUN.replace("if runner.world.is_leader:", "if True:")
        proc = subprocess.run([str(MPIEXEC), "-n", str(ranks), *cmd] if ranks > 1 else cmd, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, many = (dict(np.load(tmp_path / f"out{n}.npz")) for n in (1, tp * pp))
    for t in (-1, 0, 1):
        for b, prompt in enumerate(PROMPTS):
            np.testing.assert_allclose(many[f"scores_{t}"][b, :len(prompt)], one[f"scores_{t}"][b, :len(prompt)],
                                       atol=1e-4, rtol=0)
    assert not np.allclose(one["scores_0"], one["scores_-1"], atol=1e-3)  # the adapters do change the logits
    assert many["mixed"].tolist() == one["mixed"].tolist()


def test_tensorrt_backend_refuses_ranks_in_one_line(tiny_models, tmp_path):
    ckpt = tmp_path / "ckpt"
    convert_checkpoint(tiny_models["llama"], ckpt, "float32", progress=False, tp_size=2)
    with pytest.raises(TrtbuildError, match="multi-rank engines are built for the onnxruntime backend"):
        build_engine(ckpt, tmp_path / "e", BuildConfig(max_input_len=32, max_seq_len=64, backend="tensorrt"),
                     progress=False)
    assert not (tmp_path / "e").exists()


def test_workers_build_the_same_rank_engines(tiny_models, tmp_path):
    """trt-build --workers 2 builds two ranks at once: the same weights in every rank's engine as one
    at a time, and an engine that runs alike."""
    from trtbuild.cli.build import main as build_main

    ckpt = tmp_path / "ckpt"
    convert_checkpoint(tiny_models["gemma3"], ckpt, "float32", progress=False, tp_size=2, pp_size=2)
    for workers in (1, 2):
        build_main(["--checkpoint_dir", str(ckpt), "--output_dir", str(tmp_path / f"w{workers}"), "--workers",
                    str(workers), "--max_batch_size", "4", "--max_input_len", "32", "--max_seq_len", "64"])
    for rank in range(4):
        name = f"rank{rank}.engine.data"
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes()
    a, b = (run_ranks(tmp_path / f"w{w}", 4, tmp_path / f"w{w}.npz") for w in (1, 2))
    assert np.array_equal(a["scores_0"], b["scores_0"])
    with pytest.raises(TrtbuildError, match="--workers 0 must be at least 1"):
        build_engine(ckpt, tmp_path / "w0", BuildConfig(max_input_len=32, max_seq_len=64), workers=0)


SPAWN_RUN = """
import sys, time
from trtbuild.runtime import InflightBatcher, ModelRunner, SamplingConfig
runner = ModelRunner.from_dir(sys.argv[1], spawn_ranks=True)
batcher = InflightBatcher(runner)
print(batcher.submit([5, 6, 7], SamplingConfig(max_new_tokens=4, end_id=-1)).result(timeout=60), flush=True)
if sys.argv[2] == "hang":
    time.sleep(600)  # killed by the test
"""


def _followers(engine: Path) -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
            state = (cmdline.parent / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"trtbuild.runtime.follower" in args and str(engine).encode() in args and state != "Z":
            pids.append(int(cmdline.parent.name))
    return pids


@pytest.mark.parametrize("how", ["exit without shutdown", "killed"])
def test_spawned_ranks_end_with_rank_0(how, tiny_models, tmp_path):
    """A process that spawned the other ranks (a server) and ends without shutting its batcher down,
    or is killed, leaves no rank behind; none spins while it waits."""
    import signal
    import time

    engine = build(tiny_models["llama"], tmp_path, 2)
    proc = subprocess.Popen([sys.executable, "-c", SPAWN_RUN, str(engine), "exit" if how != "killed" else "hang"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("[")  # served a request with its spawned rank
    assert _followers(engine)
    if how == "killed":
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    deadline = time.monotonic() + 20
    while _followers(engine):
        assert time.monotonic() < deadline, f"ranks left behind: {_followers(engine)}"
        time.sleep(0.2)
