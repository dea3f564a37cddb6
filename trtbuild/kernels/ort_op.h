// What every trtbuild kernel shares: the onnxruntime custom-op table built from a kernel class,
// status helpers, and float vectors of the machine's width (GCC vector extensions): 16 lanes where
// the library is compiled for AVX-512, 8 for AVX2. A vector wider than the registers is not split
// cleanly by GCC (comparisons, conversions and by-value calls fall back to memory and scalar code:
// the prompt kernel ran 20-30x slower on AVX2 with 16-lane vectors), so every kernel sizes its
// tiles from kLanes and kRegisters.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "onnxruntime_c_api.h"

namespace trtbuild {

constexpr uint32_t kOrtApiVersion = 17;  // KernelContext_ParallelFor

#if defined(__AVX512F__)
constexpr int kLanes = 16;      // floats in a vector register
constexpr int kRegisters = 32;  // vector registers
#elif defined(__AVX2__)
constexpr int kLanes = 8;
constexpr int kRegisters = 16;
#else
#error "trtbuild's kernels need AVX2 (-mavx2 -mfma) or AVX-512"
#endif

typedef float vf __attribute__((vector_size(kLanes * 4)));
typedef int32_t vi __attribute__((vector_size(kLanes * 4)));

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf splat(float x) { return vf{} + x; }
// v's int32 lanes (each within a byte's range, signed or unsigned) as kLanes bytes at p: their low
// bytes. By intrinsics: GCC 12 compiles __builtin_convertvector's narrowing to bytes a lane at a time
// on AVX2 (~40 scalar instructions per vector, in every quantized row).
inline void store_bytes(void* p, vi v) {
#if defined(__AVX512F__)
  _mm_storeu_si128(static_cast<__m128i*>(p), _mm512_cvtepi32_epi8((__m512i)v));
#else
  const __m256i x = (__m256i)v;
  const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
  const __m128i low_bytes = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, -1, -1, -1, -1, -1, -1, -1, -1);
  _mm_storel_epi64(static_cast<__m128i*>(p), _mm_shuffle_epi8(words, low_bytes));
#endif
}
inline float hsum(vf v) {
  float s = 0;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}
inline float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = m > v[i] ? m : v[i];
  return m;
}

// Pairwise sums of the lanes of (a, b): lane i < kLanes / 2 is a[2i] + a[2i + 1], the rest b's.
inline vf pair_sums(vf a, vf b) {
  typedef int32_t mask __attribute__((vector_size(kLanes * 4)));
  constexpr auto lanes = [](int offset) {
    mask m{};
    for (int i = 0; i < kLanes; ++i) m[i] = 2 * i + offset;
    return m;
  };
  return __builtin_shuffle(a, b, lanes(0)) + __builtin_shuffle(a, b, lanes(1));
}

// The sums of the lanes of acc[0..3] at once (summing four vectors lane by lane costs as much as
// a short dot product): after two halvings r's lanes are kLanes / 4 partial sums of acc[0], then as
// many of acc[1], acc[2], acc[3]; halving r with itself until one each is left gives the four sums
// in lanes 0..3.
inline void sum4(const vf* acc, float* out) {
  vf r = pair_sums(pair_sums(acc[0], acc[1]), pair_sums(acc[2], acc[3]));
  for (int partial = kLanes / 4; partial > 1; partial /= 2) r = pair_sums(r, r);
  for (int n = 0; n < 4; ++n) out[n] = r[n];
}

// e^x, 2^n * e^r with |r| <= ln2 / 2 and a degree-6 polynomial (relative error ~2e-7), x clamped
// to [-87, 88] (e^-87 ~ 1e-38: nothing a sum of exponentials can resolve; e^88 < FLT_MAX).
inline vf vexp(vf x) {
  x = x < -87.0f ? splat(-87.0f) : x;
  x = x > 88.0f ? splat(88.0f) : x;
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding and subtracting it rounds to nearest
  vf nf = (x * 1.44269504088896341f + magic) - magic;
  vi n = __builtin_convertvector(nf, vi);
  vf r = x - nf * 0.693359375f - nf * -2.12194440e-4f;
  vf p = splat(1.0f / 720) * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  vi bits = (n + 127) << 23;
  vf two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return p * two_n;
}

#define TRTBUILD_RETURN_IF_ERROR(expr)        \
  do {                                        \
    if (OrtStatus* _status = (expr)) return _status; \
  } while (0)

inline OrtStatus* op_error(const OrtApi* api, const char* op, const std::string& message) {
  return api->CreateStatus(ORT_INVALID_ARGUMENT, (std::string("trtbuild::") + op + ": " + message).c_str());
}

inline OrtStatus* shape_of(const OrtApi* api, const OrtValue* value, std::vector<int64_t>& dims) {
  OrtTensorTypeAndShapeInfo* info;
  TRTBUILD_RETURN_IF_ERROR(api->GetTensorTypeAndShape(value, &info));
  size_t n = 0;
  OrtStatus* s = api->GetDimensionsCount(info, &n);
  if (!s) {
    dims.resize(n);
    s = api->GetDimensions(info, dims.data(), n);
  }
  api->ReleaseTensorTypeAndShapeInfo(info);
  return s;
}

inline int64_t element_count(const std::vector<int64_t>& dims) {
  int64_t n = 1;
  for (int64_t d : dims) n *= d;
  return n;
}

// task(data, t) for t in [0, tasks) on the context's thread pool; a single task runs on this thread
// (a decode step's: not worth waking the pool).
inline OrtStatus* run_tasks(const OrtApi* api, OrtKernelContext* context, void (*task)(void*, size_t), size_t tasks,
                            void* data) {
  if (tasks == 1) {
    task(data, 0);
    return nullptr;
  }
  return api->KernelContext_ParallelFor(context, task, tasks, tasks, data);
}

constexpr int64_t kMaxBatches = 64;  // work items grouped for the thread pool

// What a batch of work items holds while it runs: nothing (see run_items).
struct NoScope {
  template <class P>
  explicit NoScope(const P&) {}
};

// Item(problem, i) for every i in [0, items), in at most max_batches batches of consecutive items on
// the context's thread pool (a thread's consecutive items share what the kernel orders them by),
// each batch inside a Scope(problem): what its thread sets up for the items and restores after them.
template <class P, void (*Item)(const P&, int64_t), class Scope = NoScope>
OrtStatus* run_items(const OrtApi* api, OrtKernelContext* context, const P& problem, int64_t items,
                     int64_t max_batches = kMaxBatches) {
  struct Batches {
    const P* problem;
    int64_t items, per_batch;
  };
  if (items <= 0) return nullptr;
  const int64_t batches = std::min(items, max_batches);
  Batches data{&problem, items, (items + batches - 1) / batches};
  const size_t used = (size_t)((items + data.per_batch - 1) / data.per_batch);
  auto batch = [](void* d, size_t b) {
    const Batches& all = *static_cast<const Batches*>(d);
    const Scope scope(*all.problem);
    const int64_t first = (int64_t)b * all.per_batch;
    for (int64_t i = first; i < std::min(all.items, first + all.per_batch); ++i) Item(*all.problem, i);
  };
  return api->KernelContext_ParallelFor(context, batch, used, used, &data);
}

// The OrtCustomOp table of a kernel class K, which provides:
//   static const char* name; static ONNXTensorElementDataType input_type(size_t), output_type(size_t);
//   static size_t inputs, outputs, required_inputs;
//   static OrtStatus* create(const OrtApi*, const OrtKernelInfo*, K**);  OrtStatus* compute(OrtKernelContext*);
template <class K>
struct OpTable : OrtCustomOp {
  OpTable() : OrtCustomOp{} {
    version = kOrtApiVersion;
    GetName = [](const OrtCustomOp*) { return K::name; };
    GetExecutionProviderType = [](const OrtCustomOp*) { return "CPUExecutionProvider"; };
    GetInputType = [](const OrtCustomOp*, size_t i) { return K::input_type(i); };
    GetInputTypeCount = [](const OrtCustomOp*) { return K::inputs; };
    GetOutputType = [](const OrtCustomOp*, size_t i) { return K::output_type(i); };
    GetOutputTypeCount = [](const OrtCustomOp*) { return K::outputs; };
    KernelDestroy = [](void* kernel) { delete static_cast<K*>(kernel); };
    GetInputCharacteristic = [](const OrtCustomOp*, size_t i) {
      return i < K::required_inputs ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
    };
    GetOutputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
    GetInputMemoryType = [](const OrtCustomOp*, size_t) { return OrtMemTypeDefault; };
    GetVariadicInputMinArity = [](const OrtCustomOp*) { return 1; };
    GetVariadicInputHomogeneity = [](const OrtCustomOp*) { return 0; };
    GetVariadicOutputMinArity = [](const OrtCustomOp*) { return 1; };
    GetVariadicOutputHomogeneity = [](const OrtCustomOp*) { return 0; };
    CreateKernelV2 = [](const OrtCustomOp*, const OrtApi* api, const OrtKernelInfo* info, void** out) -> OrtStatus* {
      K* kernel = nullptr;
      TRTBUILD_RETURN_IF_ERROR(K::create(api, info, &kernel));
      *out = kernel;
      return nullptr;
    };
    KernelComputeV2 = [](void* kernel, OrtKernelContext* context) {
      return static_cast<K*>(kernel)->compute(context);
    };
    GetStartVersion = [](const OrtCustomOp*) { return 1; };
    GetEndVersion = [](const OrtCustomOp*) { return INT_MAX; };
  }
};

// Each kernel source defines one of these; register.cc adds them all to the "trtbuild" domain.
const OrtCustomOp* causal_prompt_attention_op();
const OrtCustomOp* causal_prompt_attention_int8_kv_op();
const OrtCustomOp* generation_attention_op();
const OrtCustomOp* generation_attention_int8_kv_op();
const OrtCustomOp* per_token_quantize_op();
const OrtCustomOp* swiglu_quantize_op();
const OrtCustomOp* all_reduce_op();
const OrtCustomOp* all_gather_op();
const OrtCustomOp* pipeline_send_op();
const OrtCustomOp* pipeline_recv_op();
const OrtCustomOp* lm_head_op();
const OrtCustomOp* weight_only_quant_matmul_op();

}  // namespace trtbuild
