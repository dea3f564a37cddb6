"""Import of pre-quantized AutoGPTQ / GPTQModel and AutoAWQ GEMM linears equals the unpacked reference.

The packers below are written from AutoGPTQ's and AutoAWQ's pack loops, independently of ours.
"""

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

from trtbuild.errors import TrtbuildError  # noqa: E402
from trtbuild.quantization.importers import (  # noqa: E402
    PrequantizedSpec, concat_linears, import_awq_linear, import_gptq_linear)
from trtbuild.quantization.layout import unpack_int4  # noqa: E402

IN, OUT, GS = 128, 32, 32
NG = IN // GS


def autogptq_pack(intweight_io, zeros_go, bits, v1):
    iw = intweight_io.numpy().astype(np.uint32)
    per = 32 // bits
    qweight = np.zeros((iw.shape[0] // per, iw.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        for j in range(i, i + per):
            qweight[row] |= iw[j] << (bits * (j - i))
        i += per
        row += 1
    z = zeros_go.numpy().astype(np.int64) - (1 if v1 else 0)
    z = z.astype(np.uint32)
    qzeros = np.zeros((z.shape[0], z.shape[1] // per), dtype=np.uint32)
    i = col = 0
    while col < qzeros.shape[1]:
        for j in range(i, i + per):
            qzeros[:, col] |= z[:, j] << (bits * (j - i))
        i += per
        col += 1
    return torch.from_numpy(qweight.view(np.int32)), torch.from_numpy(qzeros.view(np.int32))


def autoawq_pack(int_io):
    iw = int_io.numpy().astype(np.uint32)
    q = np.zeros((iw.shape[0], iw.shape[1] // 8), dtype=np.uint32)
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    for col in range(iw.shape[1] // 8):
        for i in range(8):
            q[:, col] |= iw[:, col * 8 + order_map[i]] << (i * 4)
    return torch.from_numpy(q.view(np.int32))


def synthetic(bits, seed=0, g_idx=None, sym=False):
    g = torch.Generator().manual_seed(seed)
    maxq = 2**bits - 1
    q = torch.randint(0, maxq + 1, (IN, OUT), generator=g)
    zeros = torch.full((NG, OUT), 2 ** (bits - 1)) if sym else torch.randint(1, maxq + 1, (NG, OUT), generator=g)
    scales = (torch.rand(NG, OUT, generator=g) * 0.02 + 0.001).half()
    gi = torch.arange(IN) // GS if g_idx is None else g_idx
    w_ref = ((q - zeros[gi]).float() * scales.float()[gi]).t()  # [out, in]
    return q, zeros, scales, gi, w_ref


def ours_dequant(t, bits):
    q = unpack_int4(t["weight"]) if bits == 4 else t["weight"]
    z = t["zero"].float() if "zero" in t else torch.full(t["weights_scaling_factor"].shape, 2.0 ** (bits - 1))
    gs = q.shape[1] // t["weights_scaling_factor"].shape[1]
    return (q.float() - z.repeat_interleave(gs, 1)) * t["weights_scaling_factor"].repeat_interleave(gs, 1)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_gptq_import_equals_reference(bits, fmt):
    q, zeros, scales, gi, w_ref = synthetic(bits)
    qweight, qzeros = autogptq_pack(q, zeros, bits, v1=fmt == "gptq")
    bias = torch.randn(OUT).half()
    t = import_gptq_linear({"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": gi.int(), "bias": bias},
                           "model.layers.0.mlp.down_proj", bits=bits, group_size=GS, in_features=IN,
                           out_features=OUT, checkpoint_format=fmt)
    assert t["weight"].dtype == torch.uint8 and t["weight"].shape == ((OUT, IN // 2) if bits == 4 else (OUT, IN))
    assert t["weights_scaling_factor"].dtype == torch.float32 and t["weights_scaling_factor"].shape == (OUT, NG)
    assert torch.equal(t["zero"].long(), zeros.t())
    assert torch.equal(t["bias"], bias)
    torch.testing.assert_close(ours_dequant(t, bits), w_ref, rtol=0, atol=0)


def test_gptq_symmetric_import_drops_zero_points():
    q, zeros, scales, gi, w_ref = synthetic(4, sym=True)
    qweight, qzeros = autogptq_pack(q, zeros, 4, v1=True)
    spec = PrequantizedSpec.from_hf({"quant_method": "gptq", "bits": 4, "group_size": GS, "sym": True, "desc_act": False})
    t = spec.import_linear({"qweight": qweight, "qzeros": qzeros, "scales": scales}, "m.q_proj", IN, OUT)
    assert "zero" not in t
    torch.testing.assert_close(ours_dequant(t, 4), w_ref, rtol=0, atol=0)
    qc = spec.quant_config()
    assert (qc.quant_algo, qc.group_size, qc.has_zero_point, qc.per_group) == ("W4A16_GPTQ", GS, False, True)


def test_gptq_act_order_import_is_requantized_to_plain_groups():
    perm = torch.randperm(IN, generator=torch.Generator().manual_seed(4))
    g_idx = (torch.argsort(perm) // GS)  # group of each column under act-order
    q, zeros, scales, gi, w_ref = synthetic(4, g_idx=g_idx)
    qweight, qzeros = autogptq_pack(q, zeros, 4, v1=False)
    t = import_gptq_linear({"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx.int()}, "m.o_proj",
                           bits=4, group_size=GS, checkpoint_format="gptq_v2")
    assert t["weights_scaling_factor"].shape == (OUT, NG)  # plain layout, no g_idx
    got = ours_dequant(t, 4)
    step = t["weights_scaling_factor"].repeat_interleave(GS, 1)
    assert torch.all((got - w_ref).abs() <= step / 2 + 1e-6)


def test_awq_gemm_import_equals_reference():
    q, zeros, scales, gi, w_ref = synthetic(4, seed=1)
    t = import_awq_linear({"qweight": autoawq_pack(q), "qzeros": autoawq_pack(zeros), "scales": scales},
                          "model.layers.0.self_attn.q_proj", group_size=GS, in_features=IN, out_features=OUT)
    assert torch.equal(t["zero"].long(), zeros.t())
    torch.testing.assert_close(ours_dequant(t, 4), w_ref, rtol=0, atol=0)
    spec = PrequantizedSpec.from_hf({"quant_method": "awq", "bits": 4, "group_size": GS, "zero_point": True,
                                     "version": "gemm"})
    assert spec.quant_config().quant_algo == "W4A16_AWQ"
    t2 = spec.import_linear({"qweight": autoawq_pack(q), "qzeros": autoawq_pack(zeros), "scales": scales}, "m.k", IN, OUT)
    assert torch.equal(t2["weight"], t["weight"])


def test_concat_linears_stacks_outputs():
    parts = []
    for s in range(3):
        q, zeros, scales, _, _ = synthetic(4, seed=s)
        parts.append(import_awq_linear({"qweight": autoawq_pack(q), "qzeros": autoawq_pack(zeros), "scales": scales},
                                       f"m.{s}", group_size=GS))
    qkv = concat_linears(parts)
    assert qkv["weight"].shape == (3 * OUT, IN // 2) and qkv["zero"].shape == (3 * OUT, NG)


def _gptq_tensors(bits=4):
    q, zeros, scales, gi, _ = synthetic(bits)
    qweight, qzeros = autogptq_pack(q, zeros, bits, v1=True)
    return {"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": gi.int()}


@pytest.mark.parametrize("mutate,kw,match", [
    (lambda t: t, dict(in_features=IN * 2), r"m\.up_proj\.qweight: shape \(16, 32\) holds 128 inputs"),
    (lambda t: t, dict(out_features=OUT + 8), r"m\.up_proj\.qweight: .* has 32 outputs, the model has 40"),
    (lambda t: t, dict(bits=3), r"m\.up_proj: 3-bit GPTQ is not supported"),
    (lambda t: t, dict(group_size=64), r"m\.up_proj\.scales: shape \(4, 32\), expected \(2, 32\)"),
    (lambda t: {**t, "qzeros": t["qzeros"][:, :2]}, {}, r"m\.up_proj\.qzeros: shape"),
    (lambda t: {**t, "qweight": t["qweight"].float()}, {}, r"m\.up_proj\.qweight: expected a 2-D int32"),
    (lambda t: {**t, "g_idx": t["g_idx"][:-1]}, {}, r"m\.up_proj\.g_idx: shape"),
    (lambda t: {k: v for k, v in t.items() if k != "scales"}, {}, r"m\.up_proj\.scales is missing"),
    (lambda t: t, dict(has_zero_point=False), r"m\.up_proj\.qzeros: zero points differ from 8"),
    (lambda t: t, dict(checkpoint_format="marlin"), r"checkpoint_format 'marlin'"),
])
def test_gptq_import_bad_input_names_the_tensor(mutate, kw, match):
    args = dict(bits=4, group_size=GS, in_features=IN, out_features=OUT)
    args.update(kw)
    with pytest.raises(TrtbuildError, match=match):
        import_gptq_linear(mutate(_gptq_tensors()), "m.up_proj", **args)


def test_gptq_v1_wrapped_zero_is_refused():
    q, zeros, scales, gi, _ = synthetic(4)
    zeros[0, 0] = 0  # old AutoGPTQ stores -1 → 15 (and corrupts nothing else only by luck of the top nibble)
    zeros[:, 7] = 0
    qweight, qzeros = autogptq_pack(q, zeros.clamp(min=1), 4, v1=True)
    qzeros[:, 0] |= torch.tensor(0xF << 28, dtype=torch.int64).to(torch.int32)  # stored 15 for column 7
    with pytest.raises(TrtbuildError, match=r"m\.gate_proj\.qzeros: stored zero point 15"):
        import_gptq_linear({"qweight": qweight, "qzeros": qzeros, "scales": scales}, "m.gate_proj",
                           bits=4, group_size=GS)


def test_awq_bad_input():
    q, zeros, scales, _, _ = synthetic(4)
    t = {"qweight": autoawq_pack(q), "qzeros": autoawq_pack(zeros), "scales": scales}
    with pytest.raises(TrtbuildError, match=r"m\.v_proj\.qweight: .* has 128 inputs, the model has 64"):
        import_awq_linear(t, "m.v_proj", group_size=GS, in_features=64)
    with pytest.raises(TrtbuildError, match=r"m\.v_proj: AWQ version 'gemv'"):
        import_awq_linear(t, "m.v_proj", group_size=GS, version="gemv")
    with pytest.raises(TrtbuildError, match=r"m\.v_proj: 8-bit AWQ"):
        import_awq_linear(t, "m.v_proj", bits=8, group_size=GS)
    with pytest.raises(TrtbuildError, match=r"quant_method 'bitsandbytes'"):
        PrequantizedSpec.from_hf({"quant_method": "bitsandbytes"})
