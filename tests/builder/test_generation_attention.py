"""trtbuild's GenerationAttention kernel (every step after a prompt: decode rows of different lengths,
a prompt continued over a past): against a numpy reference and against onnxruntime's
GroupQueryAttention (the op it replaces) on the same cache, float and int8, in the library built for
this machine and in the AVX2 form, with the cache shared in place (as the runtime binds it) or not;
and a step outside the cache is refused with the row named."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from trtbuild import kernels

from test_kernels import rope_tables


def rope(t: np.ndarray, cos: np.ndarray, sin: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Rotate-half rotary of t [S, heads, D] at `positions` over cos.shape[1] * 2 dims, in float64."""
    half = cos.shape[1]
    c, s = cos[positions, None, :].astype(np.float64), sin[positions, None, :].astype(np.float64)
    t = t.copy()
    a, b = t[..., :half].copy(), t[..., half:2 * half].copy()
    t[..., :half], t[..., half:2 * half] = a * c - b * s, b * c + a * s
    return t


def reference(qkv, past_k, past_v, seqlens_k, total, H, KV, D, cos, sin, kv_scales=None):
    """(output, present key, present value): each row's S new tokens at positions past .. past + S - 1
    (past = seqlens_k + 1 - S, or 0 when total == S) attend causally over the cache; float64."""
    B, S, _ = qkv.shape
    out = np.zeros((B, S, H * D))
    pk, pv = past_k.copy(), past_v.copy()
    group = H // KV
    for b in range(B):
        past = 0 if total == S else int(seqlens_k[b]) + 1 - S
        pos = np.arange(past, past + S)
        x = qkv[b].astype(np.float64)
        q = x[:, :H * D].reshape(S, H, D)
        k = x[:, H * D:(H + KV) * D].reshape(S, KV, D)
        v = x[:, (H + KV) * D:].reshape(S, KV, D)
        if cos is not None:
            q, k = rope(q, cos, sin, pos), rope(k, cos, sin, pos)
        if kv_scales is not None:
            pk[b, :, pos] = np.clip(np.rint(k.astype(np.float32) / np.float32(kv_scales[0])), -128, 127).astype(np.int8)
            pv[b, :, pos] = np.clip(np.rint(v.astype(np.float32) / np.float32(kv_scales[1])), -128, 127).astype(np.int8)
            keys = pk[b].astype(np.float64) * np.float32(kv_scales[0])
            values = pv[b].astype(np.float64) * np.float32(kv_scales[1])
        else:
            pk[b, :, pos], pv[b, :, pos] = k.astype(np.float32), v.astype(np.float32)
            keys, values = pk[b].astype(np.float64), pv[b].astype(np.float64)
        for s in range(S):
            n = past + s + 1
            for h in range(H):
                scores = keys[h // group, :n] @ q[s, h] / np.sqrt(D)
                p = np.exp(scores - scores.max())
                out[b, s, h * D:(h + 1) * D] = (p / p.sum()) @ values[h // group, :n]
    return out, pk, pv


def session(op: str, H: int, KV: int, D: int, cos, sin, kv_scales=None, isa: str = "native", threads: int = 2):
    """One GenerationAttention ("kernel") or GroupQueryAttention ("gqa") node."""
    int8 = kv_scales is not None
    scales = ["k_scale", "v_scale"] if int8 else []
    rotary = ["cos", "sin"] if cos is not None else []
    if op == "kernel":
        node = helper.make_node("GenerationAttentionInt8KV" if int8 else "GenerationAttention",
                                ["qkv", "past_key", "past_value", "seqlens_k", "total", *scales, *rotary],
                                ["out", "present_key", "present_value"], domain=kernels.DOMAIN, num_heads=H, kv_num_heads=KV)
    else:
        inputs = ["qkv", "", "", "past_key", "past_value", "seqlens_k", "total", *(rotary or ["", ""]), "", "", "", *scales]
        while inputs[-1] == "":
            inputs.pop()
        quant = {"k_quant_type": "PER_TENSOR", "v_quant_type": "PER_TENSOR", "kv_cache_bit_width": 8} if int8 else {}
        node = helper.make_node("GroupQueryAttention", inputs, ["out", "present_key", "present_value"],
                                domain="com.microsoft", num_heads=H, kv_num_heads=KV, do_rotary=int(cos is not None),
                                rotary_interleaved=0, **quant)
    inits = [] if cos is None else [helper.make_tensor("cos", TensorProto.FLOAT, cos.shape, cos.ravel()),
                                    helper.make_tensor("sin", TensorProto.FLOAT, sin.shape, sin.ravel())]
    if int8:
        inits += [helper.make_tensor(n, TensorProto.FLOAT, [1], [s]) for n, s in zip(scales, kv_scales)]
    cache = TensorProto.INT8 if int8 else TensorProto.FLOAT
    vi = helper.make_tensor_value_info
    graph = helper.make_graph([node], "g", [vi("qkv", TensorProto.FLOAT, ["B", "S", (H + 2 * KV) * D]),
                                            vi("past_key", cache, ["B", KV, "M", D]),
                                            vi("past_value", cache, ["B", KV, "M", D]),
                                            vi("seqlens_k", TensorProto.INT32, ["B"]), vi("total", TensorProto.INT32, [])],
                              [vi("out", TensorProto.FLOAT, None), vi("present_key", cache, None),
                               vi("present_value", cache, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(kernels.DOMAIN, 1),
                                                    helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    kernels.register(so, None, isa)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def step(rng, B: int, S: int, H: int, KV: int, D: int, lengths_before: list[int], capacity: int, int8: bool):
    """Inputs of a step: random qkv and a cache whose rows hold lengths_before random positions."""
    qkv = rng.standard_normal((B, S, (H + 2 * KV) * D)).astype(np.float32)
    if int8:
        past_k = rng.integers(-128, 128, (B, KV, capacity, D), dtype=np.int8)
    else:
        past_k = rng.standard_normal((B, KV, capacity, D)).astype(np.float32)
    past_v = past_k[:, :, ::-1].copy()
    seqlens_k = np.array([n + S - 1 for n in lengths_before], np.int32)
    total = np.array(max(lengths_before) + S, np.int32)
    return qkv, past_k, past_v, seqlens_k, total


def run_shared(s: ort.InferenceSession, qkv, past_k, past_v, seqlens_k, total):
    """Run with past and present bound to the same memory, as the runtime's shared KV buffer."""
    k, v = past_k.copy(), past_v.copy()
    io = s.io_binding()
    io.bind_output("out")
    k_value, v_value = ort.OrtValue.ortvalue_from_numpy(k), ort.OrtValue.ortvalue_from_numpy(v)
    io.bind_ortvalue_input("past_key", k_value)
    io.bind_ortvalue_input("past_value", v_value)
    io.bind_ortvalue_output("present_key", k_value)
    io.bind_ortvalue_output("present_value", v_value)
    for name, value in (("qkv", qkv), ("seqlens_k", seqlens_k), ("total", total)):
        io.bind_cpu_input(name, value)
    s.run_with_iobinding(io)
    return io.copy_outputs_to_cpu()[0], k, v


FEEDS = ("qkv", "past_key", "past_value", "seqlens_k", "total")


# (B, S, lengths before the step): decode rows of different lengths, a continued prompt, a prompt
# into an empty cache (total == S)
STEPS = [(1, 1, [0]), (1, 1, [37]), (4, 1, [5, 90, 1, 33]), (3, 1, [200, 17, 64]), (1, 6, [41]), (1, 40, [9]),
         (2, 3, [10, 4]), (2, 9, [0, 0])]


@pytest.mark.parametrize("H,KV,D,rotary", [(9, 3, 64, 64), (14, 2, 64, 64), (4, 4, 128, 128), (4, 2, 80, 80),
                                           (2, 1, 64, 32), (3, 1, 32, 0)])
@pytest.mark.parametrize("B,S,lengths", STEPS)
def test_generation_attention_matches_reference_and_gqa(isa, H, KV, D, rotary, B, S, lengths):
    capacity = 256
    cos, sin = rope_tables(capacity, rotary) if rotary else (None, None)
    rng = np.random.default_rng(B * 100 + S)
    inputs = step(rng, B, S, H, KV, D, lengths, capacity, int8=False)
    kernel = session("kernel", H, KV, D, cos, sin, isa=isa)
    out, k, v = run_shared(kernel, *inputs)
    want, want_k, want_v = reference(*inputs, H, KV, D, cos, sin)
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=0)
    np.testing.assert_allclose(k, want_k, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(v, want_v)  # values go into the cache unchanged
    # not shared: onnxruntime allocates the presents, and the past rows are copied in
    out2, k2, v2 = kernel.run(None, dict(zip(FEEDS, inputs)))
    np.testing.assert_array_equal(out2, out)
    for b, n in enumerate(lengths):  # rows past a row's own are not the op's to fill
        np.testing.assert_array_equal(k2[b, :, :n + S], k[b, :, :n + S])
        np.testing.assert_array_equal(v2[b, :, :n + S], v[b, :, :n + S])
    if S == 1 or B == 1 or max(lengths) == 0:  # GroupQueryAttention continues a prompt at batch 1 only
        gqa_out, gqa_k, _ = run_shared(session("gqa", H, KV, D, cos, sin), *inputs)
        np.testing.assert_allclose(out, gqa_out, atol=2e-5, rtol=0)
        np.testing.assert_allclose(k, gqa_k, atol=1e-5, rtol=0)


@pytest.mark.parametrize("B,S,lengths", [(4, 1, [5, 90, 1, 33]), (1, 7, [50])])
def test_generation_attention_int8_cache(isa, B, S, lengths):
    """Over an int8 cache (static scales) the step's keys and values are written as
    round-half-even(x / scale) and every key is read as what the cache holds, as GroupQueryAttention does."""
    H, KV, D, capacity, kv_scales = 9, 3, 64, 160, (0.03, 0.02)
    cos, sin = rope_tables(capacity, D)
    inputs = step(np.random.default_rng(S), B, S, H, KV, D, lengths, capacity, int8=True)
    out, k, v = run_shared(session("kernel", H, KV, D, cos, sin, kv_scales, isa=isa), *inputs)
    want, want_k, want_v = reference(*inputs, H, KV, D, cos, sin, kv_scales)
    assert k.dtype == np.int8
    np.testing.assert_array_equal(v, want_v)
    # a rotated key within float rounding of a .5 step may land on either side: rarely, by one
    assert np.abs(k.astype(int) - want_k).max() <= 1
    np.testing.assert_allclose(out, want, atol=2e-4, rtol=0)
    gqa_out, _, _ = run_shared(session("gqa", H, KV, D, cos, sin, kv_scales), *inputs)
    np.testing.assert_allclose(out, gqa_out, atol=2e-4, rtol=0)


def test_generation_attention_refuses_a_step_outside_the_cache():
    H, KV, D, capacity = 4, 2, 64, 32
    cos, sin = rope_tables(capacity, D)
    kernel = session("kernel", H, KV, D, cos, sin)
    qkv, past_k, past_v, _, _ = step(np.random.default_rng(0), 2, 1, H, KV, D, [3, 3], capacity, int8=False)
    with pytest.raises(Exception, match=r"GenerationAttention: row 1: seqlens_k 40 .* outside the cache's 0..31"):
        kernel.run(None, dict(zip(FEEDS, (qkv, past_k, past_v, np.array([3, 40], np.int32), np.array(41, np.int32)))))
    with pytest.raises(Exception, match=r"row 0: seqlens_k -3 puts its 1 new tokens at positions -3"):
        kernel.run(None, dict(zip(FEEDS, (qkv, past_k, past_v, np.array([-3, 3], np.int32), np.array(4, np.int32)))))
