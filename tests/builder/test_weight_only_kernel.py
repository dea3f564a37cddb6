"""trtbuild's WeightOnlyQuantMatMul kernel (weight-only int4/int8 linears, int8 activations): exact
against a numpy model of what it computes and against onnxruntime's MatMulNBits at accuracy_level 4
(the op it replaces), in the library built for this machine, in the AVX2 form and, on a machine with
AMX, without AMX; the same bits in every form; its weights leave the file once packed; and a
weight-only engine built with it gives MatMulNBits' engine's logits."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from trtbuild import kernels
from trtbuild.engine import BuildConfig, PluginConfig
from trtbuild.runtime import ModelRunner, SamplingConfig

from conftest import kernel_session, op_types
from test_lm_head_kernel import mapped_file_kb


# The kernel's forms here: this machine's, the AVX2 one and, where this machine has AMX (tiles of
# kAmxMinRows rows or more then run TDPBSUD), this machine's without it, as an AVX-512 VNNI CPU runs it.
FORMS = ["native", "avx2", *(["native-no-amx"] if kernels.host_has_amx() else [])]


@pytest.fixture(params=FORMS)
def isa(request) -> str:
    return request.param


def all_nodes(graph):
    """The nodes of an ONNX graph and of every If branch inside it."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from all_nodes(attr.g)


def random_weights(rng, N: int, K: int, bits: int, block: int, zero_points: bool):
    """MatMulNBits' inputs for random values: (values [N, K_padded] uint8, b, scales, zero_points or None)."""
    blocks = -(-K // block)
    values = rng.integers(0, 1 << bits, (N, blocks * block), dtype=np.uint8)
    values[:, K:] = 0  # the padding of the last partial block, as trtbuild writes it
    b = (values[:, 0::2] | (values[:, 1::2] << 4)) if bits == 4 else values
    scales = (rng.random((N, blocks), dtype=np.float32) + 0.5) * 0.01
    zeros = None
    if zero_points:
        z = rng.integers(0, 1 << bits, (N, blocks), dtype=np.uint8)
        if bits == 4:
            z = np.pad(z, ((0, 0), (0, blocks % 2)))
            zeros = (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8)
        else:
            zeros = z
    return values, b.reshape(N, blocks, block * bits // 8).astype(np.uint8), scales, zeros


def reference(x: np.ndarray, values, scales, zeros, K: int, bits: int, block: int) -> np.ndarray:
    """What the kernel computes: x quantized to int8 per block of K (scale max|x| / 127, rounded half
    to even), times the weights less their zero points, block by block scaled."""
    N, k_padded = values.shape
    blocks = k_padded // block
    if zeros is None:
        z = np.full((N, blocks), 1 << (bits - 1), np.int64)
    elif bits == 4:
        z = np.stack([zeros & 0x0F, zeros >> 4], axis=2).reshape(N, -1)[:, :blocks].astype(np.int64)
    else:
        z = zeros.astype(np.int64)
    xp = np.zeros((x.shape[0], k_padded), np.float32)
    xp[:, :K] = x
    xb = xp.reshape(x.shape[0], blocks, block)
    sa = np.abs(xb).max(axis=2) / np.float32(127)
    inverse = np.where(sa > 0, 1 / np.where(sa > 0, sa, 1), 0).astype(np.float32)
    q = np.rint(xb * inverse[:, :, None]).astype(np.int64)  # [M, blocks, block]
    w = values.astype(np.int64).reshape(N, blocks, block) - z[:, :, None]
    dots = np.einsum("mbk,nbk->mnb", q, w)  # exact in int64
    return np.einsum("mnb,mb,nb->mn", dots.astype(np.float64), sa.astype(np.float64), scales.astype(np.float64))


def session(op: str, K: int, N: int, bits: int, block: int, b, scales, zeros, tmp_path, isa: str = "native",
            threads: int = 2, attributes: dict | None = None) -> ort.InferenceSession:
    """One node (trtbuild's kernel or MatMulNBits) whose weights lie in an external data file, as in an engine."""
    vi = helper.make_tensor_value_info
    inits = [numpy_helper.from_array(b, "b"), numpy_helper.from_array(scales, "scales")]
    if zeros is not None:
        inits.append(numpy_helper.from_array(zeros, "zero_points"))
    inputs = ["x", "b", "scales"] + (["zero_points"] if zeros is not None else [])
    if op == "kernel":
        node = helper.make_node("WeightOnlyQuantMatMul", inputs, ["y"], domain=kernels.DOMAIN, K=K, N=N, bits=bits,
                                block_size=block, **(attributes or {}))
    else:
        node = helper.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft", K=K, N=N, bits=bits,
                                block_size=block, accuracy_level=4)
    graph = helper.make_graph([node], "g", [vi("x", TensorProto.FLOAT, None)], [vi("y", TensorProto.FLOAT, None)],
                              initializer=inits)
    return kernel_session(graph, tmp_path / f"{op}_{isa}_{N}x{K}_{bits}_{block}.onnx", isa, threads)


# (N, K, bits, block, zero points): panels whole and partial (16 or 8 outputs), K a whole number of
# blocks or not, per-channel int8 (block 32), groups of 16 to 128, with and without zero points
CASES = [(1000, 576, 4, 32, False), (37, 100, 4, 32, False), (100, 576, 4, 128, True), (50, 200, 8, 64, False),
         (77, 576, 8, 32, True), (576, 1536, 8, 128, False), (5, 24, 4, 16, True), (33, 64, 8, 16, False)]


@pytest.mark.parametrize("N,K,bits,block,zero_points", CASES)
def test_kernel_matches_its_numpy_model_and_matmulnbits(tmp_path, isa, N, K, bits, block, zero_points):
    rng = np.random.default_rng(N * K + bits)
    values, b, scales, zeros = random_weights(rng, N, K, bits, block, zero_points)
    kernel = session("kernel", K, N, bits, block, b, scales, zeros, tmp_path, isa)
    nbits = session("nbits", K, N, bits, block, b, scales, zeros, tmp_path)
    # decode steps' rows (1..8: one tile on AVX-512, two on AVX2), many rows (AMX at blocks of 64 and
    # 128: tiles of 8 to 16 rows; 21, 35: full ones, then 5 or 3 for the vector tiles), and none
    for M in [1, 2, 3, 5, 8, 9, 13, 16, 21, 24, 35, 0]:
        x = rng.standard_normal((M, K)).astype(np.float32)
        (y,) = kernel.run(None, {"x": x})
        assert y.shape == (M, N) and y.dtype == np.float32
        want = reference(x, values, scales, zeros, K, bits, block)
        scale = max(1e-6, float(np.abs(want).max(initial=0)))
        np.testing.assert_allclose(y, want, rtol=0, atol=2e-6 * scale)  # float32 rounding of the sums only
        if M:  # MatMulNBits at accuracy_level 4 computes the same (its own order of float sums)
            (theirs,) = nbits.run(None, {"x": x})
            np.testing.assert_allclose(y, theirs, rtol=0, atol=2e-6 * scale)


@pytest.mark.parametrize("N,K,bits,block,zero_points", [CASES[0], CASES[2], CASES[3], CASES[5]])
def test_kernel_gives_the_same_bits_in_every_form(tmp_path, N, K, bits, block, zero_points):
    """Every form sums the same int32 products and scales them in the same order, so every CPU gives
    the same outputs: AVX2 and AVX-512 tiles, vpdpbusd or not, AMX or not."""
    rng = np.random.default_rng(N + K)
    _, b, scales, zeros = random_weights(rng, N, K, bits, block, zero_points)
    sessions = {isa: session("kernel", K, N, bits, block, b, scales, zeros, tmp_path, isa) for isa in FORMS}
    for M in [1, 4, 8, 16, 37]:
        x = rng.standard_normal((M, K)).astype(np.float32)
        outputs = {isa: s.run(None, {"x": x})[0] for isa, s in sessions.items()}
        for isa, y in outputs.items():
            np.testing.assert_array_equal(y, outputs["native"], err_msg=f"{isa} against native, {M} rows")


TILES_HELPER = r"""
#include <sys/syscall.h>
#include <unistd.h>
#include <cstdint>
struct alignas(64) Config { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; };
// MLAS's configuration for its AMX GEMMs: every tile 16 rows of 64 bytes (the process asks for the
// tiles first, as MLAS does)
extern "C" void load_gemm_config() {
  syscall(SYS_arch_prctl, 0x1023, 18);
  Config config = {1};
  for (int t = 0; t < 8; ++t) {
    config.colsb[t] = 64;
    config.rows[t] = 16;
  }
  asm volatile("ldtilecfg %0" : : "m"(config));
}
extern "C" void release_tiles() { asm volatile("tilerelease"); }
extern "C" void read_config(Config* out) { asm volatile("sttilecfg %0" : "=m"(*out)); }
"""


@pytest.mark.skipif(not kernels.host_has_amx(), reason="no AMX here: the kernel uses no tile registers")
def test_kernel_gives_other_amx_users_their_tiles_back(tmp_path):
    """onnxruntime's own u8 x s8 GEMMs (MLAS) load their AMX tile configuration once per thread and
    count on finding it there at every later call (a W8A8 engine runs them beside the kernel, its
    lm_head): the kernel leaves each thread's tile configuration as it found it, loaded or none."""
    import ctypes
    import subprocess

    source = tmp_path / "tiles.cc"
    source.write_text(TILES_HELPER)
    subprocess.run([kernels.find_compiler(), "-O2", "-shared", "-fPIC", str(source), "-o",
                    str(tmp_path / "tiles.so")], check=True)
    tiles = ctypes.CDLL(str(tmp_path / "tiles.so"))
    rng = np.random.default_rng(5)
    N, K, bits, block = 64, 256, 4, 64  # blocks of 64, 8 rows: AMX's tiles
    values, b, scales, zeros = random_weights(rng, N, K, bits, block, False)
    ours = session("kernel", K, N, bits, block, b, scales, zeros, tmp_path, threads=1)  # on this thread
    x = rng.standard_normal((8, K)).astype(np.float32)
    want = reference(x, values, scales, zeros, K, bits, block)

    def config() -> bytes:
        out = ctypes.create_string_buffer(64)
        tiles.read_config(out)
        return out.raw

    for setup in (tiles.load_gemm_config, tiles.release_tiles):
        setup()
        before = config()
        np.testing.assert_allclose(ours.run(None, {"x": x})[0], want, rtol=0, atol=2e-6 * np.abs(want).max())
        assert config() == before, f"the kernel left the tiles configured otherwise after {setup.__name__}"


def silu_gated(x: np.ndarray) -> np.ndarray:
    """[..., 2K] = [fc, gate] → silu(fc) * gate, in float32 as the kernel computes it."""
    fc, gate = np.split(x.astype(np.float64), 2, axis=-1)
    return (fc / (1 + np.exp(-fc)) * gate).astype(np.float32)


@pytest.mark.parametrize("N,K,bits,block", [(40, 96, 4, 32), (24, 200, 8, 64)])
def test_kernel_swiglu_quantizes_silu_fc_times_gate(tmp_path, isa, N, K, bits, block):
    """swiglu: x is a gated MLP's [fc, gate] (2K wide) and the op multiplies silu(fc) * gate."""
    rng = np.random.default_rng(K)
    values, b, scales, zeros = random_weights(rng, N, K, bits, block, False)
    s = session("kernel", K, N, bits, block, b, scales, zeros, tmp_path, isa, attributes={"swiglu": 1})
    for M in [1, 8, 20]:
        x = (rng.standard_normal((M, 2 * K)) * 3).astype(np.float32)
        (y,) = s.run(None, {"x": x})
        want = reference(silu_gated(x), values, scales, zeros, K, bits, block)
        # silu's exponential (relative error ~2e-7) may move a value across a rounding step of int8
        np.testing.assert_allclose(y, want, rtol=0, atol=2e-3 * np.abs(want).max())
    with pytest.raises(Exception, match="x must be \\[..., 2K\\] with K = " + str(K)):
        s.run(None, {"x": np.zeros((1, K), np.float32)})


def test_kernel_many_rows_and_batched_input(tmp_path, isa):
    """A prompt's rows past one block of rows (256 KB of int8 activations), given as [batch, seq, K]."""
    rng = np.random.default_rng(11)
    N, K, bits, block = 70, 2048, 4, 64
    values, b, scales, zeros = random_weights(rng, N, K, bits, block, False)
    x = rng.standard_normal((2, 150, K)).astype(np.float32)  # row block at K = 2048: 128 rows
    (y,) = session("kernel", K, N, bits, block, b, scales, zeros, tmp_path, isa, threads=3).run(None, {"x": x})
    assert y.shape == (2, 150, N)
    want = reference(x.reshape(-1, K), values, scales, zeros, K, bits, block).reshape(2, 150, N)
    np.testing.assert_allclose(y, want, rtol=0, atol=2e-6 * np.abs(want).max())


def test_kernel_rejects_bad_attributes_and_shapes(tmp_path):
    rng = np.random.default_rng(5)
    _, b, scales, _ = random_weights(rng, 8, 64, 4, 32, False)
    with pytest.raises(Exception, match="WeightOnlyQuantMatMul: b has 256 bytes, not N x blocks"):
        session("kernel", 64, 16, 4, 32, b, np.zeros((16, 2), np.float32), None, tmp_path)
    with pytest.raises(Exception, match="WeightOnlyQuantMatMul: bits must be 4 or 8, not 3"):
        session("kernel", 64, 8, 3, 32, b, scales, None, tmp_path)
    with pytest.raises(Exception, match="WeightOnlyQuantMatMul: block_size must be a multiple of 16, not 24"):
        session("kernel", 64, 8, 4, 24, b, scales, None, tmp_path)
    vi = helper.make_tensor_value_info
    node = helper.make_node("WeightOnlyQuantMatMul", ["x", "b", "scales", "z"], ["y"], domain=kernels.DOMAIN,
                            K=64, N=8, bits=4, block_size=32)
    graph = helper.make_graph([node], "g", [vi("x", TensorProto.FLOAT, None), vi("z", TensorProto.UINT8, None)],
                              [vi("y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(b, "b"), numpy_helper.from_array(scales, "scales")])
    with pytest.raises(Exception, match="WeightOnlyQuantMatMul: zero_points must be an initializer"):
        kernel_session(graph, tmp_path / "graph_zero_points.onnx")
    good = session("kernel", 64, 8, 4, 32, b, scales, None, tmp_path)
    with pytest.raises(Exception, match="WeightOnlyQuantMatMul: x must be \\[..., K\\] with K = 64"):
        good.run(None, {"x": np.zeros((2, 63), np.float32)})


@pytest.mark.parametrize("shared", [False, True])
def test_kernel_gives_the_files_pages_back_unless_shared(tmp_path, shared):
    """Once packed, the weights' pages in onnxruntime's mapping of the file are dropped (memory holds
    the packed copy only, as with MatMulNBits' prepacking), unless another node reads them too."""
    rng = np.random.default_rng(9)
    N, K, bits, block = 4096, 1024, 8, 32  # 4 MB of int8 weights
    values, b, scales, zeros = random_weights(rng, N, K, bits, block, False)
    s = session("kernel", K, N, bits, block, b, scales, zeros, tmp_path, attributes={"weights_shared": int(shared)})
    x = rng.standard_normal((2, K)).astype(np.float32)
    (y,) = s.run(None, {"x": x})
    want = reference(x, values, scales, zeros, K, bits, block)
    np.testing.assert_allclose(y, want, rtol=0, atol=2e-6 * np.abs(want).max())
    resident = mapped_file_kb(tmp_path / f"kernel_native_{N}x{K}_{bits}_{block}.onnx.data")
    assert (resident >= 4000) if shared else (resident <= 64), resident  # partial pages at most


@pytest.mark.parametrize("quant", [["--use_weight_only", "--weight_only_precision", "int4", "--per_group",
                                    "--group_size", "32"],
                                   ["--use_weight_only", "--weight_only_precision", "int8"]],
                         ids=["int4_g32", "int8"])
def test_weight_only_engine_kernel_against_matmulnbits(tiny_models, engines, quant):
    """convert (weight-only) → build with and without the kernel → the same greedy tokens and logits
    within float rounding; only the kernel's engine has WeightOnlyQuantMatMul (lm_head too, in int8)
    and records its flag, and each gated MLP's proj takes [fc, gate] whole (no Split, SiLU and Mul)."""
    limits = dict(max_batch_size=2, max_input_len=32, max_seq_len=64)
    with_kernel = ModelRunner.from_dir(engines.engine(tiny_models["llama"], BuildConfig(**limits), quant=quant),
                                       num_threads=2)
    nbits = ModelRunner.from_dir(engines.engine(tiny_models["llama"], BuildConfig(
        **limits, plugin_config=PluginConfig(weight_only_quant_matmul_plugin=False)), quant=quant), num_threads=2)
    assert with_kernel.config.build_config.plugin_config.weight_only_quant_matmul_plugin
    assert not nbits.config.build_config.plugin_config.weight_only_quant_matmul_plugin
    graphs = {name: onnx.load(str(r.engine_dir / "rank0.engine"), load_external_data=False).graph
              for name, r in (("kernel", with_kernel), ("nbits", nbits))}
    assert "MatMulNBits" not in op_types(graphs["kernel"]) and "WeightOnlyQuantMatMul" in op_types(graphs["kernel"])
    assert "WeightOnlyQuantMatMul" not in op_types(graphs["nbits"]) and "MatMulNBits" in op_types(graphs["nbits"])
    nodes = list(all_nodes(graphs["kernel"]))
    swiglu = {n.name for n in nodes if n.op_type == "WeightOnlyQuantMatMul"
              and any(a.name == "swiglu" and a.i == 1 for a in n.attribute)}
    layers = with_kernel.config.pretrained_config.num_hidden_layers
    assert swiglu == {f"transformer.layers.{i}.mlp.proj/WeightOnlyQuantMatMul" for i in range(layers)}, swiglu
    by_name = {n.name: n for n in nodes}
    for i in range(layers):  # proj reads the merged fc+gate GEMM's output itself
        fc_gate = by_name[f"transformer.layers.{i}.mlp.fc+gate/WeightOnlyQuantMatMul"]
        assert by_name[f"transformer.layers.{i}.mlp.proj/WeightOnlyQuantMatMul"].input[0] == fc_gate.output[0]
    prompts = [[5, 6, 7, 8], [9, 10]]
    ours, theirs = with_kernel.prefill(prompts, all_logits=True), nbits.prefill(prompts, all_logits=True)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4 * max(1.0, float(np.abs(theirs).max())))
    sampling = SamplingConfig(max_new_tokens=8, end_id=-1)
    assert with_kernel.generate(prompts, sampling).output_ids == nbits.generate(prompts, sampling).output_ids


def test_float_activations_keep_matmulnbits(tiny_models, engines):
    """--weight_only_activations float (exactly A16) is MatMulNBits' accuracy_level 0: the kernel,
    which computes in int8, is not used and its flag is recorded off."""
    runner = ModelRunner.from_dir(engines.engine(tiny_models["llama"], BuildConfig(
        max_batch_size=1, max_input_len=16, max_seq_len=32, weight_only_activations="float"),
        quant=["--use_weight_only", "--weight_only_precision", "int8"]), num_threads=1)
    assert not runner.config.build_config.plugin_config.weight_only_quant_matmul_plugin
    graph = onnx.load(str(runner.engine_dir / "rank0.engine"), load_external_data=False).graph
    assert "WeightOnlyQuantMatMul" not in op_types(graph) and "MatMulNBits" in op_types(graph)
