"""RTN weight-only: the CONTRACTS.md byte layout and round-trip error bounds."""

import dataclasses

import pytest
import torch

torch.set_num_threads(1)

from trtbuild.checkpoint import QuantConfig  # noqa: E402
from trtbuild.errors import TrtbuildError  # noqa: E402
from trtbuild.quantization.layout import (  # noqa: E402
    dequantize_linear, pack_int4, quantize_rtn, rtn_linear, unpack_int4)

from tiny_models import tiny_llama  # noqa: E402


def _w(out_f=48, in_f=256, seed=0):
    return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))


def test_int4_packing_low_nibble_is_even_input():
    q = torch.tensor([[1, 2, 3, 15]], dtype=torch.uint8)
    p = pack_int4(q)
    assert p.dtype == torch.uint8 and p.tolist() == [[0x21, 0xF3]]
    assert torch.equal(unpack_int4(p), q)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group_size", [-1, 32, 64, 128])
@pytest.mark.parametrize("has_zero_point", [False, True])
def test_rtn_round_trip_within_half_a_step(bits, group_size, has_zero_point):
    w = _w()
    t = rtn_linear(w, bits, group_size, has_zero_point, "x.weight")
    ng = 1 if group_size == -1 else 256 // group_size
    assert t["weight"].dtype == torch.uint8
    assert tuple(t["weight"].shape) == ((48, 128) if bits == 4 else (48, 256))
    assert t["weights_scaling_factor"].dtype == torch.float32 and tuple(t["weights_scaling_factor"].shape) == (48, ng)
    assert ("zero" in t) == has_zero_point
    if has_zero_point:
        assert t["zero"].dtype == torch.uint8 and tuple(t["zero"].shape) == (48, ng)
    cfg = _cfg({8: "W8A16", 4: "W4A16"}[bits], has_zero_point)
    deq = dequantize_linear({"x." + k: v for k, v in t.items()}, "x", cfg)
    step = t["weights_scaling_factor"].repeat_interleave(256 // ng, dim=1)
    assert torch.all((deq - w).abs() <= step / 2 + 1e-6)
    rel = ((deq - w).norm() / w.norm()).item()
    assert rel < (0.01 if bits == 8 else 0.16), rel


_CFG = tiny_llama(layers=1)[2]


def _cfg(algo, hz):
    return dataclasses.replace(_CFG, quantization=QuantConfig(quant_algo=algo, has_zero_point=hz))


def test_symmetric_stores_midpoint_zero_and_exact_max():
    w = _w(4, 64)
    qw = quantize_rtn(w, 4, -1, False)
    assert torch.all(qw.zero == 8)
    assert int(qw.q.min()) >= 1  # symmetric: q in [1, 15], the row's max |w| exactly representable
    amax = w.abs().amax(dim=1)
    torch.testing.assert_close(qw.dequantize().abs().amax(dim=1), amax)


def test_partial_last_group_equals_quantizing_it_alone():
    w = _w(3, 96)
    qw = quantize_rtn(w, 4, 64, True)
    assert qw.scale.shape == (3, 2) and qw.q.shape == (3, 96)
    tail = quantize_rtn(w[:, 64:], 4, 32, True)
    torch.testing.assert_close(qw.dequantize()[:, 64:], tail.dequantize())


def test_asymmetric_all_zero_group_is_exact():
    w = _w(2, 64)
    w[0, :32] = 0
    deq = quantize_rtn(w, 4, 32, True).dequantize()
    assert torch.all(deq[0, :32] == 0)


def test_group_size_must_be_a_kernel_block_and_bits_supported():
    with pytest.raises(TrtbuildError, match=r"--group_size 128 is larger than the input dimension 96 of x.weight"):
        quantize_rtn(_w(4, 96), 4, 128, False, "x.weight")
    with pytest.raises(TrtbuildError, match=r"--group_size 48 \(for x.weight\) must be a power of two"):
        quantize_rtn(_w(4, 96), 4, 48, False, "x.weight")
    with pytest.raises(TrtbuildError, match="3-bit"):
        quantize_rtn(_w(4, 64), 3, 32, False, "x.weight")


def test_dequantize_names_missing_and_misshapen_tensors():
    cfg = _cfg("W4A16", True)
    t = {"x." + k: v for k, v in rtn_linear(_w(8, 64), 4, 32, True).items()}
    bad = dict(t)
    del bad["x.zero"]
    with pytest.raises(TrtbuildError, match="x.zero is missing"):
        dequantize_linear(bad, "x", cfg)
    bad = dict(t, **{"x.weights_scaling_factor": torch.ones(8, 3)})
    with pytest.raises(TrtbuildError, match="x.weights_scaling_factor"):
        dequantize_linear(bad, "x", cfg)
