"""Attention with KV cache: the gpt_attention plugin.

Fused form: com.microsoft::GroupQueryAttention on packed qkv, rotary fused, one fixed-capacity KV
buffer per layer shared between past and present ([batch, kv_heads, max_seq_len, head_size]),
per-row lengths in `seqlens_k`; int8 cache with static per-tensor k/v scales.
Standard form: ONNX RotaryEmbedding-23 + Attention-23 with an explicit boolean mask, the KV
concat outside the Attention node (TensorRT accepts only its one-output form).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from trtbuild.checkpoint import PretrainedConfig
from trtbuild.engine_io import ATTENTION_MASK, SEQLENS_K, TOTAL_SEQUENCE_LENGTH, kv_io_names
from trtbuild.errors import TrtbuildError
from trtbuild.onnx_graph import GraphBuilder
from trtbuild.plugins.norm import norm
from trtbuild.rope import local_rope, longrope_attention_factor, longrope_inv_freq, longrope_switch


def rope_inv_freq(config: PretrainedConfig) -> np.ndarray:
    """Inverse frequencies as transformers computes them (float32), with llama3/linear scaling."""
    dim = config.rotary_dim or config.head_size
    inv_freq = (1.0 / (np.float32(config.rotary_base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))))
    inv_freq = inv_freq.astype(np.float32)
    scaling = config.rotary_scaling or {}
    if scaling.get("type") == "linear":
        inv_freq = inv_freq / np.float32(scaling["factor"])
    elif scaling.get("type") == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * np.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def rope_cache(config: PretrainedConfig, max_len: int, long: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin caches [max_len, rotary_dim / 2] (float32); LongRoPE's short or `long` set, scaled
    by its attention factor."""
    factor = 1.0
    if (config.rotary_scaling or {}).get("type") == "longrope":
        inv_freq, factor = longrope_inv_freq(config, long), longrope_attention_factor(config)
    else:
        inv_freq = rope_inv_freq(config)
    freqs = np.arange(max_len, dtype=np.float32)[:, None] * inv_freq[None, :]
    return (np.cos(freqs) * factor).astype(np.float32), (np.sin(freqs) * factor).astype(np.float32)


@dataclass
class AttentionInputs:
    """Graph-level values shared by every layer's attention."""

    fused: bool
    position_ids: str
    cos: str | None = None
    sin: str | None = None
    # sliding-window layers' own RoPE caches (rotary_base_local) and, standard form, mask
    cos_local: str | None = None
    sin_local: str | None = None
    mask_local: str | None = None
    # fused form
    seqlens_k: str | None = None
    total_sequence_length: str | None = None
    # standard form: boolean mask [batch, 1, seq, total]
    mask: str | None = None


def add_graph_inputs(g: GraphBuilder, config: PretrainedConfig, fused: bool, max_seq_len: int,
                     position_ids: str, input_ids: str, float_dtype: np.dtype) -> AttentionInputs:
    """Declare the attention-specific graph inputs and build what all layers share."""
    inputs = AttentionInputs(fused=fused, position_ids=position_ids)
    rotary_dim = config.rotary_dim or config.head_size
    if fused and config.position_embedding_type.startswith("rope") and (rotary_dim // 2) % 8:
        raise TrtbuildError(f"{config.architecture}: rotary over {rotary_dim} of {config.head_size} head dims; "
                            "GroupQueryAttention rotates a multiple of 16: build with --gpt_attention_plugin disable")
    if fused:
        inputs.seqlens_k = g.input(SEQLENS_K, TensorProto.INT32, ["batch_size"])
        inputs.total_sequence_length = g.input(TOTAL_SEQUENCE_LENGTH, TensorProto.INT32, [])
        _add_rope(g, config, inputs, max_seq_len, float_dtype, inputs.total_sequence_length, input_ids)
        return inputs
    attention_mask = g.input(ATTENTION_MASK, TensorProto.INT64, ["batch_size", "total_sequence_length"])
    # key j is visible from query i (at cache index past + i) iff j <= past + i and mask[b, j].
    total = g.op("Gather", [g.op("Shape", [attention_mask]), g.const(1)], axis=0)
    _add_rope(g, config, inputs, max_seq_len, float_dtype, total, input_ids)
    seq = g.op("Gather", [g.op("Shape", [input_ids]), g.const(1)], axis=0)
    keys = g.op("Range", [g.const(0), total, g.const(1)])
    queries = g.op("Range", [g.op("Sub", [total, seq]), total, g.const(1)])
    causal = g.op("LessOrEqual", [g.op("Unsqueeze", [keys, g.const([0])]),
                                  g.op("Unsqueeze", [queries, g.const([1])])])
    padding = g.op("Unsqueeze", [g.op("Cast", [attention_mask], to=TensorProto.BOOL), g.const([1, 2])])
    inputs.mask = g.op("And", [causal, padding], name="attention_mask_4d")
    if config.sliding_window and any(config.window(i) for i in range(config.num_hidden_layers)):
        # and within the window, counted in positions (a row's cache may have padding slots between
        # its prompt and its generated tokens): key position = valid keys before it
        key_pos = g.op("Sub", [g.op("CumSum", [attention_mask, g.const(1)]), g.const(1)])  # [B, T]
        distance = g.op("Sub", [g.op("Unsqueeze", [position_ids, g.const([2])]),
                                g.op("Unsqueeze", [key_pos, g.const([1])])])  # [B, S, T]
        recent = g.op("Unsqueeze", [g.op("Less", [distance, g.const(config.sliding_window)]), g.const([1])])
        inputs.mask_local = g.op("And", [inputs.mask, recent], name="attention_mask_4d_local")
    return inputs


def _add_rope(g: GraphBuilder, config: PretrainedConfig, inputs: AttentionInputs, max_seq_len: int,
              float_dtype: np.dtype, total: str, input_ids: str) -> None:
    """The cos / sin caches every layer reads. LongRoPE (switch = original_max_position_embeddings,
    as transformers): a prompt into an empty cache longer than the switch is rotated with the long
    set as a whole; every other step by position, short before the switch and long from it on (what
    one token at a time gives, so a row's keys do not depend on the other rows of its batch or on
    how many tokens a step feeds)."""
    if not config.position_embedding_type.startswith("rope"):
        return
    def weights(prefix: str, cos_sin: tuple[np.ndarray, np.ndarray]) -> list[str]:
        return [g.weight(f"rope.{prefix}{fn}_cache", cache.astype(float_dtype)) for fn, cache in zip(("cos", "sin"), cos_sin)]

    if config.rotary_base_local is not None:
        inputs.cos_local, inputs.sin_local = weights("local_", rope_cache(local_rope(config), max_seq_len))
    scaling = config.rotary_scaling or {}
    if scaling.get("type") != "longrope":
        inputs.cos, inputs.sin = weights("", rope_cache(config, max_seq_len))
        return
    switch = longrope_switch(config)
    short_set, long_set = rope_cache(config, max_seq_len), rope_cache(config, max_seq_len, long=True)
    by_position = np.arange(max_seq_len)[:, None] >= switch
    long = weights("long_", long_set)
    merged = weights("by_position_", tuple(np.where(by_position, lo, sh) for sh, lo in zip(short_set, long_set)))
    total64 = g.op("Cast", [total], to=TensorProto.INT64)
    seq = g.op("Squeeze", [g.op("Shape", [input_ids], start=1, end=2)])
    whole_long = g.op("And", [g.op("Greater", [total64, g.const(np.array(switch, np.int64))]),
                              g.op("Equal", [seq, total64])], name="longrope_long_prompt")
    inputs.cos, inputs.sin = (g.op("Where", [whole_long, long[j], merged[j]]) for j in (0, 1))


def declare_kv_io(g: GraphBuilder, layer: int, config: PretrainedConfig, fused: bool, cache_type: int) -> None:
    """The layer's past KV graph inputs and present KV graph outputs."""
    KV, D = config.num_key_value_heads, config.head_size
    past_k, past_v, present_k, present_v = kv_io_names(layer)
    cache_len = "max_sequence_length" if fused else "past_sequence_length"
    present_len = "max_sequence_length" if fused else "total_sequence_length"
    g.input(past_k, cache_type, ["batch_size", KV, cache_len, D])
    g.input(past_v, cache_type, ["batch_size", KV, cache_len, D])
    g.output(present_k, cache_type, ["batch_size", KV, present_len, D])
    g.output(present_v, cache_type, ["batch_size", KV, present_len, D])


def prompt_condition(g: GraphBuilder, input_ids: str, shared: AttentionInputs, min_len: int,
                     max_len: int | None, single: bool) -> str:
    """True for a step that is prompts of min_len <= tokens (< max_len) into an empty cache, only
    one if `single` (GroupQueryAttention continues a prompt over a past only at batch 1): the steps
    `attention(prompt=...)` serves."""
    batch_seq = g.op("Shape", [input_ids])
    seq = g.op("Slice", [batch_seq, g.const([1]), g.const([2])])
    fresh = g.op("Equal", [g.op("Cast", [seq], to=TensorProto.INT32),
                           g.op("Unsqueeze", [shared.total_sequence_length, g.const([0])])])
    in_window = g.op("GreaterOrEqual", [seq, g.const([min_len])])
    if max_len is not None:
        in_window = g.op("And", [in_window, g.op("Less", [seq, g.const([max_len])])])
    cond = g.op("And", [fresh, in_window])
    if single:
        cond = g.op("And", [cond, g.op("Equal", [g.op("Slice", [batch_seq, g.const([0]), g.const([1])]),
                                                 g.const([1])])])
    return g.op("Identity", [cond], name="prompt_condition")


def _context_split(g: GraphBuilder, qkv: str, shared: AttentionInputs) -> tuple[str, str, str, str]:
    """(sizes [S1, S2] along the sequence, S1 - 1 per row, S1, S - 1 per row) for a prompt of S
    tokens cut in a first half S1 = S - S // 2 and a second S2 = S // 2."""
    seq = g.op("Shape", [qkv], start=1, end=2)
    second = g.op("Div", [seq, g.const([2])])
    first = g.op("Sub", [seq, second])
    rows = g.op("Shape", [shared.seqlens_k])
    first32 = g.op("Cast", [first], to=TensorProto.INT32)
    last = lambda n: g.op("Expand", [g.op("Sub", [n, g.const([1], np.int32)]), rows])  # noqa: E731
    return (g.op("Concat", [first, second], axis=0), last(first32),
            g.op("Squeeze", [first32]), last(g.op("Cast", [seq], to=TensorProto.INT32)))


@dataclass(frozen=True)
class QKNorm:
    """RMSNorm weights [head_size] applied to each head of q and of k before RoPE (Qwen3, Gemma 3)."""

    q_weight: str
    k_weight: str
    epsilon: float
    fused: bool  # SimplifiedLayerNormalization (onnxruntime) or RMSNormalization-23


def _norm_heads(g: GraphBuilder, x: str, heads: int, head_size: int, weight: str, qk_norm: QKNorm) -> str:
    """RMSNorm over each head of x [B, S, heads * D]."""
    y = g.op("Reshape", [x, g.const([0, 0, heads, head_size])])
    y = norm(g, y, weight, None, "rms_norm", qk_norm.epsilon, qk_norm.fused)
    return g.op("Reshape", [y, g.const([0, 0, heads * head_size])])


def _qk_normed(g: GraphBuilder, qkv: str, config: PretrainedConfig, qk_norm: QKNorm, name: str) -> str:
    """Packed qkv with q and k normalized per head (the fused forms take packed qkv)."""
    H, KV, D = config.num_attention_heads, config.num_key_value_heads, config.head_size
    q, k, v = g.op("Split", [qkv, g.const([H * D, KV * D, KV * D])], num_outputs=3, axis=-1, name=f"{name}/qk_split")
    q = _norm_heads(g, q, H, D, qk_norm.q_weight, qk_norm)
    k = _norm_heads(g, k, KV, D, qk_norm.k_weight, qk_norm)
    return g.op("Concat", [q, k, v], axis=-1, name=f"{name}/qk_concat")


def attention(g: GraphBuilder, qkv: str, layer: int, config: PretrainedConfig, shared: AttentionInputs,
              cache_type: int, kv_scales: np.ndarray | None, present: tuple[str, str] | None = None,
              prompt: str | None = None, qk_norm: QKNorm | None = None, generation: bool = False) -> str:
    """Self-attention of one layer over packed qkv [batch, seq, (H + 2 KV) * D] → [batch, seq, H * D].

    Reads the layer's past KV graph inputs and writes `present` (default: the present graph
    outputs; see declare_kv_io). `kv_scales` (k_scale, v_scale) turns on the int8 cache.
    `prompt` (fused form, for steps that are prompts into an empty cache, see prompt_condition):
    GroupQueryAttention computes a prompt's whole score matrix and masks half of it.
    "fmha": trtbuild's CausalPromptAttention kernel (trtbuild/kernels), which computes only the
    causal half (of every prompt of a batch). "split" (one prompt): the attention of the first half
    of the prompt, then of the second half over the first as its past, skipping a quarter of the
    matrix. Padded rows run as full: their padding is never attended by a real token and is
    overwritten while decoding. `qk_norm`: q and k normalized per head before RoPE. A layer with
    an attention window (config.window) attends to its last `window` tokens with its own RoPE
    caches; its prompts take GroupQueryAttention (local_window_size), the kernel having no window.
    `generation` (fused form, `prompt` None): trtbuild's GenerationAttention kernel instead of
    GroupQueryAttention, for the steps after a prompt (not for a layer with a window).
    """
    H, KV, D = config.num_attention_heads, config.num_key_value_heads, config.head_size
    past_k, past_v, present_k, present_v = kv_io_names(layer)
    if present is not None:
        present_k, present_v = present
    rope = shared.cos is not None
    window = config.window(layer)
    cos, sin = ((shared.cos_local, shared.sin_local) if window and shared.cos_local is not None
                else (shared.cos, shared.sin))
    scale = {"scale": float(config.attention_scale)} if config.attention_scale is not None else {}
    if window and prompt == "fmha":
        prompt = None
    generation = generation and prompt is None and not window
    p = f"transformer.layers.{layer}.attention"
    k_scale = v_scale = None
    if kv_scales is not None:
        k_scale = g.weight(f"{p}.k_cache_scale", np.asarray(kv_scales[:1], np.float32))
        v_scale = g.weight(f"{p}.v_cache_scale", np.asarray(kv_scales[1:2], np.float32))
    if shared.fused:
        if qk_norm is not None:
            qkv = _qk_normed(g, qkv, config, qk_norm, p)
        quant = {"k_quant_type": "PER_TENSOR", "v_quant_type": "PER_TENSOR", "kv_cache_bit_width": 8} \
            if kv_scales is not None else {}

        def gqa(x: str, past: tuple[str, str], seqlens_k: str, total: str, outputs: list[str]) -> str:
            inputs = [x, "", "", *past, seqlens_k, total, cos or "", sin or "", "", "", "",
                      k_scale or "", v_scale or ""]
            while inputs[-1] == "":
                inputs.pop()
            return g.op("GroupQueryAttention", inputs, num_outputs=3, domain="com.microsoft", name=f"{p}/GQA",
                        outputs=outputs, num_heads=H, kv_num_heads=KV, do_rotary=int(rope), rotary_interleaved=0,
                        **({"local_window_size": window} if window else {}), **scale, **quant)[0]

        if prompt == "fmha":
            op, scales = ("CausalPromptAttention", []) if kv_scales is None else \
                ("CausalPromptAttentionInt8KV", [k_scale, v_scale])
            return g.op(op, [qkv, past_k, *scales, *([cos, sin] if rope else [])], num_outputs=3,
                        domain="trtbuild", name=f"{p}/fmha", outputs=[g.fresh(f"{p}/fmha/out"), present_k, present_v],
                        num_heads=H, kv_num_heads=KV, **scale)[0]
        if generation:
            op, scales = ("GenerationAttention", []) if kv_scales is None else \
                ("GenerationAttentionInt8KV", [k_scale, v_scale])
            return g.op(op, [qkv, past_k, past_v, shared.seqlens_k, shared.total_sequence_length, *scales,
                             *([cos, sin] if rope else [])], num_outputs=3, domain="trtbuild", name=f"{p}/generation",
                        outputs=[g.fresh(f"{p}/generation/out"), present_k, present_v], num_heads=H, kv_num_heads=KV,
                        **scale)[0]
        if prompt != "split":
            return gqa(qkv, (past_k, past_v), shared.seqlens_k, shared.total_sequence_length,
                       [g.fresh(f"{p}/GQA/out"), present_k, present_v])
        sizes, first_lens, first_total, full_lens = g.shared("context_split", lambda: _context_split(g, qkv, shared))
        first, second = g.op("Split", [qkv, sizes], num_outputs=2, axis=1, name=f"{p}/context_split")
        mid_k, mid_v = g.fresh(f"{p}/first_half.key"), g.fresh(f"{p}/first_half.value")
        y1 = gqa(first, (past_k, past_v), first_lens, first_total, [g.fresh(f"{p}/GQA/out"), mid_k, mid_v])
        y2 = gqa(second, (mid_k, mid_v), full_lens, shared.total_sequence_length,
                 [g.fresh(f"{p}/GQA/out"), present_k, present_v])
        return g.op("Concat", [y1, y2], axis=1, name=f"{p}/context_concat")

    q, k, v = g.op("Split", [qkv, g.const([H * D, KV * D, KV * D])], num_outputs=3, axis=-1, name=f"{p}/split")
    if qk_norm is not None:
        q, k = _norm_heads(g, q, H, D, qk_norm.q_weight, qk_norm), _norm_heads(g, k, KV, D, qk_norm.k_weight, qk_norm)
    if rope:
        partial = {"rotary_embedding_dim": config.rotary_dim} if config.rotary_dim not in (None, D) else {}
        q = g.op("RotaryEmbedding", [q, cos, sin, shared.position_ids], num_heads=H, name=f"{p}/rope_q", **partial)
        k = g.op("RotaryEmbedding", [k, cos, sin, shared.position_ids], num_heads=KV, name=f"{p}/rope_k", **partial)

    def heads(x: str, n: int) -> str:  # [B, S, n*D] → [B, n, S, D]
        return g.op("Transpose", [g.op("Reshape", [x, g.const([0, 0, n, D])])], perm=[0, 2, 1, 3])

    q, k, v = heads(q, H), heads(k, KV), heads(v, KV)
    if kv_scales is not None:
        zero = g.const(np.zeros(1, np.int8), dtype=np.int8)
        k8 = g.op("Concat", [past_k, g.op("QuantizeLinear", [k, k_scale, zero])], axis=2, outputs=[present_k])
        v8 = g.op("Concat", [past_v, g.op("QuantizeLinear", [v, v_scale, zero])], axis=2, outputs=[present_v])
        k_all = g.op("DequantizeLinear", [k8, k_scale, zero])
        v_all = g.op("DequantizeLinear", [v8, v_scale, zero])
    else:
        k_all = g.op("Concat", [past_k, k], axis=2, outputs=[present_k])
        v_all = g.op("Concat", [past_v, v], axis=2, outputs=[present_v])
    mask = shared.mask_local if window else shared.mask
    y = g.op("Attention", [q, k_all, v_all, mask], name=f"{p}/Attention", **scale)
    y = g.op("Transpose", [y], perm=[0, 2, 1, 3])
    return g.op("Reshape", [y, g.const([0, 0, H * D])])
