// trtbuild::GenerationAttention — the attention of a step's new tokens over the KV cache (decode
// steps, prompts continued over a past): the generation phase of TensorRT-LLM's gpt_attention
// plugin, as an onnxruntime custom op. causal_attention.cc is its context phase.
//
// GroupQueryAttention computes each (row, head)'s scores as a GEMM of its own, a few keys long,
// and runs at ~27 GFLOP/s on 2 cores: at batch 8 it took a fifth of an int4 decode step. Here a
// task is one row's KV head: its keys and values are read once for the H / KV query heads that
// share them, four keys at a time against up to four heads in registers.
//
// Inputs:  qkv [B, S, (H + 2 KV) * D] float (packed as GroupQueryAttention takes it),
//          past_key, past_value [B, KV, M, D] float (int8 in GenerationAttentionInt8KV),
//          seqlens_k [B] int32 (each row's cached tokens after the step, - 1),
//          total_sequence_length [] int32 (the longest row's; equal to S: prompts into an empty
//          cache, right-padded),
//          GenerationAttentionInt8KV: k_scale, v_scale [1] float (static, per tensor),
//          cos_cache, sin_cache [P, R / 2] float (optional: no rotary embedding without them).
// Outputs: output [B, S, H * D]; present_key, present_value [B, KV, M, D]: the cache with the step's
//          keys (rotated) and values written at each row's next positions. Bound to past's memory
//          (the runtime's shared buffer) nothing else moves; otherwise past's rows are copied first.
// Attributes: num_heads, kv_num_heads; scale (default 1 / sqrt(D)).
//
// What it computes is GroupQueryAttention's with a shared buffer: row b's S new tokens sit at
// positions past_b .. past_b + S - 1, past_b = seqlens_k[b] + 1 - S (0 for a prompt into an empty
// cache), each attending to the cache's positions up to its own; rotary is GPT-NeoX style (rotate
// half) over the first R dims at those positions.

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "attention_math.h"

namespace trtbuild {
namespace {

// Score tiles: kScoreRows query heads x 4 keys of accumulators (16 of 32 registers on AVX-512, 8
// of 16 on AVX2), each summed over the head's vectors, then across lanes four at once (sum4).
constexpr int kScoreRows = kRegisters >= 32 ? 4 : 2;
constexpr int kKeys = 4;
constexpr int kQueryChunk = 8;  // a continued prompt's queries per task

struct Step {
  const float* qkv;
  const float* cos;  // nullptr: no rotary
  const float* sin;
  const int32_t* seqlens;
  float* out;
  void* k_cache;  // [B, KV, M, D] float, or int8 with its scale
  void* v_cache;
  float k_scale, v_scale;
  int B, S, H, KV, D, rotary_dim, M, chunks;
  bool first_prompt;  // total_sequence_length == S: every row starts at position 0
  float scale;

  int past(int b) const { return first_prompt ? 0 : seqlens[b] + 1 - S; }
  int width() const { return (H + 2 * KV) * D; }
  size_t cache_row(int b, int kv_head, int pos) const { return (((size_t)b * KV + kv_head) * M + pos) * D; }
  const float* cos_at(int pos) const { return cos ? cos + (size_t)pos * (rotary_dim / 2) : nullptr; }
  const float* sin_at(int pos) const { return sin ? sin + (size_t)pos * (rotary_dim / 2) : nullptr; }
};

// Row b's new keys (rotated) and values of one KV head into the cache.
template <bool kInt8>
void write_kv(const Step& p, int b, int kv_head) {
  const int D = p.D, past = p.past(b);
  thread_local std::vector<float> row;  // int8: the rotated key and the value before rounding
  if constexpr (kInt8) row.resize(2 * D);
  for (int s = 0; s < p.S; ++s) {
    const int pos = past + s;
    const float* x = p.qkv + ((size_t)b * p.S + s) * p.width();
    const size_t at = p.cache_row(b, kv_head, pos);
    if constexpr (kInt8) {
      rope(x + (p.H + kv_head) * D, row.data(), p.cos_at(pos), p.sin_at(pos), p.rotary_dim, D, 1.0f);
      std::memcpy(row.data() + D, x + (p.H + p.KV + kv_head) * D, D * sizeof(float));
      quantize_row(row.data(), static_cast<int8_t*>(p.k_cache) + at, D, p.k_scale);
      quantize_row(row.data() + D, static_cast<int8_t*>(p.v_cache) + at, D, p.v_scale);
    } else {
      rope(x + (p.H + kv_head) * D, static_cast<float*>(p.k_cache) + at, p.cos_at(pos), p.sin_at(pos), p.rotary_dim,
           D, 1.0f);
      std::memcpy(static_cast<float*>(p.v_cache) + at, x + (p.H + p.KV + kv_head) * D, D * sizeof(float));
    }
  }
}

// Prefetch `rows` cache rows of `bytes` bytes, `ld` values apart, from p on: into L1, or into L2
// (far).
template <bool far = false, class V>
inline void prefetch_rows(const V* p, int rows, size_t ld, int bytes) {
  for (int r = 0; r < rows; ++r)
    for (int line = 0; line < bytes; line += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(p + r * ld) + line, 0, far ? 2 : 3);
}

// A decode step reads each row's cache once, from memory: a task's keys are prefetched this many
// ahead, and the values of the keys being scored into L2 meanwhile (weighted_values reads them
// next), so that both stream at once. 30 SmolLM2 layers at batch 8 after 96 tokens, cache out of
// cache: ~25% faster (Intel Xeon); the engine's batch-8 decode ~4%.
constexpr int kPrefetchKeys = 16;

// scores[r][j] = q_r . k_j for kScoreRows query rows (D floats apart) and keys [0, keys) (D values
// apart), scores rows ld apart; keys past the last are read as the last (never stored). v: the
// values to prefetch beside the keys (nullptr: none).
template <int ND, class V>
void score_rows(const float* q, const V* k, int keys, float* scores, int ld, const V* v) {
  constexpr int D = ND * kLanes;
  for (int j = 0; j < keys; j += kKeys) {
    if (j + kPrefetchKeys + kKeys <= keys) prefetch_rows(k + (size_t)(j + kPrefetchKeys) * D, kKeys, D, D * sizeof(V));
    if (v && j + kKeys <= keys) prefetch_rows<true>(v + (size_t)j * D, kKeys, D, D * sizeof(V));
    const V* kj[kKeys];
    for (int n = 0; n < kKeys; ++n) kj[n] = k + (size_t)std::min(j + n, keys - 1) * D;
    vf acc[kScoreRows * kKeys] = {};  // acc[r * kKeys + n]
    for (int i = 0; i < ND; ++i) {
      vf kv[kKeys];
      for (int n = 0; n < kKeys; ++n) kv[n] = load_values(kj[n] + i * kLanes);
      for (int r = 0; r < kScoreRows; ++r) {
        const vf qv = load(q + r * D + i * kLanes);
        for (int n = 0; n < kKeys; ++n) acc[r * kKeys + n] += qv * kv[n];
      }
    }
    float sums[kKeys];
    for (int r = 0; r < kScoreRows; ++r) {
      sum4(acc + r * kKeys, sums);
      for (int n = 0; n < kKeys && j + n < keys; ++n) scores[(size_t)r * ld + j + n] = sums[n];
    }
  }
}

// Row b's queries [s0, s1) of the heads of one KV head: their scores as one block of rows (query s,
// head g at row (s - s0) G + g) against the keys the last of them sees, then per query its softmax
// and weighted values over its own keys.
template <int ND, bool kInt8>
void attend(const Step& p, int b, int kv_head, int s0, int s1) {
  using V = typename std::conditional<kInt8, int8_t, float>::type;
  constexpr int D = ND * kLanes, NC = value_chunk(ND), RM = rows_per_pv(NC);
  static_assert(ND % NC == 0, "value chunks must divide the head");
  const int G = p.H / p.KV, past = p.past(b), queries = (s1 - s0) * G;
  const int scored = (queries + kScoreRows - 1) / kScoreRows * kScoreRows;  // score_rows fills whole tiles
  const int rows = std::max(scored, queries - G + (G + RM - 1) / RM * RM);  // weighted_values reads RM rows
  const int ld = (past + s1 + kLanes - 1) / kLanes * kLanes;
  thread_local std::vector<float> buffer;
  buffer.assign((size_t)rows * (D + ld + 1), 0.0f);  // zeros: padding rows score 0, not garbage
  float* q = buffer.data();
  float* scores = q + (size_t)rows * D;
  float* inv = scores + (size_t)rows * ld;
  const V* k = static_cast<const V*>(p.k_cache) + p.cache_row(b, kv_head, 0);
  const V* v = static_cast<const V*>(p.v_cache) + p.cache_row(b, kv_head, 0);
  const float q_scale = p.scale * (kInt8 ? p.k_scale : 1.0f);
  for (int s = s0; s < s1; ++s) {
    const int pos = past + s;
    const float* x = p.qkv + ((size_t)b * p.S + s) * p.width() + (size_t)kv_head * G * D;
    for (int g = 0; g < G; ++g)
      rope(x + (size_t)g * D, q + ((size_t)(s - s0) * G + g) * D, p.cos_at(pos), p.sin_at(pos), p.rotary_dim, D,
           q_scale);
  }
  for (int r = 0; r < queries; r += kScoreRows)
    score_rows<ND>(q + (size_t)r * D, k, past + s1, scores + (size_t)r * ld, ld, r == 0 ? v : nullptr);
  for (int s = s0; s < s1; ++s) {
    const int keys = past + s + 1, first = (s - s0) * G;
    for (int g = 0; g < G; ++g)
      inv[first + g] = softmax_row(scores + (size_t)(first + g) * ld, keys) * (kInt8 ? p.v_scale : 1.0f);
    float* out = p.out + ((size_t)b * p.S + s) * p.H * D + (size_t)kv_head * G * D;
    for (int g = 0; g < G; g += RM)
      for (int c = 0; c < ND; c += NC)
        weighted_values<NC>(scores + (size_t)(first + g) * ld, ld, v + c * kLanes, D, keys, inv + first + g,
                            std::min(RM, G - g), out + (size_t)g * D + c * kLanes, D);
  }
}

using Task = void (*)(void*, size_t);

// One task per (row, KV head): its keys and values written, then its queries (a decode step).
template <int ND, bool kInt8>
void decode_task(void* data, size_t i) {
  const Step& p = *static_cast<const Step*>(data);
  const int b = (int)(i / p.KV), kv_head = (int)(i % p.KV);
  write_kv<kInt8>(p, b, kv_head);
  attend<ND, kInt8>(p, b, kv_head, 0, p.S);
}

template <bool kInt8>
void write_task(void* data, size_t i) {
  const Step& p = *static_cast<const Step*>(data);
  write_kv<kInt8>(p, (int)(i / p.KV), (int)(i % p.KV));
}

// Several queries a row: after every key is written, tasks of kQueryChunk queries, the last
// (most keys) first so that the threads finish together.
template <int ND, bool kInt8>
void chunk_task(void* data, size_t i) {
  const Step& p = *static_cast<const Step*>(data);
  const size_t pairs = (size_t)p.B * p.KV;
  const int chunk = p.chunks - 1 - (int)(i / pairs), b = (int)(i % pairs / p.KV), kv_head = (int)(i % p.KV);
  attend<ND, kInt8>(p, b, kv_head, chunk * kQueryChunk, std::min(p.S, (chunk + 1) * kQueryChunk));
}

template <bool kInt8>
struct GenerationAttention {
  static constexpr const char* name = kInt8 ? "GenerationAttentionInt8KV" : "GenerationAttention";
  static constexpr size_t first_rotary_input = kInt8 ? 7 : 5;
  static constexpr size_t inputs = first_rotary_input + 2, outputs = 3, required_inputs = first_rotary_input;
  static ONNXTensorElementDataType input_type(size_t i) {
    if (i == 3 || i == 4) return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
    return kInt8 && (i == 1 || i == 2) ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  static ONNXTensorElementDataType output_type(size_t i) {
    return kInt8 && i > 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }

  const OrtApi* api;
  HeadAttributes heads;

  static OrtStatus* create(const OrtApi* api, const OrtKernelInfo* info, GenerationAttention** out) {
    auto k = std::make_unique<GenerationAttention>(GenerationAttention{api});
    TRTBUILD_RETURN_IF_ERROR(k->heads.read(api, info));
    if (const std::string bad = k->heads.heads_error(); !bad.empty()) return op_error(api, name, bad);
    *out = k.release();
    return nullptr;
  }

  OrtStatus* error(const std::string& message) const { return op_error(api, name, message); }

  OrtStatus* input(OrtKernelContext* context, size_t i, const OrtValue** value, std::vector<int64_t>& dims) const {
    TRTBUILD_RETURN_IF_ERROR(api->KernelContext_GetInput(context, i, value));
    return shape_of(api, *value, dims);
  }

  OrtStatus* compute(OrtKernelContext* context) const {
    size_t num_inputs = 0;
    TRTBUILD_RETURN_IF_ERROR(api->KernelContext_GetInputCount(context, &num_inputs));
    const OrtValue *qkv, *past_k, *past_v, *seqlens, *total, *cos = nullptr, *sin = nullptr;
    std::vector<int64_t> x, cache, v_cache, lens, total_dims, rot;
    TRTBUILD_RETURN_IF_ERROR(input(context, 0, &qkv, x));
    TRTBUILD_RETURN_IF_ERROR(input(context, 1, &past_k, cache));
    TRTBUILD_RETURN_IF_ERROR(input(context, 2, &past_v, v_cache));
    TRTBUILD_RETURN_IF_ERROR(input(context, 3, &seqlens, lens));
    TRTBUILD_RETURN_IF_ERROR(input(context, 4, &total, total_dims));
    const int H = (int)heads.num_heads, KV = (int)heads.kv_num_heads;
    if (x.size() != 3) return error("qkv must be [B, S, (H + 2 KV) * D]");
    if (x[2] % (H + 2 * KV) != 0) return error("qkv's last dim is not (num_heads + 2 kv_num_heads) * head_size");
    Step p{};
    p.B = (int)x[0], p.S = (int)x[1], p.H = H, p.KV = KV, p.D = (int)(x[2] / (H + 2 * KV));
    const Task decode = for_head_size(p.D, [](auto nd) -> Task { return decode_task<decltype(nd)::value, kInt8>; });
    const Task chunk = for_head_size(p.D, [](auto nd) -> Task { return chunk_task<decltype(nd)::value, kInt8>; });
    if (!decode) return error("head size " + std::to_string(p.D) + " has no kernel (16..128 by 16, 256)");
    if (cache.size() != 4 || cache[0] != p.B || cache[1] != KV || cache[3] != p.D)
      return error("past_key must be [B, kv_num_heads, M, head_size]");
    if (v_cache != cache) return error("past_value must have past_key's shape");
    if (lens.size() != 1 || lens[0] != p.B) return error("seqlens_k must be [B]");
    if (element_count(total_dims) != 1) return error("total_sequence_length must hold one value");
    p.M = (int)cache[2];
    if (num_inputs > first_rotary_input + 1) {
      TRTBUILD_RETURN_IF_ERROR(input(context, first_rotary_input, &cos, rot));
      TRTBUILD_RETURN_IF_ERROR(api->KernelContext_GetInput(context, first_rotary_input + 1, &sin));
      if (rot.size() != 2 || 2 * rot[1] > p.D) return error("cos_cache must be [positions, rotary_dim / 2 <= head_size / 2]");
      p.rotary_dim = (int)(2 * rot[1]);
      TRTBUILD_RETURN_IF_ERROR(api->GetTensorData(cos, reinterpret_cast<const void**>(&p.cos)));
      TRTBUILD_RETURN_IF_ERROR(api->GetTensorData(sin, reinterpret_cast<const void**>(&p.sin)));
    }
    if (kInt8) {
      TRTBUILD_RETURN_IF_ERROR(cache_scale(api, context, 5, name, "k_scale", &p.k_scale));
      TRTBUILD_RETURN_IF_ERROR(cache_scale(api, context, 6, name, "v_scale", &p.v_scale));
    }
    const int32_t* total_len;
    TRTBUILD_RETURN_IF_ERROR(api->GetTensorData(qkv, reinterpret_cast<const void**>(&p.qkv)));
    TRTBUILD_RETURN_IF_ERROR(api->GetTensorData(seqlens, reinterpret_cast<const void**>(&p.seqlens)));
    TRTBUILD_RETURN_IF_ERROR(api->GetTensorData(total, reinterpret_cast<const void**>(&total_len)));
    p.first_prompt = *total_len == p.S;
    for (int b = 0; b < p.B; ++b) {
      const int past = p.past(b);
      if (past < 0 || past + p.S > p.M)
        return error("row " + std::to_string(b) + ": seqlens_k " + std::to_string(p.seqlens[b]) + " puts its " +
                     std::to_string(p.S) + " new tokens at positions " + std::to_string(past) + ".." +
                     std::to_string(past + p.S - 1) + ", outside the cache's 0.." + std::to_string(p.M - 1));
      if (p.cos && past + p.S > rot[0])
        return error("cos_cache has " + std::to_string(rot[0]) + " positions; row " + std::to_string(b) + " needs " +
                     std::to_string(past + p.S));
    }
    const int64_t out_shape[3] = {p.B, p.S, (int64_t)H * p.D};
    OrtValue *out, *present_k, *present_v;
    TRTBUILD_RETURN_IF_ERROR(api->KernelContext_GetOutput(context, 0, out_shape, 3, &out));
    TRTBUILD_RETURN_IF_ERROR(api->KernelContext_GetOutput(context, 1, cache.data(), 4, &present_k));
    TRTBUILD_RETURN_IF_ERROR(api->KernelContext_GetOutput(context, 2, cache.data(), 4, &present_v));
    TRTBUILD_RETURN_IF_ERROR(api->GetTensorMutableData(out, reinterpret_cast<void**>(&p.out)));
    TRTBUILD_RETURN_IF_ERROR(api->GetTensorMutableData(present_k, &p.k_cache));
    TRTBUILD_RETURN_IF_ERROR(api->GetTensorMutableData(present_v, &p.v_cache));
    p.scale = heads.scale_for(p.D);
    if (p.B == 0 || p.S == 0) return nullptr;
    const size_t value_bytes = kInt8 ? 1 : sizeof(float);
    for (auto [from, to] : {std::pair<const OrtValue*, void*>{past_k, p.k_cache}, {past_v, p.v_cache}}) {
      const void* data;
      TRTBUILD_RETURN_IF_ERROR(api->GetTensorData(from, &data));
      if (data == to) continue;  // the shared buffer: the cached rows are where they belong
      for (int b = 0; b < p.B; ++b)
        for (int h = 0; h < KV; ++h) {
          const size_t at = p.cache_row(b, h, 0) * value_bytes;
          std::memcpy(static_cast<char*>(to) + at, static_cast<const char*>(data) + at, (size_t)p.past(b) * p.D * value_bytes);
        }
    }
    const size_t pairs = (size_t)p.B * KV;
    if (p.S == 1) return run_tasks(api, context, decode, pairs, &p);
    p.chunks = (p.S + kQueryChunk - 1) / kQueryChunk;
    TRTBUILD_RETURN_IF_ERROR(run_tasks(api, context, write_task<kInt8>, pairs, &p));
    return run_tasks(api, context, chunk, pairs * p.chunks, &p);
  }
};

}  // namespace

const OrtCustomOp* generation_attention_op() {
  static const OpTable<GenerationAttention<false>> op;
  return &op;
}

const OrtCustomOp* generation_attention_int8_kv_op() {
  static const OpTable<GenerationAttention<true>> op;
  return &op;
}

}  // namespace trtbuild
