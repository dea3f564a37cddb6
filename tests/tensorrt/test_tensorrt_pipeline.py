"""`trt-build --backend tensorrt` end to end: checkpoint -> engine dir -> parser-level equality.

No GPU here. What is proven instead of running the engine: the network TensorRT compiled (the
kept rank0.onnx, after prepare_onnx_for_tensorrt) is run by polygraphy's onnxrt runner (`polygraphy
run --onnxrt`, graph optimizations off, so the graph runs as written) on the same inputs as the
fused onnxruntime engine, whose logits are saved as polygraphy's reference outputs and compared.
A prefill (every valid position of two right-padded prompts) and one decode step (past KV from
the prefill: the KV concat and mask path) are compared.

Tolerances (polygraphy passes an element when |diff| <= atol OR |diff|/|ref| <= rtol; we set rtol
0, so atol bounds every logit):
- float16 vs the fused float32 engine: atol 0.25 on logits up to ~35 (SmolLM2-135M; measured max
  0.045, mean 0.008), every position's argmax equal.
- int4 vs the fused engine: MatMulNBits runs with accuracy_level 4, i.e. it quantizes activations
  to int8 per block, which the DequantizeLinear -> MatMul form does not: atol 4.0 and mean |diff|
  < 1.0 (measured: per-channel max 2.8 / mean 0.27 / argmax equal on 97% of positions; per-group 64
  max 2.1 / mean 0.56 / argmax 58%: the fused engine is the one that moves, it agrees on 55% of
  argmaxes with the same weights dequantized to float32, and the TensorRT network on 97%).
  So the same polygraphy outputs are also checked tightly against the float32 standard-op engine
  (the DequantizeLinear -> MatMul form as written, which tests/builder/test_plugins.py proves equal to the
  fused one up to that int8 rounding): max |diff| < 0.25 (measured 0.05), argmax equal on >= 97%.
- tiny random models (logits ~1), every recipe TensorRT builds, vs the fused engine: atol 0.03
  (measured max 0.011, SmoothQuant).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from trtbuild.backends import tensorrt as tb
from trtbuild.backends.tensorrt import probe
from trtbuild.builder import build_engine
from trtbuild.cli.build import main as build_main
from trtbuild.engine import BuildConfig, PluginConfig, load_engine_config
from trtbuild.errors import TrtbuildError
from trtbuild.runtime.model_runner import ModelRunner, load_tokenizer
from trtbuild.runtime.sampling import SamplingConfig
from trtbuild.runtime.tensorrt_session import TensorRTStepSession

from tensorrt_markers import GPU, GPU_WHY, PACKAGE, needs_polygraphy, needs_trt, no_gpu_only, trt
from tensorrt_tools import polygraphy_compare


TINY_LIMITS = dict(max_batch_size=2, max_input_len=32, max_seq_len=64)
REAL_LIMITS = dict(max_batch_size=4, max_input_len=256, max_seq_len=512)
TEXTS = ["The capital of France is",
         "Once upon a time, in a small village by the sea, there lived an old fisherman who"]


def limit_args(limits: dict) -> list[str]:
    return [a for k, v in limits.items() for a in (f"--{k}", str(v))]


def convert(model_dir: Path, out: Path, *flags: str) -> Path:
    from trtbuild.convert.cli import main as convert_main

    convert_main(["--model_dir", str(model_dir), "--output_dir", str(out), "--force", *flags])
    return out


def trt_build(*argv: str) -> None:
    build_main(list(argv))


def cli_error(capsys, main, *argv: str) -> str:
    """Run a cli_entry main(argv) that must fail: exit 2 and one line on stderr; returns that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def trt_build_error(capsys, ckpt: Path, out: Path, *flags: str, limits: dict | None = TINY_LIMITS) -> str:
    """The one error line of `trt-build --backend tensorrt` on ckpt (limits=None: flags give them)."""
    return cli_error(capsys, build_main, "--checkpoint_dir", str(ckpt), "--output_dir", str(out),
                     "--backend", "tensorrt", *flags, *(limit_args(limits) if limits else []))


def nothing_written(out: Path) -> None:
    assert not out.exists(), f"{out} was written"
    assert not [p.name for p in out.parent.iterdir() if ".partial" in p.name and out.name in p.name]


# ------------------------------------------------------------------------------------ parity
def prompts_for(ckpt: Path, max_len: int) -> list[list[int]]:
    tok = load_tokenizer(ckpt / "tokenizer")
    return [tok.encode(t).ids[:max_len] for t in TEXTS]


def prefill_inputs(prompts: list[list[int]]):
    """Right-padded batch; logits at every valid position (padded positions repeat the row's last)."""
    lengths = np.array([len(p) for p in prompts], np.int64)
    ids = np.zeros((len(prompts), int(lengths.max())), np.int64)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = p
    pos = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy()
    picks = np.minimum(pos, (lengths - 1)[:, None])
    mask = (pos < lengths[:, None]).astype(np.int64)
    return ids, pos, picks, mask, lengths


def standard_feeds(onnx_path: Path, ids, pos, picks, mask, past: dict[str, np.ndarray] | None = None):
    """The standard-op network's inputs; empty past KV of the network's own KV dtype."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    feeds = {"input_ids": ids, "position_ids": pos, "logits_positions": picks, "attention_mask": mask}
    for vi in model.graph.input:
        if vi.name.startswith("past_key_values."):
            dims = vi.type.tensor_type.shape.dim
            dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
            shape = (ids.shape[0], dims[1].dim_value, 0, dims[3].dim_value)
            feeds[vi.name] = past[vi.name] if past else np.zeros(shape, dtype)
    return feeds


def unoptimized_session(onnx_path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])


def diff_stats(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    d = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    rel = d / np.maximum(np.abs(ref.astype(np.float64)), 1e-3)
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean()), "p999_rel": float(np.quantile(rel, 0.999)),
            "max_rel": float(rel.max()), "argmax_agree": float(np.mean(got.argmax(-1) == ref.argmax(-1))),
            "ref_absmax": float(np.abs(ref).max())}


def polygraphy_check(onnx_path: Path, feeds: dict, reference: np.ndarray, atol: float, save_dir: Path):
    """polygraphy run --onnxrt against the saved reference logits; (passed, summary, its logits)."""
    ok, summary = polygraphy_compare(onnx_path, feeds, {"logits": reference}, rtol=0.0, atol=atol,
                                        save_dir=save_dir)
    assert (save_dir / "reference.json").is_file() and (save_dir / "inputs.json").is_file()
    from polygraphy.comparator import RunResults

    got = RunResults.load(str(save_dir / "outputs.json"))[0][1][0]["logits"] if (save_dir / "outputs.json").is_file() \
        else None
    return ok, summary, got


def fused_vs_tensorrt_network(ckpt: Path, trt_dir: Path, work: Path, limits: dict, atol: float,
                              decode: bool = True) -> dict[str, dict[str, float]]:
    """Fused onnxruntime engine (the reference) vs the network TensorRT compiled, through polygraphy."""
    ort_dir = work / "ort_fused"
    build_engine(ckpt, ort_dir, BuildConfig(**limits), progress=False, force=True)
    runner = ModelRunner.from_dir(ort_dir, num_threads=2)
    prompts = prompts_for(ckpt, limits["max_input_len"])
    ids, pos, picks, mask, lengths = prefill_inputs(prompts)
    batch = len(prompts)
    ref = runner.step(ids, pos, picks, lengths)  # shared KV cache, slots [0, batch)
    onnx_path = trt_dir / "rank0.onnx"
    feeds = standard_feeds(onnx_path, ids, pos, picks, mask)
    ok, summary, got = polygraphy_check(onnx_path, feeds, ref, atol, work / "polygraphy_prefill")
    stats = {"prefill": {**diff_stats(ref, got), "passed": ok}}
    assert ok, summary
    if decode:
        nxt = ref[np.arange(batch), lengths - 1].argmax(-1).astype(np.int64)[:, None]
        ref_dec = runner.step(nxt, lengths[:, None], np.zeros((batch, 1), np.int64), lengths + 1)
        sess = unoptimized_session(onnx_path)
        names = [o.name for o in sess.get_outputs()]
        presents = dict(zip(names, sess.run(None, feeds)))
        past = {n.replace("present.", "past_key_values."): v for n, v in presents.items() if n.startswith("present.")}
        dec_feeds = standard_feeds(onnx_path, nxt, lengths[:, None].copy(), np.zeros((batch, 1), np.int64),
                                   np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1), past)
        ok, summary, got_dec = polygraphy_check(onnx_path, dec_feeds, ref_dec, atol, work / "polygraphy_decode")
        stats["decode"] = {**diff_stats(ref_dec, got_dec), "passed": ok}
        assert ok, summary
    stats["_arrays"] = {"feeds": feeds, "ref": ref, "got": got}  # type: ignore[assignment]
    return stats


def report(name: str, stats: dict) -> None:
    for phase, s in stats.items():
        if not phase.startswith("_"):
            print(f"\n[{name}] {phase}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                   for k, v in s.items()))


# ---------------------------------------------------------------------- tiny models, all recipes
TINY_RECIPES = {
    "fp32->fp16": [],
    "w8a16": ["--use_weight_only", "--weight_only_precision", "int8"],
    "w4a16_g32": ["--use_weight_only", "--weight_only_precision", "int4", "--per_group", "--group_size", "32"],
    "awq_g32": ["--use_weight_only", "--weight_only_precision", "int4_awq", "--per_group", "--group_size", "32"],
    "sq_per_token": ["--smoothquant", "0.5", "--per_channel", "--per_token"],
    "sq_per_tensor": ["--smoothquant", "0.5"],
    "int8_kv": ["--int8_kv_cache"],
}


@needs_trt
@needs_polygraphy
@pytest.mark.parametrize("recipe", list(TINY_RECIPES))
def test_tiny_recipe_builds_and_matches_fused_engine(recipe, tiny_models, calib_file, tmp_path):
    flags = TINY_RECIPES[recipe]
    calib = ["--calib_dataset", str(calib_file), "--calib_size", "4", "--calib_max_seq_length", "64"]
    ckpt = convert(tiny_models["llama"], tmp_path / "ckpt", *flags, *(calib if flags else []))
    trt_build("--checkpoint_dir", str(ckpt), "--output_dir", str(tmp_path / "trt"), "--backend", "tensorrt",
              "--keep_onnx", *limit_args(TINY_LIMITS))
    cfg = json.loads((tmp_path / "trt" / "config.json").read_text())
    assert cfg["build_config"]["backend"] == "tensorrt" and cfg["build_config"]["compute_dtype"] == "float16"
    assert (tmp_path / "trt" / "rank0.engine").read_bytes()[:4] == b"vtrt" or PACKAGE != "tensorrt_rtx"
    stats = fused_vs_tensorrt_network(ckpt, tmp_path / "trt", tmp_path, TINY_LIMITS, atol=0.03,
                                      decode=recipe in ("fp32->fp16", "int8_kv"))
    report(recipe, stats)
    assert stats["prefill"]["argmax_agree"] == 1.0


@needs_trt
@needs_polygraphy
def test_int4_lm_head_builds_and_matches_fused_engine(tiny_models, tmp_path):
    """--lm_head_precision int4 on the tensorrt backend: lm_head as a blocked INT4 DequantizeLinear,
    the network TensorRT compiled agreeing with the fused onnxruntime engine built alike."""
    ckpt = convert(tiny_models["llama"], tmp_path / "ckpt", *TINY_RECIPES["w4a16_g32"])
    limits = {**TINY_LIMITS, "lm_head_precision": "int4"}
    trt_build("--checkpoint_dir", str(ckpt), "--output_dir", str(tmp_path / "trt"), "--backend", "tensorrt",
              "--keep_onnx", *limit_args(limits))
    assert json.loads((tmp_path / "trt" / "config.json").read_text())["build_config"]["lm_head_precision"] == "int4"
    stats = fused_vs_tensorrt_network(ckpt, tmp_path / "trt", tmp_path, limits, atol=0.03, decode=False)
    report("int4 lm_head", stats)
    assert stats["prefill"]["argmax_agree"] == 1.0


@needs_trt
def test_engine_dir_records_build_info_and_verbose_log_has_layers(tiny_models, tmp_path, caplog):
    ckpt = convert(tiny_models["llama"], tmp_path / "ckpt", "--use_weight_only", "--weight_only_precision", "int4")
    caplog.set_level(logging.DEBUG, logger="trtbuild")
    build = BuildConfig(backend="tensorrt", trt_compute_capabilities=["SM86", "SM89"], **TINY_LIMITS)
    build_engine(ckpt, tmp_path / "trt", build, progress=False)
    cfg = load_engine_config(tmp_path / "trt")
    info = cfg.built_by["tensorrt"]["rank0"]
    assert info["package"] == PACKAGE and info["version"] == trt.__version__
    assert info["recipe"] == "float16, int4 weight-only W4A16 (symmetric, per-channel)"
    assert info["engine_bytes"] == (tmp_path / "trt" / "rank0.engine").stat().st_size
    assert info["engine_layers"] > 0 and info["build_seconds"] > 0
    if PACKAGE == "tensorrt_rtx":
        assert info["header"]["compute_capabilities"] == ["SM86", "SM89"]
    assert any("float32 initializers" in r for r in info["onnx_rewrites"])  # int4 scales written in float16
    kv = [t for t in info["inputs"] if t["name"] == "past_key_values.{i}.key"]
    assert kv and kv[0]["count"] == 2 and kv[0]["profile"]["max"][2] == TINY_LIMITS["max_seq_len"] - 1
    assert "/.trt.partial" not in json.dumps(cfg.built_by)  # no temporary paths
    assert sorted(p.name for p in (tmp_path / "trt").iterdir()) == ["config.json", "rank0.engine", "tokenizer"]
    text = caplog.text
    assert "polygraphy inspect model rank0.engine --show layers" in text
    assert "engine layers from the TensorRT builder" in text
    if not GPU:
        assert "needs an NVIDIA GPU" in text


@needs_trt
def test_quantize_at_build_with_tensorrt(tiny_models, tmp_path, capsys):
    """trt-build's own quantization flags (floating-point checkpoint) with --backend tensorrt."""
    ckpt = convert(tiny_models["llama"], tmp_path / "ckpt")
    trt_build("--checkpoint_dir", str(ckpt), "--output_dir", str(tmp_path / "trt"), "--backend", "tensorrt",
              "--use_weight_only", "--weight_only_precision", "int4", "--per_group", "--group_size", "32",
              *limit_args(TINY_LIMITS))
    cfg = load_engine_config(tmp_path / "trt")
    assert cfg.pretrained_config.quantization.quant_algo == "W4A16"
    assert cfg.built_by["tensorrt"]["rank0"]["recipe"] == "float16, int4 weight-only W4A16 (symmetric, per-group 32)"
    assert "built in" in capsys.readouterr().out


# --------------------------------------------------------------------------------- bad input
@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the builder starts writing a network or quantizing."""
    import trtbuild.builder as builder

    def forbidden(*a, **k):
        raise AssertionError("the builder did work before refusing")

    monkeypatch.setattr(builder, "build_network", forbidden)
    monkeypatch.setattr(builder, "quantize_at_build", forbidden)


def test_tensorrt_not_installed_says_which_package(tiny_models, tmp_path, monkeypatch, capsys, no_work):
    ckpt = convert(tiny_models["llama"], tmp_path / "ckpt")
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    monkeypatch.setattr(probe, "_cached_trt", None)
    out = tmp_path / "trt"
    line = trt_build_error(capsys, ckpt, out)
    assert "needs TensorRT, which is not installed" in line and "pip install tensorrt_rtx" in line
    nothing_written(out)


@needs_trt
def test_asymmetric_int4_is_refused_before_any_work(tiny_models, tmp_path, capsys, no_work):
    ckpt = convert(tiny_models["llama"], tmp_path / "ckpt", "--use_weight_only", "--weight_only_precision", "int4",
                   "--has_zero_point")
    out = tmp_path / "trt"
    line = trt_build_error(capsys, ckpt, out)
    assert "int4 weight-only W4A16 (asymmetric, per-channel)" in line and "zero zero-points" in line
    assert "--has_zero_point" in line and "--backend onnxruntime" in line
    nothing_written(out)


@needs_trt
def test_asymmetric_recipe_at_build_is_refused_before_quantizing(tiny_models, tmp_path, capsys, no_work):
    ckpt = convert(tiny_models["llama"], tmp_path / "ckpt")
    out = tmp_path / "trt"
    line = trt_build_error(capsys, ckpt, out, "--use_weight_only", "--weight_only_precision", "int4",
                           "--has_zero_point")
    assert "asymmetric" in line and "W4A16" in line
    nothing_written(out)


@needs_trt
def test_bfloat16_checkpoint_is_refused_before_any_work(tiny_models, tmp_path, capsys, no_work):
    ckpt = convert(tiny_models["llama"], tmp_path / "ckpt", "--dtype", "bfloat16")
    out = tmp_path / "trt"
    line = trt_build_error(capsys, ckpt, out)
    assert "bfloat16" in line and "--dtype float16" in line
    nothing_written(out)


@needs_trt
def test_bad_compute_capability_is_refused_before_any_work(tiny_models, tmp_path, capsys, no_work):
    ckpt = convert(tiny_models["llama"], tmp_path / "ckpt")
    out = tmp_path / "trt"
    line = trt_build_error(capsys, ckpt, out, "--trt_compute_capabilities", "SM90")
    assert "'SM90' is not a tensorrt_rtx target" in line or PACKAGE != "tensorrt_rtx"
    nothing_written(out)


def test_group_size_that_does_not_divide_the_model_is_refused(tiny_models, tmp_path):
    import dataclasses

    from trtbuild.checkpoint import load_config

    config = load_config(convert(tiny_models["llama"], tmp_path / "ckpt"))
    config = dataclasses.replace(config, hidden_size=576, num_attention_heads=9, head_size=64, intermediate_size=1536)
    config.quantization = dataclasses.replace(config.quantization, quant_algo="W4A16", per_group=True, group_size=128)
    with pytest.raises(TrtbuildError, match=r"int4 weight-only W4A16 \(symmetric, per-group 128\): hidden_size 576, "
                                            r"attention output \(heads \* head_size\) 576 is not a multiple"):
        tb.check_tensorrt_recipe(config, BuildConfig(backend="tensorrt", compute_dtype="float16"))
    config.quantization.group_size = 64
    tb.check_tensorrt_recipe(config, BuildConfig(backend="tensorrt", compute_dtype="float16"))


@needs_trt
def test_op_tensorrt_rejects_names_node_and_recipe(tiny_models, tmp_path, capsys, monkeypatch):
    """A fused plugin op slipped into the network (the first: the int8 embedding table's
    GatherBlockQuantized, then MatMulNBits): the parser's refusal names the node and the recipe."""
    from dataclasses import replace

    import trtbuild.builder as builder

    real = builder.network_options
    monkeypatch.setattr(builder, "network_options", lambda build: replace(real(build), fused_gemm=True))
    ckpt = convert(tiny_models["llama"], tmp_path / "ckpt", "--use_weight_only", "--weight_only_precision", "int4")
    out = tmp_path / "trt"
    line = trt_build_error(capsys, ckpt, out)
    assert "rank0 network (float16, int4 weight-only W4A16 (symmetric, per-channel))" in line
    assert "node 'embedding/GatherBlockQuantized' (GatherBlockQuantized)" in line
    assert "--gemm_plugin disable" in line
    nothing_written(out)


@needs_trt
def test_profile_too_large_is_one_clear_line(tiny_models, tmp_path, capsys):
    ckpt = convert(tiny_models["llama"], tmp_path / "ckpt")
    out = tmp_path / "trt"
    line = trt_build_error(capsys, ckpt, out, "--max_batch_size", str(2**28), "--max_input_len", "32",
                           "--max_seq_len", "256", limits=None)
    assert "profile too large" in line and "past_key_values.0.key" in line and "max_batch_size" in line
    nothing_written(out)


# ----------------------------------------------------------------------------------- runtime
@pytest.fixture(scope="module")
def tiny_trt_engine(tiny_models, tmp_path_factory) -> Path:
    if trt is None:
        pytest.skip("TensorRT not installed (pip install tensorrt_rtx==1.7.1.116)")
    root = tmp_path_factory.mktemp("tiny_trt")
    ckpt = convert(tiny_models["llama"], root / "ckpt")
    build_engine(ckpt, root / "trt", BuildConfig(backend="tensorrt", **TINY_LIMITS), progress=False, keep_onnx=True)
    return root / "trt"


@no_gpu_only
def test_model_runner_refuses_tensorrt_engine_without_gpu(tiny_trt_engine):
    with pytest.raises(TrtbuildError) as e:
        ModelRunner.from_dir(tiny_trt_engine)
    msg = str(e.value)
    assert "\n" not in msg
    assert "is a TensorRT engine (tensorrt_rtx" in msg or PACKAGE != "tensorrt_rtx"
    assert "cannot run here" in msg and "NVIDIA GPU" in msg and "--backend onnxruntime" in msg


@no_gpu_only
def test_run_py_exits_2_on_a_tensorrt_engine(tiny_trt_engine, capsys):
    from trtbuild.cli.run import main as run_main

    line = cli_error(capsys, run_main, "--engine_dir", str(tiny_trt_engine), "--input_text", "hello")
    assert "NVIDIA GPU" in line and "--backend onnxruntime" in line


class OnnxruntimeStandIn:
    """Stands in for TensorRTSession (which needs a GPU): runs the engine's own ONNX on the CPU."""

    def __init__(self, onnx_path: Path):
        self.session = unoptimized_session(onnx_path)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.calls = 0

    def run(self, feeds, output_names=None):
        self.calls += 1
        assert sorted(feeds) == sorted(self.input_names), "the runner must feed exactly the engine's inputs"
        names = output_names or self.output_names
        return dict(zip(names, self.session.run(names, feeds)))


def test_runner_drives_the_tensorrt_adapter_with_the_standard_feeds(tiny_trt_engine, monkeypatch):
    """Everything but the GPU: ModelRunner.from_dir's tensorrt branch and TensorRTStepSession's binding,
    with the engine's ONNX on onnxruntime standing in for the TensorRT session. Greedy tokens and
    scores equal those of the onnxruntime standard-form path over the same ONNX."""
    import trtbuild.runtime.tensorrt_session as session_module

    onnx_path = tiny_trt_engine / "rank0.onnx"
    stand_in = OnnxruntimeStandIn(onnx_path)
    monkeypatch.setattr(session_module, "can_run_tensorrt", lambda: (True, "GPU 0: stand-in"))
    monkeypatch.setattr(session_module, "TensorRTSession", lambda path: stand_in)
    runner = ModelRunner.from_dir(tiny_trt_engine)
    assert isinstance(runner.session, TensorRTStepSession) and runner.tokenizer is not None
    reference = ModelRunner(tiny_trt_engine, load_engine_config(tiny_trt_engine), unoptimized_session(onnx_path),
                            runner.tokenizer)
    prompts = [runner.tokenizer.encode(t).ids[:20] for t in TEXTS]
    sampling = SamplingConfig(max_new_tokens=8)
    got, want = runner.generate(prompts, sampling), reference.generate(prompts, sampling)
    assert got.output_ids == want.output_ids and all(len(o) == 8 for o in got.output_ids)
    assert stand_in.calls == 8  # one prefill, seven decode steps
    np.testing.assert_array_equal(runner.score(prompts), reference.score(prompts))


@pytest.mark.skipif(not GPU, reason=f"needs a GPU: {GPU_WHY}")
def test_runner_generates_on_gpu(tiny_trt_engine):  # pragma: no cover - GPU machines only
    runner = ModelRunner.from_dir(tiny_trt_engine)
    reference = ModelRunner(tiny_trt_engine, load_engine_config(tiny_trt_engine),
                            unoptimized_session(tiny_trt_engine / "rank0.onnx"), runner.tokenizer)
    prompts = [runner.tokenizer.encode(t).ids[:20] for t in TEXTS]
    np.testing.assert_allclose(runner.score(prompts), reference.score(prompts), atol=0.03)


# ---------------------------------------------------------------------------- the real model
REAL_RECIPES = {
    "fp16": ["--dtype", "float16"],
    "int4": ["--use_weight_only", "--weight_only_precision", "int4"],
    "int4_g64": ["--use_weight_only", "--weight_only_precision", "int4", "--per_group", "--group_size", "64"],
}


@pytest.mark.slow
@needs_trt
@needs_polygraphy
@pytest.mark.parametrize("recipe", list(REAL_RECIPES))
def test_real_model_builds_and_matches_fused_engine(recipe, real_model_dir, tmp_path, capsys):
    ckpt = convert(real_model_dir, tmp_path / "ckpt", *REAL_RECIPES[recipe])
    out = tmp_path / "trt"
    t0 = time.time()
    trt_build("--checkpoint_dir", str(ckpt), "--output_dir", str(out), "--backend", "tensorrt", "--keep_onnx",
              *limit_args(REAL_LIMITS))
    seconds = time.time() - t0
    summary = capsys.readouterr().out
    engine = out / "rank0.engine"
    assert engine.read_bytes()[:4] == b"vtrt" or PACKAGE != "tensorrt_rtx"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["build_config"]["backend"] == "tensorrt"
    info = cfg["built_by"]["tensorrt"]["rank0"]
    print(f"\n[{recipe}] trt-build {seconds:.1f} s (TensorRT {info['build_seconds']:.1f} s), engine "
          f"{engine.stat().st_size / 2**20:.1f} MiB, {info['recipe']}; {summary.strip().splitlines()[-1]}")
    int4 = recipe.startswith("int4")
    if recipe == "int4":  # per-channel blocks of 32 divide hidden 576 and 1536: no re-blocking
        assert not any("per-channel DequantizeLinear" in r for r in info["onnx_rewrites"]), info["onnx_rewrites"]
        assert "per-channel" in info["recipe"]
    if recipe == "int4_g64":
        assert "per-group 64" in info["recipe"]
    stats = fused_vs_tensorrt_network(ckpt, out, tmp_path, REAL_LIMITS, atol=4.0 if int4 else 0.25)
    arrays = stats.pop("_arrays")
    if int4:
        for phase in ("prefill", "decode"):
            assert stats[phase]["mean_abs"] < 1.0, stats
        # the tight check: the float32 standard-op engine (DequantizeLinear -> MatMul as written)
        plugins = PluginConfig(gemm_plugin="disable", gpt_attention_plugin="disable", norm_plugin="disable")
        build_engine(ckpt, tmp_path / "ort_standard", BuildConfig(plugin_config=plugins, **REAL_LIMITS),
                     progress=False, keep_onnx=True)
        feeds32 = {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in arrays["feeds"].items()}
        std = unoptimized_session(tmp_path / "ort_standard" / "rank0.onnx").run(["logits"], feeds32)[0]
        stats["prefill_vs_fp32_standard"] = diff_stats(std, arrays["got"])
        assert stats["prefill_vs_fp32_standard"]["max_abs"] < 0.25, stats
        assert stats["prefill_vs_fp32_standard"]["argmax_agree"] >= 0.97, stats
    else:
        for phase in ("prefill", "decode"):
            assert stats[phase]["argmax_agree"] == 1.0, stats
    report(recipe, stats)


@needs_trt
@needs_polygraphy
@pytest.mark.parametrize("arch", ["qwen3", "phi3", "gemma3"])
def test_every_family_builds_and_matches_fused_engine(arch, tiny_models, tmp_path):
    """The families added through trtbuild.models compile with TensorRT (fp16) and agree with the
    fused onnxruntime engine: q/k norms, partial rotary and LongRoPE's picked caches, Gemma 3's
    sandwich norms, window mask and second RoPE cache."""
    ckpt = convert(tiny_models[arch], tmp_path / "ckpt")
    trt_build("--checkpoint_dir", str(ckpt), "--output_dir", str(tmp_path / "trt"), "--backend", "tensorrt",
              "--keep_onnx", *limit_args(TINY_LIMITS))
    stats = fused_vs_tensorrt_network(ckpt, tmp_path / "trt", tmp_path, TINY_LIMITS, atol=0.03)
    report(arch, stats)
    assert stats["prefill"]["argmax_agree"] == 1.0
