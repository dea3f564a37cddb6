// trtbuild::CausalPromptAttention — causal self-attention of prompts into an empty KV cache,
// an onnxruntime custom op (C API; the vendored headers in include/ are onnxruntime's, MIT).
//
// GroupQueryAttention computes a prompt's whole S x S score matrix and masks half of it. This
// kernel works in blocks of 64 queries and computes, for each, only the keys up to its last query:
// the half of the matrix the causal mask keeps (plus the diagonal blocks). Scores, softmax and the
// weighted sum of values run in register tiles written with GCC vector extensions and sized for
// the machine's vectors (ort_op.h: kLanes, kRegisters), so the same source compiles to AVX-512 or
// AVX2 for the machine it is built on (-march=native).
//
// Inputs:  qkv [B, S, (H + 2 KV) * D] float (packed as GroupQueryAttention takes it; prompts
//          right-padded to S),
//          past_key [B, KV, M, D] float (only its capacity M is read: the cache is empty),
//          cos_cache, sin_cache [P, R / 2] float (optional: no rotary embedding without them).
// Outputs: output [B, S, H * D], present_key and present_value [B, KV, M, D] with rows 0..S-1
//          written (rotary applied to keys; rows from S on are written by later decode steps).
// Attributes: num_heads, kv_num_heads; scale (default 1 / sqrt(D)). Rotary is GPT-NeoX style
// (rotate half, not interleaved) over the first R dims, at positions 0..S-1.

#include <algorithm>
#include <cmath>
#include <memory>

#include "attention_math.h"

namespace trtbuild {
namespace {

constexpr int kBlock = 64;  // queries per task
// Score tiles: kScoreRows queries x kKeyTile keys, 2 kScoreRows accumulators held in registers
// (8 x 32 on AVX-512: 16 of 32 registers; 4 x 16 on AVX2: 8 of 16).
constexpr int kKeyTile = 2 * kLanes;
constexpr int kScoreRows = kRegisters / 4;
static_assert(kBlock % kKeyTile == 0 && kBlock % kScoreRows == 0, "tiles must divide a block");

struct Problem {
  const float* qkv;
  const float* cos;  // nullptr: no rotary
  const float* sin;
  float* out;
  // Keys (rotated) and values as the attention reads them: the float cache itself, or for an int8
  // cache a scratch copy of what the cache holds, dequantized (what later decode steps read too).
  float* k;
  float* v;
  size_t kv_head_stride;  // floats between heads of k and v: M * D (the cache) or Sp * D (scratch)
  int8_t* k8;             // the int8 cache (nullptr: float cache) and its static scales
  int8_t* v8;
  float k_scale, v_scale;
  float* q;   // scratch [H, Sp, D]: rotated queries times scale
  float* kt;  // scratch [KV, D, Sp]: rotated keys, transposed
  int S, H, KV, D, rotary_dim, M, Sp, blocks;
  float scale;
};

// Tokens [64 b, 64 b + 64): rotary on queries (scaled) and keys, keys and values into the cache,
// keys transposed into kt for the score tiles.
void prepare_block(const Problem& p, int b) {
  const int D = p.D, W = (p.H + 2 * p.KV) * D, half = p.rotary_dim / 2;
  const int t0 = b * kBlock, t1 = std::min(p.S, t0 + kBlock);
  for (int t = t0; t < t1; ++t) {
    const float* x = p.qkv + (size_t)t * W;
    const float* c = p.cos ? p.cos + (size_t)t * half : nullptr;
    const float* s = p.sin ? p.sin + (size_t)t * half : nullptr;
    for (int h = 0; h < p.H; ++h) rope(x + h * D, p.q + ((size_t)h * p.Sp + t) * D, c, s, p.rotary_dim, D, p.scale);
    for (int h = 0; h < p.KV; ++h) {
      float* k = p.k + h * p.kv_head_stride + (size_t)t * D;
      float* v = p.v + h * p.kv_head_stride + (size_t)t * D;
      rope(x + (p.H + h) * D, k, c, s, p.rotary_dim, D, 1.0f);
      std::memcpy(v, x + (p.H + p.KV + h) * D, D * sizeof(float));
      if (p.k8) {
        const size_t row = ((size_t)h * p.M + t) * D;
        quantize_row(k, p.k8 + row, D, p.k_scale);
        quantize_row(v, p.v8 + row, D, p.v_scale);
      }
    }
  }
  for (int h = 0; h < p.KV; ++h) {
    const float* k = p.k + h * p.kv_head_stride;
    float* kt = p.kt + (size_t)h * D * p.Sp;
    for (int d = 0; d < D; ++d)
      for (int t = t0; t < t1; ++t) kt[(size_t)d * p.Sp + t] = k[(size_t)t * D + d];
  }
}

// scores[r][j] = q_r . k_j for kScoreRows query rows and kKeyTile keys.
inline void score_tile(const float* q, const float* kt, int D, int Sp, float* scores, int ld) {
  vf acc[kScoreRows][2] = {};
  for (int d = 0; d < D; ++d) {
    const vf k0 = load(kt + (size_t)d * Sp), k1 = load(kt + (size_t)d * Sp + kLanes);
    for (int r = 0; r < kScoreRows; ++r) {
      const vf qd = splat(q[r * D + d]);
      acc[r][0] += qd * k0;
      acc[r][1] += qd * k1;
    }
  }
  for (int r = 0; r < kScoreRows; ++r) {
    store(scores + r * ld, acc[r][0]);
    store(scores + r * ld + kLanes, acc[r][1]);
  }
}

// Query block qb of head h, for heads of ND vectors.
template <int ND>
void attend_block(const Problem& p, int h, int qb) {
  constexpr int D = ND * kLanes, NC = value_chunk(ND), RM = rows_per_pv(NC);
  static_assert(ND % NC == 0, "value chunks must divide the head");
  const int r0 = qb * kBlock, r1 = std::min(p.S, r0 + kBlock), rows = r1 - r0;
  const int kv_head = h / (p.H / p.KV);
  const int ld = (r1 + kKeyTile - 1) / kKeyTile * kKeyTile;
  thread_local std::vector<float> buffer;
  buffer.resize((size_t)(kBlock + kScoreRows) * ld + kBlock);
  float* scores = buffer.data();
  float* inv = scores + (size_t)(kBlock + kScoreRows) * ld;
  const float* q = p.q + ((size_t)h * p.Sp + r0) * D;
  const float* kt = p.kt + (size_t)kv_head * D * p.Sp;
  for (int i = 0; i < rows; i += kScoreRows) {
    const int keys = std::min(r0 + i + kScoreRows, r1);
    for (int j = 0; j < keys; j += kKeyTile)
      score_tile(q + (size_t)i * D, kt + j, D, p.Sp, scores + (size_t)i * ld + j, ld);
  }
  for (int i = 0; i < rows; ++i) {
    float* row = scores + (size_t)i * ld;
    const int n = r0 + i + 1;                                  // keys query r0 + i sees
    const int zero_to = std::min(r0 + (i / RM + 1) * RM, r1);  // keys its row group sums over
    inv[i] = softmax_row(row, n);
    for (int j = n; j < zero_to; ++j) row[j] = 0.0f;
  }
  const float* v = p.v + kv_head * p.kv_head_stride;
  for (int i = 0; i < rows; i += RM)
    for (int c = 0; c < ND; c += NC)
      weighted_values<NC>(scores + (size_t)i * ld, ld, v + c * kLanes, D, std::min(r0 + i + RM, r1), inv + i,
                          std::min(RM, rows - i), p.out + (size_t)(r0 + i) * p.H * D + (size_t)h * D + c * kLanes,
                          p.H * D);
}

// One Problem per prompt of the batch (right-padded prompts run as full: a real query never sees
// a padding key, and the padding's cache rows are overwritten by the decode steps before use).
struct Batch {
  std::vector<Problem> rows;
};

void prepare_task(void* data, size_t i) {
  const Batch& batch = *static_cast<const Batch*>(data);
  const Problem& p = batch.rows[i / batch.rows[0].blocks];
  prepare_block(p, (int)(i % p.blocks));
}

template <int ND>
void attend_task(void* data, size_t i) {
  const Batch& batch = *static_cast<const Batch*>(data);
  const size_t heads = batch.rows.size() * batch.rows[0].H;
  const Problem& p = batch.rows[(i % heads) / batch.rows[0].H];
  // Largest blocks (last queries: most keys) first, so the threads finish together.
  attend_block<ND>(p, (int)(i % heads % p.H), p.blocks - 1 - (int)(i / heads));
}

using Task = void (*)(void*, size_t);

Task attend_for(int D) {
  return for_head_size(D, [](auto nd) -> Task { return attend_task<decltype(nd)::value>; });
}

// kInt8: CausalPromptAttentionInt8KV, the same over an int8 cache with static per-tensor scales:
// inputs qkv, past_key (int8), k_scale, v_scale ([1] float), cos_cache, sin_cache (optional).
template <bool kInt8>
struct CausalPromptAttention {
  static constexpr const char* name = kInt8 ? "CausalPromptAttentionInt8KV" : "CausalPromptAttention";
  static constexpr size_t inputs = kInt8 ? 6 : 4, outputs = 3, required_inputs = kInt8 ? 4 : 2;
  static constexpr size_t first_rotary_input = kInt8 ? 4 : 2;
  static ONNXTensorElementDataType input_type(size_t i) {
    return kInt8 && i == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  static ONNXTensorElementDataType output_type(size_t i) {
    return kInt8 && i > 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }

  const OrtApi* api;
  HeadAttributes heads;

  static OrtStatus* create(const OrtApi* api, const OrtKernelInfo* info, CausalPromptAttention** out) {
    auto k = std::make_unique<CausalPromptAttention>(CausalPromptAttention{api});
    TRTBUILD_RETURN_IF_ERROR(k->heads.read(api, info));
    *out = k.release();
    return nullptr;
  }

  OrtStatus* error(const std::string& message) const { return op_error(api, name, message); }

  OrtStatus* compute(OrtKernelContext* context) const {
    size_t num_inputs = 0;
    TRTBUILD_RETURN_IF_ERROR(api->KernelContext_GetInputCount(context, &num_inputs));
    const OrtValue *qkv, *past_key, *cos = nullptr, *sin = nullptr;
    TRTBUILD_RETURN_IF_ERROR(api->KernelContext_GetInput(context, 0, &qkv));
    TRTBUILD_RETURN_IF_ERROR(api->KernelContext_GetInput(context, 1, &past_key));
    if (num_inputs > first_rotary_input + 1) {
      TRTBUILD_RETURN_IF_ERROR(api->KernelContext_GetInput(context, first_rotary_input, &cos));
      TRTBUILD_RETURN_IF_ERROR(api->KernelContext_GetInput(context, first_rotary_input + 1, &sin));
    }
    std::vector<int64_t> x, cache, rot;
    TRTBUILD_RETURN_IF_ERROR(shape_of(api, qkv, x));
    TRTBUILD_RETURN_IF_ERROR(shape_of(api, past_key, cache));
    const int H = (int)heads.num_heads, KV = (int)heads.kv_num_heads;
    if (x.size() != 3 || x[0] < 1) return error("qkv must be [B, S, (H + 2 KV) * D]");
    if (const std::string bad = heads.heads_error(); !bad.empty()) return error(bad);
    if (x[2] % (H + 2 * KV) != 0) return error("qkv's last dim is not (num_heads + 2 kv_num_heads) * head_size");
    const int B = (int)x[0], S = (int)x[1], D = (int)(x[2] / (H + 2 * KV));
    if (!attend_for(D)) return error("head size " + std::to_string(D) + " has no kernel (16..128 by 16, 256)");
    if (cache.size() != 4 || cache[0] != B || cache[1] != KV || cache[3] != D || cache[2] < S)
      return error("past_key must be [B, kv_num_heads, M >= S, head_size]");
    int rotary_dim = 0;
    if (cos && sin) {
      TRTBUILD_RETURN_IF_ERROR(shape_of(api, cos, rot));
      if (rot.size() != 2 || rot[0] < S || 2 * rot[1] > D)
        return error("cos_cache must be [positions >= S, rotary_dim / 2 <= head_size / 2]");
      rotary_dim = (int)(2 * rot[1]);
    }
    Problem p{};
    p.S = S, p.H = H, p.KV = KV, p.D = D, p.rotary_dim = rotary_dim, p.M = (int)cache[2];
    p.scale = heads.scale_for(D);
    p.blocks = (S + kBlock - 1) / kBlock;
    p.Sp = p.blocks * kBlock;
    TRTBUILD_RETURN_IF_ERROR(api->GetTensorData(qkv, reinterpret_cast<const void**>(&p.qkv)));
    if (rotary_dim) {
      TRTBUILD_RETURN_IF_ERROR(api->GetTensorData(cos, reinterpret_cast<const void**>(&p.cos)));
      TRTBUILD_RETURN_IF_ERROR(api->GetTensorData(sin, reinterpret_cast<const void**>(&p.sin)));
    }
    const int64_t out_shape[3] = {B, S, (int64_t)H * D};
    OrtValue *out, *present_k, *present_v;
    TRTBUILD_RETURN_IF_ERROR(api->KernelContext_GetOutput(context, 0, out_shape, 3, &out));
    TRTBUILD_RETURN_IF_ERROR(api->KernelContext_GetOutput(context, 1, cache.data(), 4, &present_k));
    TRTBUILD_RETURN_IF_ERROR(api->KernelContext_GetOutput(context, 2, cache.data(), 4, &present_v));
    TRTBUILD_RETURN_IF_ERROR(api->GetTensorMutableData(out, reinterpret_cast<void**>(&p.out)));
    void *k_cache, *v_cache;
    TRTBUILD_RETURN_IF_ERROR(api->GetTensorMutableData(present_k, &k_cache));
    TRTBUILD_RETURN_IF_ERROR(api->GetTensorMutableData(present_v, &v_cache));
    if (kInt8) {
      p.k8 = static_cast<int8_t*>(k_cache), p.v8 = static_cast<int8_t*>(v_cache);
      TRTBUILD_RETURN_IF_ERROR(cache_scale(api, context, 2, name, "k_scale", &p.k_scale));
      TRTBUILD_RETURN_IF_ERROR(cache_scale(api, context, 3, name, "v_scale", &p.v_scale));
    } else {
      p.k = static_cast<float*>(k_cache), p.v = static_cast<float*>(v_cache);
    }
    if (S == 0) return nullptr;
    // Scratch per calling thread: sessions may run concurrently from several threads. Not cleared:
    // rows of the last block past S (read by the kScoreRows-row score tiles) and keys past a query's own
    // (read by the kKeyTile-key tiles) give scores that are never used.
    thread_local std::vector<float> scratch;
    const size_t row_scratch = (size_t)(H + KV + (kInt8 ? 2 * KV : 0)) * p.Sp * D;
    scratch.resize(B * row_scratch);
    Batch batch{std::vector<Problem>(B, p)};
    for (int b = 0; b < B; ++b) {
      Problem& r = batch.rows[b];
      r.qkv += (size_t)b * S * (H + 2 * KV) * D;
      r.out += (size_t)b * S * H * D;
      r.q = scratch.data() + b * row_scratch;
      r.kt = r.q + (size_t)H * p.Sp * D;
      if (kInt8) {
        r.k8 += (size_t)b * KV * p.M * D;
        r.v8 += (size_t)b * KV * p.M * D;
        r.k = r.kt + (size_t)KV * p.Sp * D;
        r.v = r.k + (size_t)KV * p.Sp * D;
        r.kv_head_stride = (size_t)p.Sp * D;
      } else {
        r.k += (size_t)b * KV * p.M * D;
        r.v += (size_t)b * KV * p.M * D;
        r.kv_head_stride = (size_t)p.M * D;
      }
    }
    const size_t prepare_tasks = (size_t)B * p.blocks, attend_tasks = prepare_tasks * H;
    TRTBUILD_RETURN_IF_ERROR(api->KernelContext_ParallelFor(context, prepare_task, prepare_tasks, prepare_tasks, &batch));
    return api->KernelContext_ParallelFor(context, attend_for(D), attend_tasks, attend_tasks, &batch);
  }
};

}  // namespace

const OrtCustomOp* causal_prompt_attention_op() {
  static const OpTable<CausalPromptAttention<false>> op;
  return &op;
}

const OrtCustomOp* causal_prompt_attention_int8_kv_op() {
  static const OpTable<CausalPromptAttention<true>> op;
  return &op;
}

}  // namespace trtbuild
