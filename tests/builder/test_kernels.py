"""trtbuild's own kernels (trtbuild/kernels): compiled for this machine, cached, and exact against a
numpy reference; an engine that needs them says what to do on a machine that cannot build them."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from trtbuild import kernels
from trtbuild.builder import build_engine
from trtbuild.engine import BuildConfig
from trtbuild.errors import TrtbuildError
from trtbuild.runtime import ModelRunner

from conftest import op_types


@pytest.fixture(scope="module")
def kernel_dir(module_tmp):
    return module_tmp


def rope_tables(positions: int, rotary_dim: int) -> tuple[np.ndarray, np.ndarray]:
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, rotary_dim, 2) / rotary_dim))
    freqs = np.arange(positions)[:, None] * inv_freq[None, :]
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)


def reference(qkv, H, KV, D, cos, sin, kv_scales=None):
    """Causal attention of one prompt, rotate-half rotary over cos.shape[1] * 2 dims, in float64;
    with kv_scales over the keys and values an int8 cache holds (and those int8 values)."""
    S = qkv.shape[1]
    x = qkv[0].astype(np.float64)
    q = x[:, :H * D].reshape(S, H, D)
    k = x[:, H * D:(H + KV) * D].reshape(S, KV, D)
    v = x[:, (H + KV) * D:].reshape(S, KV, D)
    if cos is not None:
        half = cos.shape[1]
        c, s = cos[:S, None, :].astype(np.float64), sin[:S, None, :].astype(np.float64)

        def rope(t):
            t = t.copy()
            a, b = t[..., :half].copy(), t[..., half:2 * half].copy()
            t[..., :half], t[..., half:2 * half] = a * c - b * s, b * c + a * s
            return t

        q, k = rope(q), rope(k)
    if kv_scales is not None:
        k8, v8 = (np.clip(np.rint(t.astype(np.float32) / np.float32(s)), -128, 127) for t, s in zip((k, v), kv_scales))
        k, v = k8 * np.float32(kv_scales[0]), v8 * np.float32(kv_scales[1])
    group = H // KV
    out = np.empty((S, H, D))
    mask = np.tril(np.ones((S, S), bool))
    for h in range(H):
        scores = q[:, h] @ k[:, h // group].T / np.sqrt(D)
        scores = np.where(mask, scores, -np.inf)
        p = np.exp(scores - scores.max(axis=1, keepdims=True))
        out[:, h] = (p / p.sum(axis=1, keepdims=True)) @ v[:, h // group]
    if kv_scales is not None:
        return out.reshape(1, S, H * D), k8.transpose(1, 0, 2), v8.transpose(1, 0, 2)
    return out.reshape(1, S, H * D), k.transpose(1, 0, 2), v.transpose(1, 0, 2)


def attention_session(H, KV, D, capacity, cos, sin, kernel_dir, threads=2, kv_scales=None, isa="native"):
    W = (H + 2 * KV) * D
    int8 = kv_scales is not None
    inputs = ["qkv", "past_key"] + (["k_scale", "v_scale"] if int8 else []) + (["cos", "sin"] if cos is not None else [])
    node = helper.make_node("CausalPromptAttentionInt8KV" if int8 else "CausalPromptAttention", inputs,
                            ["out", "present_key", "present_value"], domain=kernels.DOMAIN, num_heads=H, kv_num_heads=KV)
    inits = [] if cos is None else [helper.make_tensor("cos", TensorProto.FLOAT, cos.shape, cos.ravel()),
                                    helper.make_tensor("sin", TensorProto.FLOAT, sin.shape, sin.ravel())]
    if int8:
        inits += [helper.make_tensor(n, TensorProto.FLOAT, [1], [s]) for n, s in zip(("k_scale", "v_scale"), kv_scales)]
    cache = TensorProto.INT8 if int8 else TensorProto.FLOAT
    vi = helper.make_tensor_value_info
    graph = helper.make_graph([node], "g", [vi("qkv", TensorProto.FLOAT, ["B", "S", W]),
                                            vi("past_key", cache, ["P", KV, "M", D])],
                              [vi("out", TensorProto.FLOAT, None), vi("present_key", cache, None),
                               vi("present_value", cache, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(kernels.DOMAIN, 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    kernels.register(so, kernel_dir, isa)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("H,KV,D,rotary", [(9, 3, 64, 64), (4, 2, 16, 16), (4, 1, 32, 16), (4, 4, 80, 80),
                                           (2, 1, 128, 128), (3, 3, 64, 0), (2, 1, 48, 48), (2, 2, 112, 64),
                                           (2, 1, 256, 256)])
@pytest.mark.parametrize("S", [1, 7, 64, 65, 200])
def test_causal_prompt_attention_matches_reference(kernel_dir, isa, H, KV, D, rotary, S):
    capacity = 256
    cos, sin = rope_tables(capacity, rotary) if rotary else (None, None)
    session = attention_session(H, KV, D, capacity, cos, sin, kernel_dir, isa=isa)
    qkv = np.random.default_rng(S).standard_normal((1, S, (H + 2 * KV) * D)).astype(np.float32)
    past = np.zeros((1, KV, capacity, D), np.float32)
    out, present_k, present_v = session.run(None, {"qkv": qkv, "past_key": past})
    want, k, v = reference(qkv, H, KV, D, cos, sin)
    assert out.shape == (1, S, H * D) and present_k.shape == (1, KV, capacity, D)
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=0)
    np.testing.assert_allclose(present_k[0, :, :S], k, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(present_v[0, :, :S], v)  # values go into the cache unchanged


@pytest.mark.parametrize("S", [1, 70])
def test_causal_prompt_attention_int8_cache(kernel_dir, isa, S):
    """The int8 KV variant writes round-half-even(x / scale) into the cache and attends over what
    the cache holds, as every later decode step does."""
    H, KV, D, capacity, kv_scales = 4, 2, 64, 128, (0.03, 0.02)
    cos, sin = rope_tables(capacity, D)
    session = attention_session(H, KV, D, capacity, cos, sin, kernel_dir, kv_scales=kv_scales, isa=isa)
    qkv = np.random.default_rng(S).standard_normal((1, S, (H + 2 * KV) * D)).astype(np.float32)
    out, present_k, present_v = session.run(None, {"qkv": qkv, "past_key": np.zeros((1, KV, capacity, D), np.int8)})
    want, k8, v8 = reference(qkv, H, KV, D, cos, sin, kv_scales)
    assert present_k.dtype == np.int8 and present_v.dtype == np.int8
    np.testing.assert_array_equal(present_v[0, :, :S], v8)
    # a rotated key within float rounding of a .5 step may land on either side: rarely, by one
    assert np.abs(present_k[0, :, :S].astype(int) - k8).max() <= 1
    assert (present_k[0, :, :S] != k8).mean() < 1e-3
    np.testing.assert_allclose(out, want, atol=2e-3 if (present_k[0, :, :S] != k8).any() else 2e-5, rtol=0)


@pytest.mark.parametrize("B,S", [(3, 9), (2, 130)])
def test_causal_prompt_attention_batch_is_each_prompt_alone(kernel_dir, isa, B, S):
    H, KV, D, capacity = 6, 2, 32, 160
    cos, sin = rope_tables(capacity, D)
    session = attention_session(H, KV, D, capacity, cos, sin, kernel_dir, isa=isa)
    qkv = np.random.default_rng(B).standard_normal((B, S, (H + 2 * KV) * D)).astype(np.float32)
    out, present_k, present_v = session.run(None, {"qkv": qkv, "past_key": np.zeros((B, KV, capacity, D), np.float32)})
    for b in range(B):
        want, k, v = reference(qkv[b:b + 1], H, KV, D, cos, sin)
        np.testing.assert_allclose(out[b:b + 1], want, atol=2e-5, rtol=0)
        np.testing.assert_allclose(present_k[b, :, :S], k, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(present_v[b, :, :S], v)


def test_causal_prompt_attention_rejects_what_it_cannot_run(kernel_dir, isa):
    cos, sin = rope_tables(64, 16)
    session = attention_session(4, 2, 16, 64, cos, sin, kernel_dir, isa=isa)
    uneven = attention_session(4, 3, 16, 64, cos, sin, kernel_dir, isa=isa)
    with pytest.raises(Exception, match="CausalPromptAttention: num_heads 4 is not a multiple of kv_num_heads 3"):
        uneven.run(None, {"qkv": np.zeros((1, 5, 160), np.float32), "past_key": np.zeros((1, 3, 64, 16), np.float32)})
    with pytest.raises(Exception, match="CausalPromptAttention: past_key must be"):  # batch 2 against a cache of 1
        session.run(None, {"qkv": np.zeros((2, 5, 128), np.float32), "past_key": np.zeros((1, 2, 64, 16), np.float32)})
    with pytest.raises(Exception, match="past_key must be"):  # a prompt longer than the cache
        session.run(None, {"qkv": np.zeros((1, 65, 128), np.float32), "past_key": np.zeros((1, 2, 64, 16), np.float32)})
    odd = attention_session(2, 1, 24, 64, None, None, kernel_dir, isa=isa)
    with pytest.raises(Exception, match="head size 24 has no kernel"):
        odd.run(None, {"qkv": np.zeros((1, 3, 96), np.float32), "past_key": np.zeros((1, 1, 64, 24), np.float32)})


def test_library_is_built_once_and_reused(kernel_dir):
    first = kernels.library_path(kernel_dir)
    mtime = first.stat().st_mtime_ns
    assert kernels.library_path(kernel_dir) == first and first.stat().st_mtime_ns == mtime
    assert not [p for p in kernel_dir.iterdir() if p.name.startswith(".partial")]  # no half-written library


def test_no_compiler_builds_without_the_kernel_and_an_engine_that_needs_it_says_so(tiny_models, engines, tmp_path,
                                                                                    monkeypatch, caplog):
    build = BuildConfig(max_batch_size=2, max_input_len=32, max_seq_len=64)
    fmha = engines.engine(tiny_models["llama"], build)  # with the compiler: the kernel
    ckpt = engines.checkpoint(tiny_models["llama"])

    monkeypatch.setattr(kernels, "find_compiler", lambda: None)
    monkeypatch.setenv(kernels.KERNEL_DIR_ENV, str(tmp_path / "empty_kernel_dir"))  # nothing built yet
    with caplog.at_level("WARNING"):
        build_engine(ckpt, tmp_path / "plain", build, progress=False)
    assert "install g++" in caplog.text
    plain = ModelRunner.from_dir(tmp_path / "plain", num_threads=1)
    assert not plain.config.build_config.plugin_config.context_fmha
    assert not plain.config.build_config.plugin_config.lm_head_plugin
    import onnx

    graph = onnx.load(str(tmp_path / "plain" / "rank0.engine"), load_external_data=False).graph
    assert not {"CausalPromptAttention", "LmHead"} & op_types(graph)
    assert plain.prefill([[5, 6, 7]]).shape[-1] == plain.config.pretrained_config.vocab_size

    with pytest.raises(TrtbuildError, match="--context_fmha disable .*--lm_head_plugin disable") as err:
        ModelRunner.from_dir(fmha, num_threads=1)
    assert "install g++" in str(err.value) and "rank0.engine" in str(err.value)


def quantize_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: scale = max|x| / 127 (float32 as the graph computes it), u8 = round-half-even(x / scale) + 128."""
    amax = np.abs(x).max(axis=-1, keepdims=True)
    scale = (amax * np.float32(1 / 127)).astype(np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        q = np.where(scale > 0, np.rint(x / np.where(scale > 0, scale, 1)), 0)
    return (np.clip(q, -128, 127) + 128).astype(np.uint8), scale


QUANTIZED = [("q", TensorProto.UINT8), ("scale", TensorProto.FLOAT)]  # both quantize ops' outputs


def one_op_session(op: str, inputs: list[tuple[str, int, list]], kernel_dir, threads=2, isa="native"):
    vi = helper.make_tensor_value_info
    node = helper.make_node(op, [name for name, _, _ in inputs], [n for n, _ in QUANTIZED], domain=kernels.DOMAIN)
    graph = helper.make_graph([node], "g", [vi(n, t, s) for n, t, s in inputs],
                              [vi(n, t, None) for n, t in QUANTIZED])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(kernels.DOMAIN, 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    kernels.register(so, kernel_dir, isa)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("shape", [(1, 1, 576), (2, 37, 100), (1, 700, 64)])
def test_per_token_quantize_matches_reference(kernel_dir, isa, shape):
    rng = np.random.default_rng(len(shape))
    x = (rng.standard_normal(shape) * rng.uniform(0.01, 30, shape[:-1] + (1,))).astype(np.float32)
    x.reshape(-1, shape[-1])[0] = 0.0  # a row of zeros: scale 0, all values at the zero point
    channel = rng.uniform(0.2, 3, shape[-1]).astype(np.float32)
    F = TensorProto.FLOAT
    plain = one_op_session("PerTokenQuantize", [("x", F, ["B", "S", "K"])], kernel_dir, isa=isa)
    scaled = one_op_session("PerTokenQuantize", [("x", F, ["B", "S", "K"]), ("c", F, ["K"])], kernel_dir, isa=isa)
    for session, feeds, x_eff in ((plain, {"x": x}, x), (scaled, {"x": x, "c": channel}, x * channel)):
        xq, scale = session.run(None, feeds)
        want_q, want_scale = quantize_reference(x_eff)
        assert xq.dtype == np.uint8 and xq.shape == shape and scale.shape == shape[:-1] + (1,)
        np.testing.assert_allclose(scale, want_scale, rtol=1e-6, atol=0)
        # x / scale within an ulp of a .5 may round either way: at most one step off, rarely
        diff = np.abs(xq.astype(int) - want_q.astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
        assert np.all(xq.reshape(-1, shape[-1])[0] == 128)


@pytest.mark.parametrize("shape", [(1, 1, 2 * 1536), (3, 21, 2 * 40)])
def test_swiglu_quantize_matches_reference(kernel_dir, isa, shape):
    rng = np.random.default_rng(shape[1])
    y = (rng.standard_normal(shape) * 4).astype(np.float32)
    y_scale = rng.uniform(0.001, 0.1, shape[:-1] + (1,)).astype(np.float32)
    y_scale.reshape(-1)[-1] = 0.0  # a zero row scale: the row's product is 0
    F = TensorProto.FLOAT
    session = one_op_session("SwiGLUQuantize", [("y", F, ["B", "S", "N"]), ("s", F, ["B", "S", 1])], kernel_dir, isa=isa)
    aq, a_scale = session.run(None, {"y": y, "s": y_scale})
    half = shape[-1] // 2
    g, u = y[..., :half].astype(np.float64) * y_scale, y[..., half:].astype(np.float64) * y_scale
    a = g / (1 + np.exp(-g)) * u
    # dequantized, the values are the float product to within half an int8 step
    err = np.abs((aq.astype(np.float64) - 128) * a_scale - a)
    assert np.all(err <= 0.5 * a_scale * 1.001 + 1e-7)
    np.testing.assert_allclose(a_scale[..., 0], np.abs(a).max(axis=-1) / 127, rtol=1e-5)
    assert np.all(aq.reshape(-1, half)[-1] == 128) and a_scale.reshape(-1)[-1] == 0


def test_quantize_ops_reject_bad_shapes(kernel_dir, isa):
    F = TensorProto.FLOAT
    scaled = one_op_session("PerTokenQuantize", [("x", F, ["S", "K"]), ("c", F, ["C"])], kernel_dir, isa=isa)
    with pytest.raises(Exception, match="PerTokenQuantize: channel_scale must be \\[K\\]"):
        scaled.run(None, {"x": np.ones((2, 8), np.float32), "c": np.ones(7, np.float32)})
    swiglu = one_op_session("SwiGLUQuantize", [("y", F, ["S", "N"]), ("s", F, ["S", 1])], kernel_dir, isa=isa)
    with pytest.raises(Exception, match="SwiGLUQuantize: y must be"):
        swiglu.run(None, {"y": np.ones((2, 7), np.float32), "s": np.ones((2, 1), np.float32)})
