// What trtbuild's two attention kernels share (causal_attention.cc for prompts into an empty cache,
// generation_attention.cc for every step after): rotary embedding, the int8 cache's rounding, the
// softmax of a row of scores, the weighted sum of values, and the head sizes they are compiled for.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "ort_op.h"

namespace trtbuild {

// The head sizes the attention kernels are compiled for: FMHA_HEAD_SIZES (trtbuild/kernels/__init__.py).
using HeadSizes = std::integer_sequence<int, 16, 32, 48, 64, 80, 96, 112, 128, 256>;

template <class F, int... Ds>
auto for_head_size(int D, F f, std::integer_sequence<int, Ds...>) -> decltype(f(std::integral_constant<int, 1>{})) {
  decltype(f(std::integral_constant<int, 1>{})) picked = nullptr;
  ((D == Ds ? (picked = f(std::integral_constant<int, Ds / kLanes>{}), true) : false) || ...);
  return picked;
}

// f(std::integral_constant<int, ND>) for a head of D = ND kLanes floats, one of HeadSizes; nullptr
// for any other D.
template <class F>
auto for_head_size(int D, F f) {
  return for_head_size(D, f, HeadSizes{});
}

// The attributes both attention ops take: num_heads, kv_num_heads, scale (optional; 0: 1 / sqrt(D)).
struct HeadAttributes {
  int64_t num_heads = 0, kv_num_heads = 0;
  float scale = 0.0f;

  OrtStatus* read(const OrtApi* api, const OrtKernelInfo* info) {
    TRTBUILD_RETURN_IF_ERROR(api->KernelInfoGetAttribute_int64(info, "num_heads", &num_heads));
    TRTBUILD_RETURN_IF_ERROR(api->KernelInfoGetAttribute_int64(info, "kv_num_heads", &kv_num_heads));
    if (OrtStatus* missing = api->KernelInfoGetAttribute_float(info, "scale", &scale)) {
      api->ReleaseStatus(missing);  // optional
      scale = 0.0f;
    }
    return nullptr;
  }
  // What is wrong with the heads (empty: nothing)
  std::string heads_error() const {
    if (num_heads > 0 && kv_num_heads > 0 && num_heads % kv_num_heads == 0) return "";
    return "num_heads " + std::to_string(num_heads) + " is not a multiple of kv_num_heads " + std::to_string(kv_num_heads);
  }
  float scale_for(int D) const { return scale > 0 ? scale : 1.0f / std::sqrt((float)D); }
};

// An int8 cache's static scale, input i of the op's context: one value > 0 (`what` names it).
inline OrtStatus* cache_scale(const OrtApi* api, OrtKernelContext* context, size_t i, const char* op,
                              const std::string& what, float* out) {
  const OrtValue* value;
  std::vector<int64_t> dims;
  const float* data;
  TRTBUILD_RETURN_IF_ERROR(api->KernelContext_GetInput(context, i, &value));
  TRTBUILD_RETURN_IF_ERROR(shape_of(api, value, dims));
  if (element_count(dims) != 1) return op_error(api, op, what + " must hold one value");
  TRTBUILD_RETURN_IF_ERROR(api->GetTensorData(value, reinterpret_cast<const void**>(&data)));
  if (!(*data > 0.0f)) return op_error(api, op, what + " must be > 0");
  *out = *data;
  return nullptr;
}

// GPT-NeoX rotary embedding (rotate half, not interleaved) over the first rotary_dim of D values,
// at the position whose cos / sin rows are c / s (nullptr: no rotary), times mul.
inline void rope(const float* in, float* out, const float* c, const float* s, int rotary_dim, int D, float mul) {
  const int half = c ? rotary_dim / 2 : 0;
  for (int i = 0; i < half; ++i) {
    out[i] = (in[i] * c[i] - in[i + half] * s[i]) * mul;
    out[i + half] = (in[i + half] * c[i] + in[i] * s[i]) * mul;
  }
  for (int i = 2 * half; i < D; ++i) out[i] = in[i] * mul;
}

// An int8 cache row: q = saturate(round_half_even(x / scale)), and x replaced by q * scale.
inline void quantize_row(float* x, int8_t* q, int D, float scale) {
  for (int i = 0; i < D; ++i) {
    const float r = std::min(127.0f, std::max(-128.0f, std::nearbyint(x[i] / scale)));
    q[i] = (int8_t)r;
    x[i] = r * scale;
  }
}

// row[0, n) replaced by e^(row - max); returns 1 / their sum.
inline float softmax_row(float* row, int n) {
  vf mv = splat(-INFINITY);
  int j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const vf r = load(row + j);
    mv = r > mv ? r : mv;
  }
  float m = hmax(mv);
  for (; j < n; ++j) m = std::max(m, row[j]);
  vf sum = {};
  j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const vf e = vexp(load(row + j) - m);
    store(row + j, e);
    sum += e;
  }
  float s = hsum(sum);
  for (; j < n; ++j) s += row[j] = std::exp(row[j] - m);
  return 1.0f / s;
}

// kLanes values of a cache row as floats: a float cache's, or an int8 cache's (times its scale later).
inline vf load_values(const float* p) { return load(p); }
// Sign extension by intrinsics: GCC 12 compiles __builtin_convertvector from int8 lanes to int32 as a
// byte at a time (~60 scalar instructions per vector), which left an int8 cache's decode step at
// batch 8 slower than a float cache's.
inline vf load_values(const int8_t* p) {
#if defined(__AVX512F__)
  return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
  return (vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#endif
}

// The weighted sum of values: a head's D floats are ND vectors, summed in chunks of NC vectors;
// each call holds RM rows x NC accumulators plus NC value vectors in registers.
constexpr int kValueAccumulators = kRegisters / 2;
constexpr int value_chunk(int nd) { return nd / ((nd + kValueAccumulators - 1) / kValueAccumulators); }
constexpr int rows_per_pv(int nc) { return nc >= kValueAccumulators ? 1 : std::min(8, kValueAccumulators / nc); }

// out[r][0, NC kLanes) = inv[r] * sum_j P[r][j] v_j[0, NC kLanes) for `rows` (<= RM) rows over
// keys [0, keys); value rows are ldv values apart (float, or int8 with its scale folded into inv).
template <int NC, class V>
inline void weighted_values(const float* P, int ld, const V* v, int ldv, int keys, const float* inv, int rows,
                            float* out, int ldo) {
  constexpr int RM = rows_per_pv(NC);
  vf acc[RM][NC] = {};
  for (int j = 0; j < keys; ++j) {
    vf vj[NC];
    for (int n = 0; n < NC; ++n) vj[n] = load_values(v + (size_t)j * ldv + n * kLanes);
    for (int r = 0; r < RM; ++r) {
      const vf pj = splat(P[r * ld + j]);
      for (int n = 0; n < NC; ++n) acc[r][n] += pj * vj[n];
    }
  }
  for (int r = 0; r < rows; ++r)
    for (int n = 0; n < NC; ++n) store(out + (size_t)r * ldo + n * kLanes, acc[r][n] * inv[r]);
}

}  // namespace trtbuild
