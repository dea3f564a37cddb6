"""The decoder network as an ONNX graph, written from the checkpoint's tensors (not traced).

Graph inputs: input_ids [B, S], position_ids [B, S], logits_positions [B, K] (which positions'
logits to return: the last token of each row while generating, every position for scoring),
plus the attention plugin's inputs (see trtbuild.plugins.attention) and per-layer KV cache.
Output: logits [B, K, vocab] float32 and present KV.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from onnx import TensorProto
from tqdm import tqdm

from trtbuild.checkpoint import PretrainedConfig
from trtbuild.engine_io import (INPUT_IDS, LOGITS, LOGITS_POSITIONS, MPI_HANDLES, PIPELINE_SENT, POSITION_IDS,
                                USE_PROMPT_KERNEL, kv_io_names)
from trtbuild.models import family_of
from trtbuild.models.base import linear_spec
from trtbuild.onnx_graph import NP_TO_ONNX, GraphBuilder
from trtbuild.plugins.attention import (AttentionInputs, QKNorm, add_graph_inputs, attention, declare_kv_io,
                                        prompt_condition)
from trtbuild.plugins.gemm import linear, merge_linears
from trtbuild.plugins.norm import add_norm, norm
from trtbuild.plugins.quant_gemm import nbits_matmul, pack_int4, smoothquant_swiglu_mlp, weight_only_linear
from trtbuild.ranks import RankPlace

if TYPE_CHECKING:
    from trtbuild.plugins.lora import LoraNetworkOptions
    from trtbuild.quant_algo import QuantAlgo


@dataclass
class NetworkOptions:
    """What the builder decided: compute dtype and which plugins are fused."""

    dtype: str = "float32"  # compute dtype of the graph
    fused_attention: bool = True
    fused_gemm: bool = True
    fused_norm: bool = True
    max_seq_len: int = 2048
    # fused attention: how prompts into an empty cache attend (plugins.attention, `prompt`):
    # "fmha" (trtbuild's kernel, every length and batch; every other step then runs its
    # GenerationAttention kernel), "split" (GroupQueryAttention in halves, one
    # prompt of context_split[0] <= tokens < context_split[1]) or None (as every other step)
    prompt_attention: str | None = None
    context_split: tuple[int, int] = (0, 0)
    # gemm plugin, W8A8 per token: activations quantized by trtbuild's kernels (plugins.quant_gemm)
    smooth_quant_kernels: bool = False
    # a float lm_head as trtbuild's LmHead op (no packed copy of the weight; float32, tied only)
    lm_head_kernel: bool = False
    # weight-only GEMMs (and an int8 lm_head) as trtbuild's WeightOnlyQuantMatMul, not MatMulNBits
    weight_only_kernel: bool = False
    quantize_lm_head: bool = True
    lm_head_precision: str = "int8"  # a quantized lm_head's weights: "int8" or "int4" (BuildConfig)
    # weight-only GEMMs: "int8" (activations quantized per block, fast) or "float" (exact A16)
    weight_only_activations: str = "int8"
    lora: LoraNetworkOptions | None = None


def lm_head_in_int8(algo: QuantAlgo | None, quantize_lm_head: bool) -> bool:
    """Engines with quantized linears (weight-only and SmoothQuant W8A8) also read lm_head as int8,
    weight-only (unless built with --no_quantize_lm_head): at fp32 it would be the largest weight
    read per token (vocab x hidden), capping decode speed, and with the float embedding table the
    largest part of memory (a 0.5B Qwen2's W8A8 engine: 1.1 of 1.45 GB)."""
    return quantize_lm_head and algo is not None


def quantize_lm_head(config: PretrainedConfig, options: "NetworkOptions") -> bool:
    """lm_head_in_int8 for the checkpoint's quantization and the build's options."""
    return lm_head_in_int8(config.quantization.algo, options.quantize_lm_head)


EMBEDDING_BLOCK = 32  # the int8 vocabulary tables: one scale per 32 values of a row
LM_HEAD_INT4_BLOCK = 32  # an int4 lm_head's blocks along the hidden size (onnxruntime-genai's int4 block)


def quantize_embedding(config: PretrainedConfig, options: "NetworkOptions") -> bool:
    """Engines that read lm_head in int8 store the embedding table in int8 too, per block of
    EMBEDDING_BLOCK along the hidden size (onnxruntime's GatherBlockQuantized; the standard form
    gathers the same values in float), and a tied lm_head reads that one table."""
    return quantize_lm_head(config, options) and config.hidden_size % EMBEDDING_BLOCK == 0


def rtn_blocks(weight: np.ndarray, block: int, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric round-to-nearest per block of `block` inputs of each row (block = the row: per
    channel) to `bits` (8 or 4) bits, as the weight-only checkpoint holds it before int4 packing:
    (values + 2^(bits-1) as uint8 [rows, cols], scales [rows, cols / block]). For an int4 lm_head this
    beat the 16-level form with a least-squares scale (-8..7: 0.77x the weights' squared error, yet
    SmolLM2's perplexity 36.70 against 36.28): clipping a row's largest values costs its logits more."""
    w = np.asarray(weight, np.float32)
    blocks = w.reshape(w.shape[0], -1, block)
    top = (1 << (bits - 1)) - 1
    scale = np.maximum(np.abs(blocks).max(axis=2), 1e-12) / top
    q = (np.clip(np.rint(blocks / scale[:, :, None]), -top, top) + top + 1).astype(np.uint8)
    return q.reshape(w.shape), scale.astype(np.float32)


def all_reduce(g: GraphBuilder, x: str, mpi: str, dtype: np.dtype, name: str) -> str:
    """x summed over the tensor-parallel ranks (trtbuild's AllReduce kernel, float32: a float16
    graph sums in float32)."""
    if dtype == np.float32:
        return g.op("AllReduce", [x, mpi], domain="trtbuild", name=name + "/AllReduce")
    y = g.op("AllReduce", [g.op("Cast", [x], to=TensorProto.FLOAT), mpi], domain="trtbuild", name=name + "/AllReduce")
    return g.op("Cast", [y], to=NP_TO_ONNX[dtype])


def _activation(g: GraphBuilder, x: str, act: str) -> str:
    if act == "silu":
        return g.op("Mul", [x, g.op("Sigmoid", [x])])
    if act in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return g.op("Gelu", [x], approximate="tanh")
    if act == "gelu":
        return g.op("Gelu", [x])
    if act == "relu":
        return g.op("Relu", [x])
    raise ValueError(f"unsupported activation {act}")


@dataclass
class LayerOps:
    """What a family's ONNX layer (trtbuild.models, `Family.onnx_layer`) builds a decoder layer
    from: the graph builder, the checkpoint's tensors and the network options, behind the blocks
    every family shares (norms, linears with their quantization and LoRA, attention, MLP)."""

    g: GraphBuilder
    config: PretrainedConfig
    tensors: dict[str, np.ndarray]
    options: NetworkOptions
    dtype: np.dtype
    shared: AttentionInputs
    cache_type: int
    lora_inputs: object = None
    # True for steps that are prompts the prompt attention form serves (plugins.attention); None:
    # every step takes the decode form
    prompt_condition: str | None = None
    # "fmha" engines: the runtime's choice of prompt form on its CPU (USE_PROMPT_KERNEL), an If
    # inside the prompt branch: the kernel or GroupQueryAttention
    use_prompt_kernel: str | None = None
    mpi: str | None = None  # a tensor-parallel rank's MPI handles input (trtbuild.ranks)

    def w(self, name: str) -> str:
        return self.g.weight(name, np.asarray(self.tensors[name], dtype=self.dtype))

    def opt_w(self, name: str) -> str | None:
        return self.w(name) if name in self.tensors else None

    def norm(self, x: str, prefix: str) -> str:
        """The norm `prefix` (its .weight and, for layer_norm, .bias) over the last axis of x."""
        c = self.config
        return norm(self.g, x, self.w(prefix + ".weight"), self.opt_w(prefix + ".bias"), c.norm_type,
                    c.norm_epsilon, self.options.fused_norm)

    def add_norm(self, pending: str | None, residual: str, prefix: str) -> tuple[str, str]:
        """(norm(pending + residual), pending + residual); (norm(residual), residual) without pending."""
        if pending is None:
            return self.norm(residual, prefix), residual
        c = self.config
        return add_norm(self.g, pending, residual, self.w(prefix + ".weight"), self.opt_w(prefix + ".bias"),
                        c.norm_type, c.norm_epsilon, self.options.fused_norm)

    @property
    def tensor_parallel(self) -> bool:
        return self.mpi is not None and self.config.mapping.tp_size > 1

    def linear(self, x: str, prefix: str, swiglu: bool = False) -> str:
        """The linear `prefix` on x; on a tensor-parallel rank a row-parallel one sums its partial
        output over the ranks (AllReduce) and adds its bias once, after the sum. `swiglu`: x is a
        gated SiLU MLP's [fc, gate] and the linear multiplies silu(fc) * gate (see swiglu_in_proj)."""
        o, g = self.options, self.g
        tensors, bias = self._bias_apart(prefix)
        y = linear(g, x, tensors, prefix, self.dtype, o.fused_gemm, self.config.quantization,
                   o.smooth_quant_kernels, o.weight_only_activations, o.weight_only_kernel, swiglu)
        if self.lora_inputs is not None:
            y = o.lora.apply(g, x, y, prefix, self.lora_inputs)
        return self._reduced(y, prefix, bias)

    def _bias_apart(self, prefix: str) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """(tensors, None), or for a row-parallel linear of a tensor-parallel rank (tensors without
        its bias, the bias): the bias is added once, after the ranks' sum."""
        reduce = self.tensor_parallel and linear_spec(self.config, prefix).parallel == "row"
        if not reduce or prefix + ".bias" not in self.tensors:
            return self.tensors, None
        return {k: v for k, v in self.tensors.items() if k != prefix + ".bias"}, self.tensors[prefix + ".bias"]

    def _reduced(self, y: str, prefix: str, bias: np.ndarray | None) -> str:
        """A row-parallel linear's output summed over the ranks, then its bias (see _bias_apart)."""
        if not self.tensor_parallel or linear_spec(self.config, prefix).parallel != "row":
            return y
        g = self.g
        y = all_reduce(g, y, self.mpi, self.dtype, prefix)
        if bias is not None:
            y = g.op("Add", [y, g.weight(prefix + ".bias", np.asarray(bias, dtype=self.dtype))], name=prefix + "/Add")
        return y

    def swiglu_in_proj(self, proj: str) -> bool:
        """A gated SiLU MLP whose proj runs trtbuild's WeightOnlyQuantMatMul takes the merged fc and
        gate output whole and applies silu(fc) * gate while quantizing it (three nodes a layer less);
        not with LoRA (each of fc and gate takes its own delta) or a prequant scale on proj (AWQ)."""
        o = self.options
        return (self.config.hidden_act == "silu" and o.weight_only_kernel and o.fused_gemm and self.lora_inputs is None
                and proj + ".weights_scaling_factor" in self.tensors and proj + ".prequant_scaling_factor" not in self.tensors
                and proj + ".act_scale" not in self.tensors)

    def merged_linear(self, x: str, prefixes: list[str]) -> str | None:
        """Linears sharing input x as one GEMM of their stacked outputs (None: they cannot merge)."""
        g, o = self.g, self.options
        name = prefixes[0] + "".join("+" + prefix.rsplit(".", 1)[-1] for prefix in prefixes[1:])
        merged = merge_linears(self.tensors, prefixes, name)
        if merged is None:
            return None
        return linear(g, x, merged, name, self.dtype, o.fused_gemm, self.config.quantization, o.smooth_quant_kernels,
                      o.weight_only_activations, o.weight_only_kernel)

    def linears(self, x: str, prefixes: list[str]) -> list[str]:
        """Linears sharing input x as one GEMM of their stacked outputs, split after."""
        g, o = self.g, self.options
        y = self.merged_linear(x, prefixes)
        if y is None:
            return [self.linear(x, prefix) for prefix in prefixes]
        sizes = [np.asarray(self.tensors[prefix + ".weight"]).shape[0] for prefix in prefixes]
        ys = g.op("Split", [y, g.const(sizes)], num_outputs=len(prefixes), axis=-1)
        if self.lora_inputs is not None:
            ys = [o.lora.apply(g, x, y, prefix, self.lora_inputs) for y, prefix in zip(ys, prefixes)]
        return ys

    def self_attention(self, x: str, i: int) -> str:
        """qkv → (q / k norms) → attention over the layer's KV cache → dense."""
        c, p, g = self.config, f"transformer.layers.{i}.", self.g
        qkv = self.linear(x, p + "attention.qkv")
        present = kv_io_names(i)[2:]
        qk_norm = (QKNorm(self.w(p + "attention.q_norm.weight"), self.w(p + "attention.k_norm.weight"),
                          c.norm_epsilon, self.options.fused_norm) if c.qk_norm else None)
        kv_scales = self.tensors.get(p + "attention.kv_cache_scaling_factor")
        prompt = self.options.prompt_attention if self.prompt_condition is not None else None
        if prompt == "fmha" and c.window(i):
            prompt = None  # the kernel has no window: both branches would be the decode form
        generation = prompt == "fmha"  # trtbuild's kernels: GenerationAttention for every other step

        def branch(form: str | None, use_kernel: str | None = None, generation: bool = False) -> tuple[list, list[str]]:
            """An If branch: the attention of `form` into fresh present names (with `use_kernel`:
            an If of its own between the kernel and GroupQueryAttention, for prompts)."""
            with g.subgraph() as nodes:
                outputs = [g.fresh(present[0]), g.fresh(present[1])]
                if use_kernel is None:
                    y = attention(g, qkv, i, c, self.shared, self.cache_type, kv_scales, tuple(outputs), form, qk_norm,
                                  generation=generation)
                else:
                    y, *outputs = g.if_op(use_kernel, [branch(form), branch(None)],
                                          self._attention_outputs(p, tuple(outputs)), name=p + "attention/prompt_kernel")
            return nodes, [y, *outputs]

        if prompt is None:
            attn = attention(g, qkv, i, c, self.shared, self.cache_type, kv_scales, present, None, qk_norm)
        else:
            # An If around the attention alone, not around the layers: weights read in two branches
            # stay resident beside their prepacked copies while onnxruntime loads the engine
            # (SmolLM2 fp32: peak 1115 MB against 685), and an If costs ~1 us a step.
            use_kernel = self.use_prompt_kernel if generation else None
            attn = g.if_op(self.prompt_condition, [branch(prompt, use_kernel), branch(None, generation=generation)],
                           self._attention_outputs(p, present), name=p + "attention/prompt_attention")[0]
        return self.linear(attn, p + "attention.dense")

    def _attention_outputs(self, p: str, present: tuple[str, str]) -> list[tuple[str, int, list]]:
        """An attention If's outputs: (output, present key, present value) with types and shapes."""
        c = self.config
        kv_shape = ["batch_size", c.num_key_value_heads, "max_sequence_length", c.head_size]
        return [(self.g.fresh(p + "attention/out"), NP_TO_ONNX[self.dtype],
                 ["batch_size", "sequence_length", c.num_attention_heads * c.head_size]),
                (present[0], self.cache_type, kv_shape), (present[1], self.cache_type, kv_shape)]

    def mlp(self, x: str, i: int) -> str:
        """fc → activation (× gate) → proj; W8A8 per token with trtbuild's kernels: a gated SiLU
        MLP's middle is one SwiGLUQuantize."""
        c, p, g = self.config, f"transformer.layers.{i}.", self.g
        if (self.options.smooth_quant_kernels and c.gated_mlp and c.hidden_act == "silu"
                and self.lora_inputs is None):
            merged = merge_linears(self.tensors, [p + "mlp.fc", p + "mlp.gate"], p + "mlp.fc+gate")
            if merged is not None:
                tensors, bias = self._bias_apart(p + "mlp.proj")
                y = smoothquant_swiglu_mlp(g, x, merged, p + "mlp.fc+gate", tensors, p + "mlp.proj")
                if y is not None:  # None: biases or a proj smoothing scale need the unfused form below
                    return self._reduced(y, p + "mlp.proj", bias)
        if c.gated_mlp and self.swiglu_in_proj(p + "mlp.proj"):
            fc_gate = self.merged_linear(x, [p + "mlp.fc", p + "mlp.gate"])
            if fc_gate is not None:
                return self.linear(fc_gate, p + "mlp.proj", swiglu=True)
        if c.gated_mlp:
            fc, gate = self.linears(x, [p + "mlp.fc", p + "mlp.gate"])
            hidden = g.op("Mul", [_activation(g, fc, c.hidden_act), gate])
        else:
            hidden = _activation(g, self.linear(x, p + "mlp.fc"), c.hidden_act)
        return self.linear(hidden, p + "mlp.proj")


def embed_tokens(g: GraphBuilder, ops: LayerOps, config: PretrainedConfig, options: NetworkOptions,
                 tensors: dict[str, np.ndarray], input_ids: str, position_ids: str,
                 dtype: np.dtype) -> tuple[str, str | None, str | None, tuple | None]:
    """The token (and learned position) embeddings → (hidden states, the float table, the int8
    table's initializer, the int8 table's (values, scales)): what a tied lm_head reads again."""
    embedding = table = None
    int8_table = (rtn_blocks(tensors["transformer.vocab_embedding.weight"], EMBEDDING_BLOCK)
                  if quantize_embedding(config, options) else None)
    if int8_table is not None and options.fused_gemm:
        q, scales = int8_table
        V, H = q.shape
        table = g.weight("transformer.vocab_embedding.qweight", q.reshape(V, H // EMBEDDING_BLOCK, EMBEDDING_BLOCK))
        rows = g.op("GatherBlockQuantized", [table, input_ids, g.weight(
            "transformer.vocab_embedding.gather_scales", scales[:, :, None].astype(dtype))],
            domain="com.microsoft", name="embedding/GatherBlockQuantized", gather_axis=0, quantize_axis=2,
            block_size=EMBEDDING_BLOCK, bits=8)
        h = g.op("Reshape", [rows, g.const([0, 0, H])], name="embedding")
    else:
        if int8_table is not None:  # the standard form gathers the same values, dequantized
            q, scales = int8_table
            dequantized = (q.astype(np.float32) - 128).reshape(q.shape[0], -1, EMBEDDING_BLOCK) * scales[:, :, None]
            embedding = g.weight("transformer.vocab_embedding.weight", dequantized.reshape(q.shape).astype(dtype))
        else:
            embedding = ops.w("transformer.vocab_embedding.weight")
        h = g.op("Gather", [embedding, input_ids], axis=0, name="embedding")
    if config.embedding_multiplier != 1.0:
        h = g.op("Mul", [h, g.const(config.embedding_multiplier, dtype=dtype)], name="embedding_scale")
    if config.position_embedding_type == "learned_absolute":
        pos = g.op("Gather", [ops.w("transformer.position_embedding.weight"), position_ids], axis=0)
        h = g.op("Add", [h, pos])
    return h, embedding, table, int8_table


def build_network(config: PretrainedConfig, tensors: dict[str, np.ndarray], options: NetworkOptions,
                  onnx_path: Path, progress: bool = True, metadata: dict[str, str] | None = None,
                  place: RankPlace | None = None) -> Path:
    """Write the decoder for `config` with weights `tensors` to onnx_path (+ onnx_path.data);
    `metadata`: the model's metadata_props (what build the engine belongs to); `place`: a rank's
    place among several (trtbuild.ranks; `config` is then that rank's share)."""
    dtype = np.dtype(options.dtype) if options.dtype != "bfloat16" else np.dtype("float32")
    float_type = NP_TO_ONNX[dtype]
    quant = config.quantization
    family = family_of(config)
    g = GraphBuilder(onnx_path, metadata=metadata)
    try:
        input_ids = g.input(INPUT_IDS, TensorProto.INT64, ["batch_size", "sequence_length"])
        position_ids = g.input(POSITION_IDS, TensorProto.INT64, ["batch_size", "sequence_length"])
        logits_positions = g.input(LOGITS_POSITIONS, TensorProto.INT64, ["batch_size", "num_logits"])
        shared = add_graph_inputs(g, config, options.fused_attention, options.max_seq_len, position_ids, input_ids,
                                  dtype)
        lora_inputs = options.lora.add_graph_inputs(g) if options.lora else None
        cache_type = TensorProto.INT8 if quant.kv_cache_quant_algo == "INT8" else float_type
        tp = config.mapping.tp_size
        mpi = g.input(MPI_HANDLES, TensorProto.INT64, [4]) if place is not None else None
        ops = LayerOps(g, config, tensors, options, dtype, shared, cache_type, lora_inputs, mpi=mpi)

        if place is None or place.first_stage:
            h, embedding, table, int8_table = embed_tokens(g, ops, config, options, tensors, input_ids, position_ids,
                                                           dtype)
        else:  # the previous stage's hidden states
            embedding = table = int8_table = None
            h = g.op("PipelineRecv", [input_ids, mpi], domain="trtbuild", name="pipeline/recv",
                     peer=place.rank - tp, hidden_size=config.hidden_size)
            if dtype != np.float32:
                h = g.op("Cast", [h], to=float_type)
        for i in range(config.num_hidden_layers):
            declare_kv_io(g, i, config, options.fused_attention, cache_type)

        if options.fused_attention and options.prompt_attention is not None:
            fmha = options.prompt_attention == "fmha"
            window = (1, None) if fmha else options.context_split
            cond = prompt_condition(g, input_ids, shared, *window, single=not fmha)
            # fmha: the runtime says whether the kernel is the faster prompt form on its CPU (an If
            # inside the prompt branch)
            use_kernel = g.input(USE_PROMPT_KERNEL, TensorProto.BOOL, []) if fmha else None
            ops = dataclasses.replace(ops, prompt_condition=cond, use_prompt_kernel=use_kernel)
        pending, residual = None, h  # the last block's output, still to be added to the residual
        for i in tqdm(range(config.num_hidden_layers), desc="network", unit="layer", disable=not progress):
            pending, residual = family.onnx_layer(ops, i, pending, residual)
        if pending is not None:
            h = g.op("Add", [pending, residual])
        if place is not None and not place.last_stage:  # on to the next stage, which the last follows
            if dtype != np.float32:
                h = g.op("Cast", [h], to=TensorProto.FLOAT)
            g.op("PipelineSend", [h, mpi], domain="trtbuild", name="pipeline/send", outputs=[PIPELINE_SENT],
                 peer=place.rank + tp)
            g.output(PIPELINE_SENT, TensorProto.FLOAT, [1])
            return g.save()
        # Only the requested positions go through the final norm and lm_head.
        picked = g.op("GatherND", [h, g.op("Unsqueeze", [logits_positions, g.const([2])])], batch_dims=1)
        h = ops.norm(picked, "transformer.ln_f")
        # an int8 lm_head's ops take [..., hidden] and keep its leading dims: its logits come out as
        # [batch, num_logits, vocab], with no Reshape after them (which copies into the bound output)
        shaped = quantize_lm_head(config, options) and tp == 1
        flat = h if shaped else g.op("Reshape", [h, g.const([-1, config.hidden_size])])
        lm_head_name = "transformer.vocab_embedding.weight" if config.tie_word_embeddings else "lm_head.weight"
        if quantize_lm_head(config, options) and options.lm_head_precision == "int4":
            # its own int4 copy even where tied: the embedding table's int8 rows are gathered, not read whole
            q, scales = rtn_blocks(tensors[lm_head_name], LM_HEAD_INT4_BLOCK, bits=4)
            int4 = {"lm_head.weight": pack_int4(q), "lm_head.weights_scaling_factor": scales}
            logits = weight_only_linear(g, flat, int4, "lm_head", 4, LM_HEAD_INT4_BLOCK, options.fused_gemm,
                                        options.weight_only_activations, options.weight_only_kernel)
        elif quantize_lm_head(config, options):
            tied_table = int8_table if config.tie_word_embeddings else None  # already quantized: reuse it
            block = EMBEDDING_BLOCK if config.hidden_size % EMBEDDING_BLOCK == 0 else config.hidden_size
            q, scales = tied_table if tied_table is not None else rtn_blocks(tensors[lm_head_name], block)
            if table is not None and tied_table is not None:  # the int8 embedding table, read once more
                logits = nbits_matmul(g, [flat, table, g.weight("lm_head.scales", scales.astype(dtype))], "lm_head",
                                      config.hidden_size, config.vocab_size, 8, EMBEDDING_BLOCK,
                                      options.weight_only_activations, options.weight_only_kernel, weights_shared=True)
            else:
                logits = weight_only_linear(g, flat, {"lm_head.weight": q, "lm_head.weights_scaling_factor": scales},
                                            "lm_head", 8, block, options.fused_gemm, options.weight_only_activations,
                                            options.weight_only_kernel)
        else:
            lm_head = embedding if config.tie_word_embeddings else ops.w("lm_head.weight")
            logits = (g.op("LmHead", [flat, lm_head], domain="trtbuild", name="lm_head") if options.lm_head_kernel
                      else g.op("Gemm", [flat, lm_head], transB=1, name="lm_head"))
        if tp > 1:  # every rank's vocabulary block, then the padding dropped
            if dtype != np.float32:
                logits = g.op("Cast", [logits], to=TensorProto.FLOAT)
            logits = g.op("AllGather", [logits, mpi], domain="trtbuild", name="lm_head/AllGather")
            logits = g.op("Slice", [logits, g.const([0]), g.const([config.vocab_size]), g.const([1])],
                          name="lm_head/unpad")
        if not shaped:
            shape = g.op("Concat", [g.op("Shape", [logits_positions]), g.const([config.vocab_size])], axis=0)
            logits = g.op("Reshape", [logits, shape])
        if dtype != np.float32 and tp == 1:
            logits = g.op("Cast", [logits], to=TensorProto.FLOAT)
        g.op("Identity", [logits], outputs=[LOGITS])
        g.output(LOGITS, TensorProto.FLOAT, ["batch_size", "num_logits", config.vocab_size])
        return g.save()
    finally:
        g.close()
