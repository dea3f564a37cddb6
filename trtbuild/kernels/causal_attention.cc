// trtbuild::CausalPromptAttention — causal self-attention of one prompt into an empty KV cache,
// an onnxruntime custom op (C API; the vendored headers in include/ are onnxruntime's, MIT).
//
// GroupQueryAttention computes a prompt's whole S x S score matrix and masks half of it. This
// kernel works in blocks of 64 queries and computes, for each, only the keys up to its last query:
// the half of the matrix the causal mask keeps (plus the diagonal blocks). Scores, softmax and the
// weighted sum of values run in register tiles written with GCC vector extensions, so the same
// source compiles to AVX-512 or AVX2 for the machine it is built on (-march=native).
//
// Inputs:  qkv [1, S, (H + 2 KV) * D] float (packed as GroupQueryAttention takes it),
//          past_key [1, KV, M, D] float (only its capacity M is read: the cache is empty),
//          cos_cache, sin_cache [P, R / 2] float (optional: no rotary embedding without them).
// Outputs: output [1, S, H * D], present_key and present_value [1, KV, M, D] with rows 0..S-1
//          written (rotary applied to keys; rows from S on are written by later decode steps).
// Attributes: num_heads, kv_num_heads; scale (default 1 / sqrt(D)). Rotary is GPT-NeoX style
// (rotate half, not interleaved) over the first R dims, at positions 0..S-1.

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "onnxruntime_c_api.h"

namespace {

constexpr uint32_t kOrtApiVersion = 17;  // KernelContext_ParallelFor
constexpr int kBlock = 64;               // queries per task; keys are tiled by 32

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

inline v16 load(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, v16 v) { std::memcpy(p, &v, sizeof v); }
inline v16 splat(float x) { return v16{} + x; }
inline float hsum(v16 v) {
  float s = 0;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
}
inline float hmax(v16 v) {
  float m = v[0];
  for (int i = 1; i < 16; ++i) m = std::max(m, v[i]);
  return m;
}

// e^x for x <= 0 (scores minus their row's max): 2^n * e^r, |r| <= ln2 / 2, degree-6 polynomial
// (relative error ~2e-7); below -87 the result is ~1e-38, far under any row sum's resolution.
inline v16 exp_nonpositive(v16 x) {
  x = x < -87.0f ? splat(-87.0f) : x;
  v16i n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, v16i);  // round half down (x <= 0)
  v16 nf = __builtin_convertvector(n, v16);
  v16 r = x - nf * 0.693359375f - nf * -2.12194440e-4f;
  v16 p = splat(1.0f / 720) * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  v16i bits = (n + 127) << 23;
  v16 two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return p * two_n;
}

struct Problem {
  const float* qkv;
  const float* cos;  // nullptr: no rotary
  const float* sin;
  float* out;
  float* present_k;
  float* present_v;
  float* q;   // scratch [H, Sp, D]: rotated queries times scale
  float* kt;  // scratch [KV, D, Sp]: rotated keys, transposed
  int S, H, KV, D, rotary_dim, M, Sp, blocks;
  float scale;
};

// Rows (queries) the weighted sum of values handles at once: its accumulators are RM x ND vectors.
constexpr int rows_per_pv(int nd) { return nd >= 16 ? 1 : std::min(8, 16 / nd); }

void rope(const float* in, float* out, const float* c, const float* s, int rotary_dim, int D, float mul) {
  const int half = rotary_dim / 2;
  for (int i = 0; i < half; ++i) {
    out[i] = (in[i] * c[i] - in[i + half] * s[i]) * mul;
    out[i + half] = (in[i + half] * c[i] + in[i] * s[i]) * mul;
  }
  for (int i = rotary_dim; i < D; ++i) out[i] = in[i] * mul;
}

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
      rope(x + (p.H + h) * D, p.present_k + ((size_t)h * p.M + t) * D, c, s, p.rotary_dim, D, 1.0f);
      std::memcpy(p.present_v + ((size_t)h * p.M + t) * D, x + (p.H + p.KV + h) * D, D * sizeof(float));
    }
  }
  for (int h = 0; h < p.KV; ++h) {
    const float* k = p.present_k + (size_t)h * p.M * D;
    float* kt = p.kt + (size_t)h * D * p.Sp;
    for (int d = 0; d < D; ++d)
      for (int t = t0; t < t1; ++t) kt[(size_t)d * p.Sp + t] = k[(size_t)t * D + d];
  }
}

// scores[r][j] = q_r . k_j for 8 query rows and 32 keys.
inline void score_tile(const float* q, const float* kt, int D, int Sp, float* scores, int ld) {
  v16 acc[8][2] = {};
  for (int d = 0; d < D; ++d) {
    const v16 k0 = load(kt + (size_t)d * Sp), k1 = load(kt + (size_t)d * Sp + 16);
    for (int r = 0; r < 8; ++r) {
      const v16 qd = splat(q[r * D + d]);
      acc[r][0] += qd * k0;
      acc[r][1] += qd * k1;
    }
  }
  for (int r = 0; r < 8; ++r) {
    store(scores + r * ld, acc[r][0]);
    store(scores + r * ld + 16, acc[r][1]);
  }
}

// out[r] = inv[r] * sum_j P[r][j] v_j for `rows` (<= RM) rows over keys [0, keys).
template <int ND>
inline void weighted_values(const float* P, int ld, const float* v, int keys, const float* inv, int rows, float* out,
                            int ldo) {
  constexpr int RM = rows_per_pv(ND);
  v16 acc[RM][ND] = {};
  for (int j = 0; j < keys; ++j) {
    v16 vj[ND];
    for (int n = 0; n < ND; ++n) vj[n] = load(v + (size_t)j * ND * 16 + n * 16);
    for (int r = 0; r < RM; ++r) {
      const v16 pj = splat(P[r * ld + j]);
      for (int n = 0; n < ND; ++n) acc[r][n] += pj * vj[n];
    }
  }
  for (int r = 0; r < rows; ++r)
    for (int n = 0; n < ND; ++n) store(out + (size_t)r * ldo + n * 16, acc[r][n] * inv[r]);
}

// Query block qb of head h.
template <int ND>
void attend_block(const Problem& p, int h, int qb) {
  constexpr int D = ND * 16, RM = rows_per_pv(ND);
  const int r0 = qb * kBlock, r1 = std::min(p.S, r0 + kBlock), rows = r1 - r0;
  const int kv_head = h / (p.H / p.KV);
  const int ld = (r1 + 31) / 32 * 32;
  thread_local std::vector<float> buffer;
  buffer.resize((size_t)(kBlock + 8) * ld + kBlock);
  float* scores = buffer.data();
  float* inv = scores + (size_t)(kBlock + 8) * ld;
  const float* q = p.q + ((size_t)h * p.Sp + r0) * D;
  const float* kt = p.kt + (size_t)kv_head * D * p.Sp;
  for (int i = 0; i < rows; i += 8) {
    const int keys = std::min(r0 + i + 8, r1);
    for (int j = 0; j < keys; j += 32) score_tile(q + (size_t)i * D, kt + j, D, p.Sp, scores + (size_t)i * ld + j, ld);
  }
  for (int i = 0; i < rows; ++i) {
    float* row = scores + (size_t)i * ld;
    const int n = r0 + i + 1;                                     // keys query r0 + i sees
    const int zero_to = std::min(r0 + (i / RM + 1) * RM, r1);  // keys its row group sums over
    v16 mv = splat(-INFINITY);
    int j = 0;
    for (; j + 16 <= n; j += 16) {
      const v16 r = load(row + j);
      mv = r > mv ? r : mv;
    }
    float m = hmax(mv);
    for (; j < n; ++j) m = std::max(m, row[j]);
    v16 sum = {};
    j = 0;
    for (; j + 16 <= n; j += 16) {
      const v16 e = exp_nonpositive(load(row + j) - m);
      store(row + j, e);
      sum += e;
    }
    float s = hsum(sum);
    for (; j < n; ++j) s += row[j] = std::exp(row[j] - m);
    for (; j < zero_to; ++j) row[j] = 0.0f;
    inv[i] = 1.0f / s;
  }
  const float* v = p.present_v + (size_t)kv_head * p.M * D;
  for (int i = 0; i < rows; i += RM)
    weighted_values<ND>(scores + (size_t)i * ld, ld, v, std::min(r0 + i + RM, r1), inv + i, std::min(RM, rows - i),
                        p.out + (size_t)(r0 + i) * p.H * D + (size_t)h * D, p.H * D);
}

void prepare_task(void* data, size_t i) { prepare_block(*static_cast<const Problem*>(data), (int)i); }

template <int ND>
void attend_task(void* data, size_t i) {
  const Problem& p = *static_cast<const Problem*>(data);
  // Largest blocks (last queries: most keys) first, so the threads finish together.
  attend_block<ND>(p, (int)(i % p.H), p.blocks - 1 - (int)(i / p.H));
}

using Task = void (*)(void*, size_t);

Task attend_for(int D) {
  switch (D) {
    case 16: return attend_task<1>;
    case 32: return attend_task<2>;
    case 48: return attend_task<3>;
    case 64: return attend_task<4>;
    case 80: return attend_task<5>;
    case 96: return attend_task<6>;
    case 112: return attend_task<7>;
    case 128: return attend_task<8>;
    case 256: return attend_task<16>;
    default: return nullptr;
  }
}

struct Kernel {
  const OrtApi* api;
  int64_t num_heads = 0, kv_num_heads = 0;
  float scale = 0.0f;  // 0: 1 / sqrt(D)
};

OrtStatus* error(const OrtApi* api, const std::string& message) {
  return api->CreateStatus(ORT_INVALID_ARGUMENT, ("trtbuild::CausalPromptAttention: " + message).c_str());
}

#define RETURN_IF_ERROR(expr)          \
  do {                                 \
    if (OrtStatus* _s = (expr)) return _s; \
  } while (0)

OrtStatus* shape_of(const OrtApi* api, const OrtValue* value, std::vector<int64_t>& dims) {
  OrtTensorTypeAndShapeInfo* info;
  RETURN_IF_ERROR(api->GetTensorTypeAndShape(value, &info));
  size_t n = 0;
  OrtStatus* s = api->GetDimensionsCount(info, &n);
  if (!s) {
    dims.resize(n);
    s = api->GetDimensions(info, dims.data(), n);
  }
  api->ReleaseTensorTypeAndShapeInfo(info);
  return s;
}

OrtStatus* compute(const Kernel& k, OrtKernelContext* context) {
  const OrtApi* api = k.api;
  size_t num_inputs = 0;
  RETURN_IF_ERROR(api->KernelContext_GetInputCount(context, &num_inputs));
  const OrtValue *qkv, *past_key, *cos = nullptr, *sin = nullptr;
  RETURN_IF_ERROR(api->KernelContext_GetInput(context, 0, &qkv));
  RETURN_IF_ERROR(api->KernelContext_GetInput(context, 1, &past_key));
  if (num_inputs > 3) {
    RETURN_IF_ERROR(api->KernelContext_GetInput(context, 2, &cos));
    RETURN_IF_ERROR(api->KernelContext_GetInput(context, 3, &sin));
  }
  std::vector<int64_t> x, cache, rot;
  RETURN_IF_ERROR(shape_of(api, qkv, x));
  RETURN_IF_ERROR(shape_of(api, past_key, cache));
  const int H = (int)k.num_heads, KV = (int)k.kv_num_heads;
  if (x.size() != 3 || x[0] != 1)
    return error(api, "qkv must be [1, S, (H + 2 KV) * D] (one prompt)");
  if (H <= 0 || KV <= 0 || H % KV != 0 || x[2] % (H + 2 * KV) != 0)
    return error(api, "qkv's last dim is not (num_heads + 2 kv_num_heads) * head_size");
  const int S = (int)x[1], D = (int)(x[2] / (H + 2 * KV));
  if (!attend_for(D)) return error(api, "head size " + std::to_string(D) + " has no kernel (16..128 by 16, 256)");
  if (cache.size() != 4 || cache[0] != 1 || cache[1] != KV || cache[3] != D || cache[2] < S)
    return error(api, "past_key must be [1, kv_num_heads, M >= S, head_size]");
  int rotary_dim = 0;
  if (cos && sin) {
    RETURN_IF_ERROR(shape_of(api, cos, rot));
    if (rot.size() != 2 || rot[0] < S || 2 * rot[1] > D)
      return error(api, "cos_cache must be [positions >= S, rotary_dim / 2 <= head_size / 2]");
    rotary_dim = (int)(2 * rot[1]);
  }
  Problem p{};
  p.S = S, p.H = H, p.KV = KV, p.D = D, p.rotary_dim = rotary_dim, p.M = (int)cache[2];
  p.scale = k.scale > 0 ? k.scale : 1.0f / std::sqrt((float)D);
  p.blocks = (S + kBlock - 1) / kBlock;
  p.Sp = p.blocks * kBlock;
  const float* data;
  RETURN_IF_ERROR(api->GetTensorData(qkv, reinterpret_cast<const void**>(&data)));
  p.qkv = data;
  if (rotary_dim) {
    RETURN_IF_ERROR(api->GetTensorData(cos, reinterpret_cast<const void**>(&p.cos)));
    RETURN_IF_ERROR(api->GetTensorData(sin, reinterpret_cast<const void**>(&p.sin)));
  }
  const int64_t out_shape[3] = {1, S, (int64_t)H * D};
  OrtValue *out, *present_k, *present_v;
  RETURN_IF_ERROR(api->KernelContext_GetOutput(context, 0, out_shape, 3, &out));
  RETURN_IF_ERROR(api->KernelContext_GetOutput(context, 1, cache.data(), 4, &present_k));
  RETURN_IF_ERROR(api->KernelContext_GetOutput(context, 2, cache.data(), 4, &present_v));
  RETURN_IF_ERROR(api->GetTensorMutableData(out, reinterpret_cast<void**>(&p.out)));
  RETURN_IF_ERROR(api->GetTensorMutableData(present_k, reinterpret_cast<void**>(&p.present_k)));
  RETURN_IF_ERROR(api->GetTensorMutableData(present_v, reinterpret_cast<void**>(&p.present_v)));
  if (S == 0) return nullptr;
  // Scratch per calling thread: sessions may run concurrently from several threads.
  thread_local std::vector<float> scratch;
  scratch.resize((size_t)(H + KV) * p.Sp * D);
  p.q = scratch.data();
  p.kt = p.q + (size_t)H * p.Sp * D;
  // Not cleared: rows of the last block past S (read by the 8-row score tiles) and keys past a
  // query's own (read by the 32-key tiles) give scores that are never used.
  RETURN_IF_ERROR(api->KernelContext_ParallelFor(context, prepare_task, p.blocks, p.blocks, &p));
  const size_t tasks = (size_t)p.blocks * H;
  return api->KernelContext_ParallelFor(context, attend_for(D), tasks, tasks, &p);
}

// --- the OrtCustomOp table ---

OrtStatus* ORT_API_CALL create_kernel(const OrtCustomOp*, const OrtApi* api, const OrtKernelInfo* info, void** out) {
  auto* k = new Kernel{api};
  OrtStatus* s = api->KernelInfoGetAttribute_int64(info, "num_heads", &k->num_heads);
  if (!s) s = api->KernelInfoGetAttribute_int64(info, "kv_num_heads", &k->kv_num_heads);
  if (s) {
    delete k;
    return s;
  }
  if (OrtStatus* missing = api->KernelInfoGetAttribute_float(info, "scale", &k->scale)) {
    api->ReleaseStatus(missing);  // optional
    k->scale = 0.0f;
  }
  *out = k;
  return nullptr;
}

OrtStatus* ORT_API_CALL kernel_compute(void* kernel, OrtKernelContext* context) {
  return compute(*static_cast<Kernel*>(kernel), context);
}
void ORT_API_CALL kernel_destroy(void* kernel) { delete static_cast<Kernel*>(kernel); }
const char* ORT_API_CALL op_name(const OrtCustomOp*) { return "CausalPromptAttention"; }
const char* ORT_API_CALL op_provider(const OrtCustomOp*) { return "CPUExecutionProvider"; }
ONNXTensorElementDataType ORT_API_CALL float_type(const OrtCustomOp*, size_t) {
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
size_t ORT_API_CALL input_count(const OrtCustomOp*) { return 4; }
size_t ORT_API_CALL output_count(const OrtCustomOp*) { return 3; }
OrtCustomOpInputOutputCharacteristic ORT_API_CALL input_kind(const OrtCustomOp*, size_t i) {
  return i < 2 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
}
OrtCustomOpInputOutputCharacteristic ORT_API_CALL output_kind(const OrtCustomOp*, size_t) {
  return INPUT_OUTPUT_REQUIRED;
}
OrtMemType ORT_API_CALL input_memory(const OrtCustomOp*, size_t) { return OrtMemTypeDefault; }
int ORT_API_CALL one(const OrtCustomOp*) { return 1; }
int ORT_API_CALL zero(const OrtCustomOp*) { return 0; }
int ORT_API_CALL end_version(const OrtCustomOp*) { return INT_MAX; }

OrtCustomOp make_op() {
  OrtCustomOp op{};
  op.version = kOrtApiVersion;
  op.GetName = op_name;
  op.GetExecutionProviderType = op_provider;
  op.GetInputType = float_type;
  op.GetInputTypeCount = input_count;
  op.GetOutputType = float_type;
  op.GetOutputTypeCount = output_count;
  op.KernelDestroy = kernel_destroy;
  op.GetInputCharacteristic = input_kind;
  op.GetOutputCharacteristic = output_kind;
  op.GetInputMemoryType = input_memory;
  op.GetVariadicInputMinArity = one;
  op.GetVariadicInputHomogeneity = zero;
  op.GetVariadicOutputMinArity = one;
  op.GetVariadicOutputHomogeneity = zero;
  op.CreateKernelV2 = create_kernel;
  op.KernelComputeV2 = kernel_compute;
  op.GetStartVersion = one;
  op.GetEndVersion = end_version;
  return op;
}

const OrtCustomOp kOp = make_op();

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                                          const OrtApiBase* base) {
  const OrtApi* api = base->GetApi(kOrtApiVersion);
  if (!api) return nullptr;  // onnxruntime < 1.17: the op stays unknown and the model fails to load, naming it
  OrtCustomOpDomain* domain = nullptr;
  RETURN_IF_ERROR(api->CreateCustomOpDomain("trtbuild", &domain));
  // The domain must outlive every session that uses it; it lives as long as the process.
  RETURN_IF_ERROR(api->CustomOpDomain_Add(domain, &kOp));
  return api->AddCustomOpDomain(options, domain);
}
