"""trtbuild's LmHead kernel (a tied float32 lm_head, reading the embedding table where it lies): exact
against numpy at every tile edge, in the library built for this machine and in the AVX2 form; and an
fp32 engine built with it gives the logits the Gemm form gives, without onnxruntime's packed copy."""

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


def lm_head_session(w: np.ndarray, tmp_path, isa: str, threads: int = 2) -> ort.InferenceSession:
    """One LmHead node whose weight is an initializer in an external data file, as in an engine."""
    vi = helper.make_tensor_value_info
    node = helper.make_node("LmHead", ["x", "w"], ["y"], domain=kernels.DOMAIN)
    graph = helper.make_graph([node], "g", [vi("x", TensorProto.FLOAT, ["M", "K"])],
                              [vi("y", TensorProto.FLOAT, None)], initializer=[numpy_helper.from_array(w, "w")])
    return kernel_session(graph, tmp_path / f"lm_head_{isa}_{w.shape[0]}x{w.shape[1]}.onnx", isa, threads)


@pytest.mark.parametrize("N,K", [(1000, 576), (37, 64), (5, 8), (301, 67), (2, 3), (130, 1)])
def test_lm_head_matches_numpy(tmp_path, isa, N, K):
    rng = np.random.default_rng(N * K)
    w = rng.standard_normal((N, K)).astype(np.float32)
    session = lm_head_session(w, tmp_path, isa)
    # decode steps' rows (1..8: one tile), many rows (row blocks of 4 or 2, edges), and none
    for M in [1, 2, 3, 5, 8, 9, 13, 70, 0]:
        x = rng.standard_normal((M, K)).astype(np.float32)
        (y,) = session.run(None, {"x": x})
        want = x.astype(np.float64) @ w.T.astype(np.float64)
        assert y.shape == (M, N) and y.dtype == np.float32
        np.testing.assert_allclose(y, want, rtol=0, atol=1e-5 * max(1.0, np.sqrt(K)) * 4)


def test_lm_head_many_rows_cross_row_blocks(tmp_path, isa):
    """Rows past one block of x (256 KB of them) and a weight past one block of rows (64 KB)."""
    rng = np.random.default_rng(7)
    N, K, M = 2053, 1024, 70  # row block 64 rows at K = 1024: two blocks, the second partial
    w = rng.standard_normal((N, K)).astype(np.float32)
    x = rng.standard_normal((M, K)).astype(np.float32)
    (y,) = lm_head_session(w, tmp_path, isa, threads=3).run(None, {"x": x})
    np.testing.assert_allclose(y, x.astype(np.float64) @ w.T.astype(np.float64), rtol=0, atol=5e-4)


def test_lm_head_rejects_mismatched_shapes(tmp_path):
    session = lm_head_session(np.zeros((4, 8), np.float32), tmp_path, "native")
    with pytest.raises(Exception, match="LmHead: x must be \\[M, K\\] and w \\[N, K\\]"):
        session.run(None, {"x": np.zeros((2, 7), np.float32)})


def test_fp32_engine_lm_head_kernel_against_gemm(tiny_models, engines):
    """convert → build with and without the kernel → the same greedy tokens, logits within float
    rounding, and only the kernel's engine has LmHead (and its flag recorded)."""
    limits = dict(max_batch_size=2, max_input_len=32, max_seq_len=64)
    with_kernel = ModelRunner.from_dir(engines.engine(tiny_models["llama"], BuildConfig(**limits)), num_threads=2)
    gemm = ModelRunner.from_dir(engines.engine(tiny_models["llama"], BuildConfig(
        **limits, plugin_config=PluginConfig(lm_head_plugin=False))), num_threads=2)
    assert with_kernel.config.build_config.plugin_config.lm_head_plugin
    assert not gemm.config.build_config.plugin_config.lm_head_plugin
    graphs = {name: onnx.load(str(r.engine_dir / "rank0.engine"), load_external_data=False).graph
              for name, r in (("kernel", with_kernel), ("gemm", gemm))}
    assert "LmHead" in op_types(graphs["kernel"]) and "LmHead" not in op_types(graphs["gemm"])
    prompts = [[5, 6, 7, 8], [9, 10]]
    np.testing.assert_allclose(with_kernel.prefill(prompts, all_logits=True), gemm.prefill(prompts, all_logits=True),
                               rtol=0, atol=1e-4)
    sampling = SamplingConfig(max_new_tokens=8, end_id=-1)
    assert with_kernel.generate(prompts, sampling).output_ids == gemm.generate(prompts, sampling).output_ids


def test_untied_lm_head_keeps_gemm(tiny_models, engines):
    """An untied lm_head's packed copy replaces its original after load (no lasting memory to save)
    and Gemm decodes several rows faster: the engine keeps Gemm and records the flag off."""
    runner = ModelRunner.from_dir(engines.engine(tiny_models["mistral"], BuildConfig(
        max_batch_size=2, max_input_len=32, max_seq_len=64)), num_threads=1)
    assert not runner.config.build_config.plugin_config.lm_head_plugin
    graph = onnx.load(str(runner.engine_dir / "rank0.engine"), load_external_data=False).graph
    assert "LmHead" not in op_types(graph) and "Gemm" in op_types(graph)


def mapped_file_kb(path) -> int:
    """Resident kB of this process's mappings of `path` (/proc/self/smaps)."""
    total, current = 0, ""
    for line in open("/proc/self/smaps"):
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
            current = head[5] if len(head) > 5 else ""
        elif line.startswith("Rss:") and current == str(path):
            total += int(head[1])
    return total


def test_lm_head_moves_a_large_weight_out_of_the_file_and_a_tied_gather_reads_it(tmp_path):
    """A weight of several MB leaves onnxruntime's file mapping for anonymous memory at the same
    addresses (huge pages where the OS gives them): the Gather reading the same table (a tied model)
    gets the same rows, and the file's pages are no longer resident beside it."""
    rng = np.random.default_rng(3)
    N, K = 4099, 256  # 4.2 MB, not a whole number of pages
    w = rng.standard_normal((N, K)).astype(np.float32)
    vi = helper.make_tensor_value_info
    nodes = [helper.make_node("Gather", ["w", "ids"], ["rows"]),
             helper.make_node("LmHead", ["x", "w"], ["y"], domain=kernels.DOMAIN)]
    graph = helper.make_graph(nodes, "g", [vi("ids", TensorProto.INT64, ["R"]), vi("x", TensorProto.FLOAT, ["M", K])],
                              [vi("rows", TensorProto.FLOAT, None), vi("y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(w, "w")])
    session = kernel_session(graph, tmp_path / "tied.onnx")
    ids = np.array([0, 1, 2048, N - 1], np.int64)
    x = rng.standard_normal((3, K)).astype(np.float32)
    rows, y = session.run(None, {"ids": ids, "x": x})
    np.testing.assert_array_equal(rows, w[ids])
    np.testing.assert_allclose(y, x.astype(np.float64) @ w.T.astype(np.float64), rtol=0, atol=2e-4)
    assert mapped_file_kb(tmp_path / "tied.onnx.data") <= 64  # the first and last partial pages at most
