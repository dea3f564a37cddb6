"""What an engine carries so that the CPU it runs on picks the exact and fast form of its ops.

onnxruntime picks its kernels by CPUID, and an engine is often built on one machine and run on
another. Two choices are left to load time (trtbuild.runtime.cpu_forms makes them):

- u8 x s8 GEMMs (W8A8): exact with VNNI or AMX, but on AVX2 without VNNI (and AVX-512 without
  VNNI) MLAS sums pairs of u8 x s8 products into int16 with saturation (vpmaddubsw: 255 x 127 x 2
  > 32767), which cost SmoothQuant +3.3% perplexity on an AMD Zen 3. A W8A8 engine also gets
  rank{N}.u8u8.engine: the same graph, but each GEMM takes its weight as u8 (s8 XOR 0x80, an
  expression onnxruntime folds when the session loads, read from the same data file, so nothing
  is stored twice) with zero point 128; u8 x u8 is exact on every CPU. A probe of one u8 x s8 GEMM
  whose pairs overflow int16 tells the runtime which form to open.
- prompt attention: trtbuild's CausalPromptAttention kernel or GroupQueryAttention, whichever is
  faster: probe graphs of one layer's prompt attention in each form, written with the network's own
  attention plugin, which the runtime times once per machine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from trtbuild.checkpoint import PretrainedConfig
from trtbuild.engine_io import (POSITION_IDS, PROBE_DIR, PROBE_QKV, PROMPT_ATTENTION_PROBES, U8S8_GEMM_PROBE,
                                U8S8_PROBE_INPUT, U8S8_PROBE_K, u8u8_engine_path)
from trtbuild.onnx_graph import GraphBuilder
from trtbuild.plugins.attention import add_graph_inputs, attention, declare_kv_io


def _u8s8_gemms(graph: onnx.GraphProto, initializers: dict[str, TensorProto]):
    """MatMulIntegerToFloat nodes of a graph and its If branches whose A is u8 (a u8 zero point) and
    whose B is an int8 initializer."""
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _u8s8_gemms(attr.g, initializers)
        if node.op_type != "MatMulIntegerToFloat" or len(node.input) < 5:
            continue
        b, a_zero = initializers.get(node.input[1]), initializers.get(node.input[4])
        if b is not None and b.data_type == TensorProto.INT8 and a_zero is not None \
                and a_zero.data_type == TensorProto.UINT8:
            yield node


def write_u8u8_form(engine_path: Path) -> Path | None:
    """Write rank{N}.u8u8.engine beside a compiled engine whose GEMMs are u8 x s8 (None: it has none)."""
    model = onnx.load(str(engine_path), load_external_data=False)
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    nodes = list(_u8s8_gemms(graph, initializers))
    if not nodes:
        return None
    zero = "u8u8/weight_zero_point"
    graph.initializer.append(helper.make_tensor(zero, TensorProto.UINT8, [], [128]))
    graph.initializer.append(helper.make_tensor("u8u8/sign_bit", TensorProto.UINT8, [], [0x80]))
    converted: dict[str, str] = {}
    prologue = []
    for node in nodes:
        weight = node.input[1]
        if weight not in converted:  # both If branches read one weight: converted once, at the top
            as_u8 = helper.make_node("Cast", [weight], [weight + "/as_u8"], to=TensorProto.UINT8,
                                     name=weight + "/as_u8")
            shifted = helper.make_node("BitwiseXor", [as_u8.output[0], "u8u8/sign_bit"], [weight + "/u8"],
                                       name=weight + "/u8")
            prologue += [as_u8, shifted]
            converted[weight] = shifted.output[0]
        node.input[1] = converted[weight]
        while len(node.input) < 6:
            node.input.append("")
        node.input[5] = zero
    nodes_after = list(graph.node)
    del graph.node[:]
    graph.node.extend(prologue + nodes_after)
    out = u8u8_engine_path(engine_path)
    onnx.save_model(model, str(out))  # initializers still point into rank{N}.engine.data
    return out


def write_u8s8_probe(path: Path) -> None:
    """One u8 x s8 GEMM as the engines write it (u8 zero point 128, s8 weights), B = 127."""
    node = helper.make_node("MatMulIntegerToFloat", [U8S8_PROBE_INPUT, "b", "one", "one", "a_zero", "b_zero"], ["y"],
                            domain="com.microsoft")
    inits = [helper.make_tensor("b", TensorProto.INT8, [U8S8_PROBE_K, 1], [127] * U8S8_PROBE_K),
             helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
             helper.make_tensor("a_zero", TensorProto.UINT8, [], [128]),
             helper.make_tensor("b_zero", TensorProto.INT8, [], [0])]
    graph = helper.make_graph([node], "u8s8_probe", [helper.make_tensor_value_info(U8S8_PROBE_INPUT, TensorProto.UINT8,
                                                                                   ["rows", U8S8_PROBE_K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    onnx.save_model(model, str(path))


def _attention_probe(path: Path, config: PretrainedConfig, max_seq_len: int, prompt: str | None,
                     kv_scales: np.ndarray | None) -> None:
    """Layer 0's attention over qkv [1, S, (H + 2 KV) D] into an empty cache, as the engine runs a
    prompt: with trtbuild's kernel (prompt "fmha") or GroupQueryAttention (None)."""
    g = GraphBuilder(path, name="prompt_attention_probe")
    try:
        H, KV, D = config.num_attention_heads, config.num_key_value_heads, config.head_size
        qkv = g.input(PROBE_QKV, TensorProto.FLOAT, [1, "sequence_length", (H + 2 * KV) * D])
        position_ids = g.input(POSITION_IDS, TensorProto.INT64, [1, "sequence_length"])
        shared = add_graph_inputs(g, config, True, max_seq_len, position_ids, qkv, np.dtype(np.float32))
        cache_type = TensorProto.INT8 if kv_scales is not None else TensorProto.FLOAT
        declare_kv_io(g, 0, config, True, cache_type)
        out = attention(g, qkv, 0, config, shared, cache_type, kv_scales, prompt=prompt)
        g.op("Identity", [out], outputs=["out"])
        g.output("out", TensorProto.FLOAT, [1, "sequence_length", H * D])
        g.save()
    finally:
        g.close()


def write_probes(engine_dir: Path, config: PretrainedConfig, max_seq_len: int, prompt_kernel: bool,
                 u8u8_form: bool, kv_scales: np.ndarray | None) -> None:
    """The probes the runtime needs for this engine's choices (none: no probes dir)."""
    if not (prompt_kernel or u8u8_form):
        return
    probes = engine_dir / PROBE_DIR
    probes.mkdir()
    if u8u8_form:
        write_u8s8_probe(probes / U8S8_GEMM_PROBE)
    if prompt_kernel:
        for form, prompt in (("kernel", "fmha"), ("gqa", None)):
            _attention_probe(probes / PROMPT_ATTENTION_PROBES[form], config, max_seq_len, prompt, kv_scales)
