"""The TensorRT backend on small hand-made ONNX graphs (weights as external data, like the builder's).

Building needs tensorrt_rtx (no GPU); running an engine needs a GPU, so here the standard-op graphs
are checked numerically with polygraphy's onnxrt runner against numpy references instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

from trtbuild.backends import tensorrt as tb
from trtbuild.backends.tensorrt import compile as trt_compile
from trtbuild.backends.tensorrt import probe
from trtbuild.backends.tensorrt.errors import one_line_reason
from trtbuild.engine import BuildConfig
from trtbuild.errors import TrtbuildError
from trtbuild.runtime.tensorrt_session import TensorRTSession

from tensorrt_markers import (GPU, GPU_WHY, HAVE_POLYGRAPHY, PACKAGE, needs_polygraphy, needs_trt, no_gpu_only,
                              trt)
from tensorrt_tools import polygraphy_compare

vi = h.make_tensor_value_info
HQ, HKV, D = 4, 2, 16
K, N, BLOCK = 64, 32, 32


def save(model: onnx.ModelProto, path: Path) -> Path:
    """Save with the weights in external data beside the model (as the network builder does).

    Tiny shape constants stay inline: onnxruntime's shape inference cannot read a Reshape's shape
    from external data (TensorRT can).
    """
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=path.name + ".data", size_threshold=1024)
    return path


def model(nodes, inputs, outputs, inits=(), opset=21, extra_opsets=()):
    g = h.make_graph(nodes, "g", inputs, outputs, list(inits))
    return h.make_model(g, opset_imports=[h.make_opsetid("", opset)] + [h.make_opsetid(d, v) for d, v in extra_opsets])


def matmul_model(rng) -> tuple[onnx.ModelProto, np.ndarray]:
    w = rng.standard_normal((K, N)).astype(np.float16)
    m = model([h.make_node("MatMul", ["x", "W"], ["y"], name="mm0")],
              [vi("x", TP.FLOAT16, ["B", "S", K])], [vi("y", TP.FLOAT16, ["B", "S", N])], [nh.from_array(w, "W")])
    return m, w


XPROF = {"x": ((1, 1, K), (2, 8, K), (4, 32, K))}


def dq_int4_model(rng, zero_point: int | None = None, dtype=TP.INT4, opset=21):
    """Blockwise DequantizeLinear (axis 0 = the K axis, block 32) -> MatMul; returns the dequantized W too."""
    lo, hi = (-8, 8) if dtype == TP.INT4 else (0, 16)
    q = rng.integers(lo, hi, size=(K, N)).astype(np.int8)
    scale = (rng.random((K // BLOCK, N)) * 0.05 + 0.01).astype(np.float16)
    inits = [h.make_tensor("Wq", dtype, [K, N], q.flatten().tolist()), nh.from_array(scale, "Ws")]
    ins = ["Wq", "Ws"]
    zp = 0
    if zero_point is not None:
        zp = zero_point
        inits.append(h.make_tensor("Wz", dtype, [K // BLOCK, N], [zero_point] * (K // BLOCK * N)))
        ins.append("Wz")
    m = model([h.make_node("DequantizeLinear", ins, ["W"], axis=0, block_size=BLOCK, name="dq0"),
               h.make_node("MatMul", ["x", "W"], ["y"], name="mm0")],
              [vi("x", TP.FLOAT16, ["B", "S", K])], [vi("y", TP.FLOAT16, ["B", "S", N])], inits, opset=opset)
    w = (q.astype(np.float32) - zp) * np.repeat(scale.astype(np.float32), BLOCK, axis=0)
    return m, w.astype(np.float16).astype(np.float32)  # DequantizeLinear's output is float16


def attention_model(dtype=TP.FLOAT16, extra_outputs=False):
    """ONNX Attention-23, 4-D GQA (4 q heads, 2 kv heads), past KV concatenated outside, bool mask."""
    ins = [vi("q", dtype, ["B", HQ, "S", D]), vi("k", dtype, ["B", HKV, "S", D]), vi("v", dtype, ["B", HKV, "S", D]),
           vi("past_key", dtype, ["B", HKV, "P", D]), vi("past_value", dtype, ["B", HKV, "P", D]),
           vi("attn_mask", TP.BOOL, ["S", "T"])]
    nodes = [h.make_node("Concat", ["past_key", "k"], ["present_key"], axis=2, name="cat_k"),
             h.make_node("Concat", ["past_value", "v"], ["present_value"], axis=2, name="cat_v"),
             h.make_node("Attention", ["q", "present_key", "present_value", "attn_mask"],
                         ["y"] + (["", "", "qk"] if extra_outputs else []), name="attn0")]
    outs = [vi("y", dtype, ["B", HQ, "S", D]), vi("present_key", dtype, ["B", HKV, "T", D]),
            vi("present_value", dtype, ["B", HKV, "T", D])]
    if extra_outputs:
        outs.append(vi("qk", dtype, ["B", HQ, "S", "T"]))
    return model(nodes, ins, outs, opset=23)


ATTN_PROF = {
    "q": ((1, HQ, 1, D), (2, HQ, 4, D), (4, HQ, 16, D)),
    "k": ((1, HKV, 1, D), (2, HKV, 4, D), (4, HKV, 16, D)),
    "v": ((1, HKV, 1, D), (2, HKV, 4, D), (4, HKV, 16, D)),
    "past_key": ((1, HKV, 0, D), (2, HKV, 8, D), (4, HKV, 32, D)),
    "past_value": ((1, HKV, 0, D), (2, HKV, 8, D), (4, HKV, 32, D)),
    "attn_mask": ((1, 1), (4, 12), (16, 48)),
}


def attention_reference(q, k, v, mask):
    """numpy GQA attention: q head h reads kv head h // (HQ // HKV); mask True = may attend."""
    group = q.shape[1] // k.shape[1]
    k = np.repeat(k.astype(np.float32), group, axis=1)
    v = np.repeat(v.astype(np.float32), group, axis=1)
    s = q.astype(np.float32) @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
    s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return p @ v


def build(tmp_path: Path, m: onnx.ModelProto, profile, name="model", **kw) -> dict:
    onnx_path = save(m, tmp_path / f"{name}.onnx")
    return tb.build_tensorrt_engine(onnx_path, tmp_path / f"{name}.engine", profile, **kw)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# -------------------------------------------------------------------------------------- building
@needs_trt
def test_matmul_fp16_builds_atomically_with_build_info(tmp_path, rng):
    m, _ = matmul_model(rng)
    info = build(tmp_path, m, XPROF, compute_capabilities=["SM89"])
    engine = tmp_path / "model.engine"
    data = engine.read_bytes()
    if PACKAGE == "tensorrt_rtx":
        assert data[:4] == b"vtrt"
        assert info["header"] == {"magic": "vtrt", "package": "tensorrt_rtx", "version": trt.__version__,
                                  "compute_capabilities": ["SM89"]}
    assert info["package"] == PACKAGE and info["version"] == trt.__version__
    assert info["engine_bytes"] == len(data) > 0
    assert info["build_seconds"] >= 0 and info["parse_seconds"] >= 0
    assert info["inputs"][0]["name"] == "x" and info["inputs"][0]["profile"]["max"] == [4, 32, K]
    assert info["outputs"][0]["name"] == "y"
    assert info["network_layer_types"].get("MATRIX_MULTIPLY") == 1
    assert info["engine_layers"], "layer info from the builder's verbose log"
    assert any("mm0" in layer["onnx_nodes"] for layer in info["engine_layers"])
    umask = os.umask(0)
    os.umask(umask)
    assert engine.stat().st_mode & 0o777 == 0o666 & ~umask
    # Nothing but the model, its external data and the engine: no partial file left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.engine", "model.onnx", "model.onnx.data"]


@needs_trt
@pytest.mark.parametrize("zero_point,opset", [(None, 21), (0, 21), (None, 23)])
def test_blockwise_int4_dequantize_matmul_builds(tmp_path, rng, zero_point, opset):
    m, _ = dq_int4_model(rng, zero_point=zero_point, opset=opset)
    info = build(tmp_path, m, XPROF)
    assert (tmp_path / "model.engine").stat().st_size == info["engine_bytes"]
    assert info["network_layer_types"].get("DEQUANTIZE") == 1


@needs_trt
def test_nonzero_int4_zero_point_is_rejected_naming_the_node(tmp_path, rng):
    m, _ = dq_int4_model(rng, zero_point=3)
    with pytest.raises(TrtbuildError) as e:
        build(tmp_path, m, XPROF)
    msg = str(e.value)
    assert "'dq0'" in msg and "DequantizeLinear" in msg and "zero point" in msg and "symmetric" in msg
    assert not (tmp_path / "model.engine").exists()


@needs_trt
def test_uint4_weights_are_rejected_naming_the_initializer(tmp_path, rng):
    m, _ = dq_int4_model(rng, zero_point=8, dtype=TP.UINT4)
    with pytest.raises(TrtbuildError, match=r"initializer 'Wq' \(UINT4\).*signed int4"):
        build(tmp_path, m, XPROF)


@needs_trt
def test_asymmetric_int4_as_zero_point_correction_term_builds(tmp_path, rng):
    """x @ ((q - z) * s) = x @ DQ(q, s) - blocksum(x) @ (z * s): exact, keeps weights packed int4."""
    G = K // BLOCK
    m_sym, w_sym = dq_int4_model(rng)
    zs = (rng.integers(1, 4, size=(G, N)).astype(np.float32) * 0.02).astype(np.float16)
    g = m_sym.graph
    g.initializer.extend([nh.from_array(zs, "ZS"), nh.from_array(np.array([0, 0, G, BLOCK], np.int64), "blk")])
    g.node[1].output[0] = "y_sym"
    g.node.extend([h.make_node("Reshape", ["x", "blk"], ["xb"], name="blk_reshape"),
                   h.make_node("ReduceSum", ["xb", "axes"], ["xsum"], keepdims=0, name="blk_sum"),
                   h.make_node("MatMul", ["xsum", "ZS"], ["corr"], name="zp_corr"),
                   h.make_node("Sub", ["y_sym", "corr"], ["y"], name="zp_sub")])
    g.initializer.append(nh.from_array(np.array([-1], np.int64), "axes"))
    info = build(tmp_path, m_sym, XPROF)
    assert info["engine_bytes"] > 0
    if HAVE_POLYGRAPHY:
        x = rng.standard_normal((2, 3, K)).astype(np.float16)
        xs = x.astype(np.float32).reshape(2, 3, G, BLOCK).sum(-1)
        ref = (x.astype(np.float32) @ w_sym - xs @ zs.astype(np.float32)).astype(np.float16)
        ok, summary = polygraphy_compare(tmp_path / "model.onnx", {"x": x}, {"y": ref}, rtol=1e-2, atol=5e-2)
        assert ok, summary


@needs_trt
def test_attention23_gqa_fp16_with_past_concat_builds(tmp_path):
    info = build(tmp_path, attention_model(), ATTN_PROF, compute_capabilities=["sm_86", "8.9", "SM120"])
    assert info["network_layer_types"].get("ATTENTION_INPUT") == 1
    if PACKAGE == "tensorrt_rtx":
        assert info["header"]["compute_capabilities"] == ["SM86", "SM89", "SM120"]


@needs_trt
def test_attention23_fp32_has_no_kernel(tmp_path):
    with pytest.raises(TrtbuildError, match="no kernel for an Attention node.*float16 or bfloat16"):
        build(tmp_path, attention_model(dtype=TP.FLOAT), ATTN_PROF)


@needs_trt
def test_attention23_with_extra_outputs_is_rejected(tmp_path):
    with pytest.raises(TrtbuildError, match=r"'attn0' \(Attention\).*one output.*outside"):
        build(tmp_path, attention_model(extra_outputs=True), ATTN_PROF)


@needs_trt
@pytest.mark.parametrize("dtype", [TP.FLOAT16, TP.FLOAT])
def test_rmsnormalization23_builds(tmp_path, dtype):
    np_dtype = np.float16 if dtype == TP.FLOAT16 else np.float32
    m = model([h.make_node("RMSNormalization", ["x", "gamma"], ["y"], axis=-1, epsilon=1e-6, name="rms0")],
              [vi("x", dtype, ["B", "S", K])], [vi("y", dtype, ["B", "S", K])],
              [nh.from_array(np.ones(K, np_dtype), "gamma")], opset=23)
    info = build(tmp_path, m, XPROF)
    assert info["engine_bytes"] > 0


@needs_trt
@pytest.mark.parametrize("layout", ["4d", "3d", "4d_interleaved"])
def test_rotaryembedding23_builds(tmp_path, rng, layout):
    max_pos = 128
    shape = ["B", HQ, "S", D] if layout.startswith("4d") else ["B", "S", HQ * D]
    kw = {"num_heads": HQ} if layout == "3d" else {}
    m = model([h.make_node("RotaryEmbedding", ["x", "cos", "sin", "pos"], ["y"], name="rope0",
                           interleaved=int(layout.endswith("interleaved")), **kw)],
              [vi("x", TP.FLOAT16, shape), vi("pos", TP.INT64, ["B", "S"])], [vi("y", TP.FLOAT16, shape)],
              [nh.from_array(rng.random((max_pos, D // 2)).astype(np.float16), "cos"),
               nh.from_array(rng.random((max_pos, D // 2)).astype(np.float16), "sin")], opset=23)
    xs = [(1, HQ, 1, D), (2, HQ, 8, D), (4, HQ, 32, D)] if layout.startswith("4d") else \
        [(1, 1, HQ * D), (2, 8, HQ * D), (4, 32, HQ * D)]
    info = build(tmp_path, m, {"x": tuple(xs), "pos": ((1, 1), (2, 8), (4, 32))})
    assert info["engine_bytes"] > 0


@needs_trt
def test_unsupported_op_names_node_and_op(tmp_path):
    m = model([h.make_node("Relu", ["x"], ["r"], name="relu0"), h.make_node("Unique", ["r"], ["y"], name="uniq0")],
              [vi("x", TP.FLOAT, ["N"])], [vi("y", TP.FLOAT, ["M"])])
    with pytest.raises(TrtbuildError) as e:
        build(tmp_path, m, {"x": ((1,), (2,), (4,))})
    assert "'uniq0' (Unique)" in str(e.value) and "not supported" in str(e.value)


@needs_trt
def test_contrib_op_without_plugin_says_to_disable_the_plugin(tmp_path):
    m = model([h.make_node("MatMulNBits", ["x", "Wq", "Ws"], ["y"], domain="com.microsoft", K=K, N=N, bits=4,
                           block_size=BLOCK, name="mmnb0")],
              [vi("x", TP.FLOAT16, ["B", K])], [vi("y", TP.FLOAT16, ["B", N])],
              [h.make_tensor("Wq", TP.UINT8, [N, K // BLOCK, BLOCK // 2], [0] * (N * K // 2)),
               nh.from_array(np.ones((N, K // BLOCK), np.float16), "Ws")], extra_opsets=[("com.microsoft", 1)])
    onnx_path = tmp_path / "m.onnx"
    onnx.save(m, str(onnx_path))  # contrib op: no onnx.checker
    with pytest.raises(TrtbuildError, match=r"'mmnb0' \(MatMulNBits\).*--gemm_plugin disable"):
        tb.build_tensorrt_engine(onnx_path, tmp_path / "m.engine", {"x": ((1, K), (2, K), (4, K))})


@needs_trt
def test_missing_external_data_names_the_file(tmp_path, rng):
    m, _ = matmul_model(rng)
    onnx_path = save(m, tmp_path / "model.onnx")
    (tmp_path / "model.onnx.data").unlink()
    with pytest.raises(TrtbuildError, match=r"initializer 'W' .*model\.onnx\.data.*beside"):
        tb.build_tensorrt_engine(onnx_path, tmp_path / "model.engine", XPROF)


# ------------------------------------------------------------------------------------- profiles
@needs_trt
@pytest.mark.parametrize("profile,pattern", [
    ({}, "'x' has dynamic shape.*no min/opt/max"),
    ({**XPROF, "y": ((1,), (1,), (1,))}, "names input 'y'.*inputs: x"),
    ({"x": ((1, 1, K), (2, 8, K), (1, 32, K))}, "min <= opt <= max"),
    ({"x": ((1, K), (2, K), (4, K))}, "rank 2"),
    ({"x": ((1, 1, 8), (2, 8, 8), (4, 32, 8))}, "axis 2 is fixed at 64"),
    ({"x": ((1, 1, K), (2, 8, K), (2**20, 2**20, K))}, "profile too large"),
])
def test_bad_profiles_are_refused_before_building(tmp_path, rng, profile, pattern):
    m, _ = matmul_model(rng)
    with pytest.raises(TrtbuildError, match=pattern):
        build(tmp_path, m, profile)
    assert not list(tmp_path.glob("*.engine*")) and not list(tmp_path.glob(".*partial*"))


@needs_trt
def test_memory_pool_too_small_is_a_clear_error(tmp_path):
    with pytest.raises(TrtbuildError, match="ran out of memory.*max_batch_size"):
        build(tmp_path, attention_model(), ATTN_PROF, workspace_bytes=16)


@needs_trt
def test_failed_build_keeps_the_previous_engine(tmp_path, rng):
    m, _ = matmul_model(rng)
    build(tmp_path, m, XPROF)
    before = (tmp_path / "model.engine").read_bytes()
    with pytest.raises(TrtbuildError):
        tb.build_tensorrt_engine(tmp_path / "model.onnx", tmp_path / "model.engine", XPROF, workspace_bytes=0)
    assert (tmp_path / "model.engine").read_bytes() == before
    assert not list(tmp_path.glob(".*partial*"))


@needs_trt
def test_ctrl_c_cancels_the_build_and_writes_nothing(tmp_path, rng, monkeypatch):
    import signal

    m, _ = matmul_model(rng)
    build(tmp_path, m, XPROF)
    before = (tmp_path / "model.engine").read_bytes()
    real = trt_compile._build_to_file

    def interrupted(*args):
        os.kill(os.getpid(), signal.SIGINT)  # caught by the build's handler: TensorRT is asked to stop
        return real(*args)

    monkeypatch.setattr(trt_compile, "_build_to_file", interrupted)
    handler_before = signal.getsignal(signal.SIGINT)  # SIG_IGN when started in the background (nohup ... &)
    with pytest.raises(KeyboardInterrupt):
        tb.build_tensorrt_engine(tmp_path / "model.onnx", tmp_path / "model.engine", XPROF)
    assert (tmp_path / "model.engine").read_bytes() == before
    assert not list(tmp_path.glob(".*partial*"))
    assert signal.getsignal(signal.SIGINT) is handler_before  # the caller's handler is back


def test_profile_from_dim_ranges(tmp_path):
    m = model([h.make_node("Concat", ["past", "x"], ["y"], axis=1, name="cat")],
              [vi("x", TP.FLOAT16, ["batch_size", "sequence_length", 8]),
               vi("past", TP.FLOAT16, ["batch_size", "past_sequence_length", 8])],
              [vi("y", TP.FLOAT16, ["batch_size", "total_sequence_length", 8])])
    p = save(m, tmp_path / "m.onnx")

    build_cfg = BuildConfig(max_batch_size=8, max_input_len=256, max_seq_len=512)
    profile = tb.profile_from_dim_ranges(p, tb.dim_ranges_for_build(build_cfg))
    assert profile == {"x": ((1, 1, 8), (4, 128, 8), (8, 256, 8)), "past": ((1, 0, 8), (4, 256, 8), (8, 511, 8))}
    with pytest.raises(TrtbuildError, match="input 'past' axis 1 is dynamic \\(past_sequence_length\\)"):
        tb.profile_from_dim_ranges(p, {"batch_size": (1, 1, 1), "sequence_length": (1, 1, 1)})


@needs_trt
def test_build_for_engine_dir_takes_the_profile_from_the_build_limits(tmp_path, rng):
    hidden = 16
    m = model([h.make_node("Concat", ["past", "x"], ["present"], axis=1, name="cat"),
               h.make_node("MatMul", ["x", "W"], ["y"], name="mm0")],
              [vi("x", TP.FLOAT16, ["batch_size", "sequence_length", hidden]),
               vi("past", TP.FLOAT16, ["batch_size", "past_sequence_length", hidden])],
              [vi("y", TP.FLOAT16, ["batch_size", "sequence_length", hidden]),
               vi("present", TP.FLOAT16, ["batch_size", "total_sequence_length", hidden])],
              [nh.from_array(rng.standard_normal((hidden, hidden)).astype(np.float16), "W")])
    p = save(m, tmp_path / "rank0.onnx")
    build_cfg = BuildConfig(max_batch_size=4, max_input_len=32, max_seq_len=64, compute_dtype="float16",
                            trt_compute_capabilities=["SM86"])
    info = tb.build_for_engine_dir(p, tmp_path / "rank0.engine", config=None, build=build_cfg)
    prof = {t["name"]: t["profile"] for t in info["inputs"]}
    assert prof["x"] == {"min": [1, 1, hidden], "opt": [2, 16, hidden], "max": [4, 32, hidden]}
    assert prof["past"]["min"] == [1, 0, hidden] and prof["past"]["max"] == [4, 63, hidden]
    if PACKAGE == "tensorrt_rtx":
        assert info["header"]["compute_capabilities"] == ["SM86"]


# ----------------------------------------------------------------------------------------- targets
@needs_trt
def test_compute_capability_names():
    assert tb.normalize_compute_capabilities(["sm_75", "80", "8.6", "SM89", "sm120", "SM121", "89"]) == \
        ["SM75", "SM80", "SM86", "SM89", "SM120", "SM121"]
    assert tb.normalize_compute_capabilities(None) == []
    with pytest.raises(TrtbuildError, match="'SM90' is not a tensorrt_rtx target.*SM75, SM80"):
        tb.normalize_compute_capabilities(["SM90"])
    with pytest.raises(TrtbuildError, match="CURRENT cannot be combined"):
        tb.normalize_compute_capabilities(["current", "SM89"])


@needs_trt
@no_gpu_only
@pytest.mark.skipif(PACKAGE != "tensorrt_rtx", reason="tensorrt_rtx targets")
def test_current_target_needs_a_gpu(tmp_path, rng):
    m, _ = matmul_model(rng)
    with pytest.raises(TrtbuildError, match="CURRENT means the GPU of this machine.*SM75"):
        build(tmp_path, m, XPROF, compute_capabilities=["CURRENT"])


@needs_trt
@pytest.mark.skipif(PACKAGE != "tensorrt_rtx", reason="tensorrt_rtx header")
def test_default_targets_in_header(tmp_path, rng):
    m, _ = matmul_model(rng)
    info = build(tmp_path, m, XPROF)
    assert info["header"]["version"] == trt.__version__
    assert {"SM80", "SM86", "SM89", "SM120"} <= set(info["header"]["compute_capabilities"])
    assert "SM75" not in info["header"]["compute_capabilities"]  # Turing only when asked for


# -------------------------------------------------------------------------------- without TensorRT
def test_tensorrt_missing_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(probe, "tensorrt_available", lambda: (None, "tensorrt: No module named 'tensorrt'"))
    with pytest.raises(TrtbuildError, match="pip install tensorrt_rtx.*pip install tensorrt"):
        tb.build_tensorrt_engine(tmp_path / "m.onnx", tmp_path / "m.engine", {})
    ok, why = tb.can_run_tensorrt()
    assert not ok and "pip install tensorrt_rtx" in why


# ---------------------------------------------------------------------------------------- running
@no_gpu_only
def test_session_refuses_without_gpu_in_one_line(tmp_path):
    ok, why = tb.can_run_tensorrt()
    assert not ok and why and "\n" not in why
    with pytest.raises(TrtbuildError) as e:
        TensorRTSession(tmp_path / "model.engine")
    msg = str(e.value)
    assert "\n" not in msg and "cannot run TensorRT engine" in msg and "--backend onnxruntime" in msg


@pytest.mark.skipif(not GPU, reason=f"needs a GPU: {GPU_WHY}")
def test_session_runs_matmul_on_gpu(tmp_path, rng):  # pragma: no cover - GPU machines only
    m, w = matmul_model(rng)
    build(tmp_path, m, XPROF)
    x = rng.standard_normal((2, 3, K)).astype(np.float16)
    with TensorRTSession(tmp_path / "model.engine") as s:
        y = s.run({"x": x})["y"]
    np.testing.assert_allclose(y.astype(np.float32), x.astype(np.float32) @ w.astype(np.float32), rtol=2e-2, atol=5e-2)


# ------------------------------------------------------------------------------------- polygraphy
@needs_polygraphy
def test_polygraphy_compare_int4_dequantize_matmul(tmp_path, rng):
    m, w = dq_int4_model(rng)
    p = save(m, tmp_path / "dq.onnx")
    x = rng.standard_normal((2, 3, K)).astype(np.float16)
    ref = (x.astype(np.float32) @ w).astype(np.float16)
    # onnxruntime's fp16 MatMul on CPU differs from an fp32 sum by up to ~0.03 here.
    ok, summary = polygraphy_compare(p, {"x": x}, {"y": ref}, rtol=1e-2, atol=5e-2)
    assert ok, summary
    assert "PASSED" in summary
    ok, summary = polygraphy_compare(p, {"x": x}, {"y": ref + np.float16(1)}, rtol=1e-2, atol=5e-2)
    assert not ok and "FAILED" in summary


@needs_polygraphy
def test_polygraphy_compare_attention_gqa_with_past(tmp_path, rng):
    p = save(attention_model(), tmp_path / "attn.onnx")
    B, S, P = 2, 3, 5
    f = lambda *s: rng.standard_normal(s).astype(np.float16)  # noqa: E731
    feeds = {"q": f(B, HQ, S, D), "k": f(B, HKV, S, D), "v": f(B, HKV, S, D),
             "past_key": f(B, HKV, P, D), "past_value": f(B, HKV, P, D),
             "attn_mask": np.arange(P + S)[None, :] <= (P + np.arange(S))[:, None]}  # causal after the past
    kk = np.concatenate([feeds["past_key"], feeds["k"]], axis=2)
    vv = np.concatenate([feeds["past_value"], feeds["v"]], axis=2)
    ref = {"y": attention_reference(feeds["q"], kk, vv, feeds["attn_mask"]).astype(np.float16),
           "present_key": kk, "present_value": vv}
    ok, summary = polygraphy_compare(p, feeds, ref, rtol=1e-2, atol=1e-2)
    assert ok, summary


@needs_polygraphy
def test_polygraphy_compare_reports_a_name_mismatch(tmp_path, rng):
    m, w = matmul_model(rng)
    p = save(m, tmp_path / "mm.onnx")
    x = rng.standard_normal((1, 2, K)).astype(np.float16)
    # polygraphy alone would pair the lone output 'y' with the lone reference whatever its name.
    ok, summary = polygraphy_compare(p, {"x": x}, {"not_an_output": x @ w}, rtol=1e-2, atol=1e-2)
    assert not ok and "['not_an_output'] are not outputs" in summary and "outputs: y" in summary


@needs_trt
@needs_polygraphy
@no_gpu_only
def test_polygraphy_inspect_engine_explains_it_needs_a_gpu(tmp_path, rng):
    m, _ = matmul_model(rng)
    build(tmp_path, m, XPROF)
    text = tb.polygraphy_inspect_engine(tmp_path / "model.engine")
    assert "needs an NVIDIA GPU" in text and "polygraphy said:" in text
    assert "deserialize" in text.lower()


# ------------------------------------------------------------------ preparing the network for TensorRT
def dq_matmul_fp32_scales(k: int, n: int, block: int, per_channel: bool, rng):
    """The network writer's standard form in a float16 network: int4 weights, float32 scales (a leak)."""
    q = rng.integers(-8, 8, size=(k, n)).astype(np.int8)
    blocks = -(-k // block)
    scale = (rng.random((1 if per_channel else blocks, n)) * 0.05 + 0.01).astype(np.float32)
    scale = np.repeat(scale, blocks, axis=0) if per_channel else scale
    m = model([h.make_node("DequantizeLinear", ["Wq", "Ws"], ["W"], axis=0, block_size=block, name="dq0"),
               h.make_node("MatMul", ["x", "W"], ["y"], name="mm0")],
              [vi("x", TP.FLOAT16, ["B", "S", k])], [vi("y", TP.FLOAT16, ["B", "S", n])],
              [h.make_tensor("Wq", TP.INT4, [k, n], q.flatten().tolist()), nh.from_array(scale, "Ws")])
    w = q.astype(np.float32) * np.repeat(scale, block, axis=0)[:k]
    return m, w


@needs_trt
def test_prepare_reblocks_per_channel_int4_and_writes_scales_in_float16(tmp_path, rng):
    """hidden 576 with the per-channel block 128 (4.5 blocks): TensorRT wants whole blocks."""
    k, n = 576, 64
    m, w = dq_matmul_fp32_scales(k, n, 128, per_channel=True, rng=rng)
    p = tmp_path / "m.onnx"
    onnx.save(m, str(p), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    with pytest.raises(TrtbuildError, match="The quantization axis must divide into whole blocks"):
        tb.build_tensorrt_engine(p, tmp_path / "m.engine", {"x": ((1, 1, k), (2, 8, k), (4, 32, k))})
    changes = tb.prepare_onnx_for_tensorrt(p, "float16")
    assert changes == ["1 per-channel DequantizeLinear nodes with 576 inputs: block 128 -> 64 (whole blocks)",
                       "1 float32 initializers (quantization scales, constants) -> float16"]
    g = onnx.load(str(p)).graph  # loads the rewritten scales from the external data
    assert [a.i for a in g.node[0].attribute if a.name == "block_size"] == [64]
    scales = nh.to_array([t for t in g.initializer if t.name == "Ws"][0])
    assert scales.dtype == np.float16 and scales.shape == (9, n)
    assert tb.prepare_onnx_for_tensorrt(p, "float16") == []  # idempotent
    info = tb.build_tensorrt_engine(p, tmp_path / "m.engine", {"x": ((1, 1, k), (2, 8, k), (4, 32, k))})
    assert info["network_layer_types"].get("DEQUANTIZE") == 1
    if HAVE_POLYGRAPHY:  # the rewritten graph computes x @ (q * s), s rounded to float16
        x = rng.standard_normal((2, 3, k)).astype(np.float16)
        ref = (x.astype(np.float32) @ w).astype(np.float16)
        ok, summary = polygraphy_compare(p, {"x": x}, {"y": ref}, rtol=2e-2, atol=0.1)
        assert ok, summary


def test_prepare_refuses_a_partial_group(tmp_path, rng):
    m, _ = dq_matmul_fp32_scales(96, 16, 64, per_channel=False, rng=rng)
    p = tmp_path / "m.onnx"
    onnx.save(m, str(p), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    before = p.read_bytes()
    with pytest.raises(TrtbuildError, match=r"node 'dq0': 96 inputs are not a multiple of the quantization group "
                                            r"size 64.*--group_size"):
        tb.prepare_onnx_for_tensorrt(p, "float16")
    assert p.read_bytes() == before


def test_prepare_keeps_tiny_epsilons_nonzero_and_refuses_overflow(tmp_path):
    m = model([h.make_node("Max", ["x", "eps"], ["m"], name="max0"), h.make_node("Mul", ["m", "big"], ["y"])],
              [vi("x", TP.FLOAT, ["N"])], [vi("y", TP.FLOAT, ["N"])],
              [nh.from_array(np.array(1e-8, np.float32), "eps"), nh.from_array(np.array(2.0, np.float32), "big")])
    p = save(m, tmp_path / "m.onnx")
    tb.prepare_onnx_for_tensorrt(p, "float16")
    eps = nh.to_array([t for t in onnx.load(str(p)).graph.initializer if t.name == "eps"][0])
    assert eps.dtype == np.float16 and eps > 0
    m.graph.initializer[1].CopyFrom(nh.from_array(np.array(1e6, np.float32), "big"))
    p = save(m, tmp_path / "m2.onnx")
    with pytest.raises(TrtbuildError, match="'big' has values beyond float16's range"):
        tb.prepare_onnx_for_tensorrt(p, "float16")


def test_parser_text_becomes_one_line():
    desc = ("Invalid Node - transformer.layers.0.attention.qkv/MatMul\n"
            "ITensor::getDimensions: Error Code 4: API Usage Error (transformer.layers.0.attention.qkv/MatMul: "
            "IMatrixMultiplyLayer must have same input types. `A` is of type Half and `B` is of type Float. In "
            "validateTypes at /_src/optimizer/common/nodes/matrixMultiplyNode.cpp:38)\n"
            "[checkMacros.cpp::catchCudaError::250] Error Code 1: Cuda Runtime (In catchCudaError at "
            "/_src/common/dispatch/checkMacros.cpp:250 (cudaError 35: CUDA driver version is insufficient))")
    assert one_line_reason(desc) == ("IMatrixMultiplyLayer must have same input types. `A` is of type Half and "
                                         "`B` is of type Float")


def test_describe_recipe():
    from trtbuild.checkpoint import QuantConfig

    class Cfg:
        dtype = "float32"
        quantization = QuantConfig()

    build = BuildConfig(compute_dtype="float16")
    assert tb.describe_recipe(Cfg, build) == "float16"
    Cfg.quantization = QuantConfig(quant_algo="W4A16_AWQ", per_group=True, group_size=64, kv_cache_quant_algo="INT8")
    assert tb.describe_recipe(Cfg, build) == \
        "float16, int4 AWQ weight-only W4A16_AWQ (symmetric, per-group 64), int8 KV cache"
    Cfg.quantization = QuantConfig(quant_algo="W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN")
    assert tb.describe_recipe(Cfg, build) == "float16, SmoothQuant W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN"
