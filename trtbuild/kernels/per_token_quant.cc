// SmoothQuant W8A8's per-token activation quantization (TensorRT-LLM's quantize_per_token plugin),
// one pass over each row instead of Abs, ReduceMax, Mul and QuantizeLinear:
//
// trtbuild::PerTokenQuantize(x [..., K] float, channel_scale [K] float optional)
//   -> (xq [..., K] uint8, scale [..., 1] float)
//   with x' = x * channel_scale (SmoothQuant's prequant_scaling_factor), scale = max|x'| / 127 and
//   xq = round_half_even(x' / scale) + 128: u8 values with zero point 128, which MatMulIntegerToFloat
//   takes on MLAS's fastest u8 x s8 path. A row of zeros gets scale 0 and xq 128.
//
// trtbuild::SwiGLUQuantize(y [..., 2F] float, y_scale [..., 1] float)
//   -> (aq [..., F] uint8, a_scale [..., 1] float)
//   a gated MLP's middle in one pass: with g = y[:F] * y_scale and u = y[F:] * y_scale (the merged
//   fc/gate GEMM's output and its per-token input scale), a = silu(g) * u, quantized as above for
//   the proj GEMM. Replaces Mul, Split, Sigmoid-Mul, Mul and the quantization chain.

#include <algorithm>
#include <cmath>

#include "ort_op.h"

namespace trtbuild {
namespace {

constexpr int64_t kRowsWork = 1 << 15;  // elements a parallel task handles at least

inline vf vabs(vf x) { return x < 0.0f ? -x : x; }

// Quantize one row of K floats: (xq, scale) as described above.
void quantize_row(const float* x, int64_t K, uint8_t* xq, float* scale) {
  vf mv = {};
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    const vf a = vabs(load(x + k));
    mv = a > mv ? a : mv;
  }
  float amax = hmax(mv);
  for (; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
  const float s = amax * (1.0f / 127.0f);
  *scale = s;
  if (!(s > 0.0f)) {
    std::memset(xq, 128, K);
    return;
  }
  const vf magic = splat(12582912.0f);  // rounds to nearest even under the default rounding mode
  k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    vf r = (load(x + k) / s + magic) - magic;
    r = r < -128.0f ? splat(-128.0f) : r;
    r = r > 127.0f ? splat(127.0f) : r;
    store_bytes(xq + k, __builtin_convertvector(r, vi) + 128);
  }
  for (; k < K; ++k) xq[k] = (uint8_t)(std::clamp(std::nearbyint(x[k] / s), -128.0f, 127.0f) + 128);
}

struct Rows {
  const float* x;
  const float* aux;  // PerTokenQuantize: channel_scale or nullptr; SwiGLUQuantize: y_scale
  uint8_t* xq;
  float* scale;
  int64_t rows, K, per_task;
};

void per_token_task(void* data, size_t t) {
  const Rows& r = *static_cast<const Rows*>(data);
  thread_local std::vector<float> row;
  row.resize(r.K);
  for (int64_t i = t * r.per_task; i < std::min(r.rows, (int64_t)(t + 1) * r.per_task); ++i) {
    const float* x = r.x + i * r.K;
    if (r.aux) {
      for (int64_t k = 0; k < r.K; ++k) row[k] = x[k] * r.aux[k];
      x = row.data();
    }
    quantize_row(x, r.K, r.xq + i * r.K, r.scale + i);
  }
}

void swiglu_task(void* data, size_t t) {
  const Rows& r = *static_cast<const Rows*>(data);  // K = F
  thread_local std::vector<float> row;
  row.resize(r.K);
  for (int64_t i = t * r.per_task; i < std::min(r.rows, (int64_t)(t + 1) * r.per_task); ++i) {
    const float* g = r.x + i * 2 * r.K;
    const float* u = g + r.K;
    const float s = r.aux[i];
    int64_t k = 0;
    for (; k + kLanes <= r.K; k += kLanes) {
      const vf gk = load(g + k) * s;
      store(row.data() + k, gk / (1.0f + vexp(-gk)) * (load(u + k) * s));
    }
    for (; k < r.K; ++k) {
      const float gk = g[k] * s;
      row[k] = gk / (1.0f + std::exp(-gk)) * (u[k] * s);
    }
    quantize_row(row.data(), r.K, r.xq + i * r.K, r.scale + i);
  }
}

// Shared by both ops: outputs [..., K] uint8 and [..., 1] float over the rows of `lead` dims.
OrtStatus* run_rows(const OrtApi* api, OrtKernelContext* context, std::vector<int64_t> lead, Rows& r,
                    void (*task)(void*, size_t)) {
  std::vector<int64_t> q_shape = lead, s_shape = lead;
  q_shape.push_back(r.K);
  s_shape.push_back(1);
  OrtValue *xq, *scale;
  TRTBUILD_RETURN_IF_ERROR(api->KernelContext_GetOutput(context, 0, q_shape.data(), q_shape.size(), &xq));
  TRTBUILD_RETURN_IF_ERROR(api->KernelContext_GetOutput(context, 1, s_shape.data(), s_shape.size(), &scale));
  TRTBUILD_RETURN_IF_ERROR(api->GetTensorMutableData(xq, reinterpret_cast<void**>(&r.xq)));
  TRTBUILD_RETURN_IF_ERROR(api->GetTensorMutableData(scale, reinterpret_cast<void**>(&r.scale)));
  r.rows = element_count(lead);
  if (r.rows == 0 || r.K == 0) return nullptr;
  r.per_task = std::max<int64_t>(1, kRowsWork / r.K);
  return run_tasks(api, context, task, (size_t)((r.rows + r.per_task - 1) / r.per_task), &r);
}

// What both ops share: float inputs, (u8 values, float row scales) out, no attributes.
template <class K>
struct QuantizeOp {
  static ONNXTensorElementDataType input_type(size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  static ONNXTensorElementDataType output_type(size_t i) {
    return i == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  static OrtStatus* create(const OrtApi* api, const OrtKernelInfo*, K** out) {
    *out = new K{{api}};
    return nullptr;
  }
  const OrtApi* api;
};

struct PerTokenQuantize : QuantizeOp<PerTokenQuantize> {
  static constexpr const char* name = "PerTokenQuantize";
  static constexpr size_t inputs = 2, outputs = 2, required_inputs = 1;

  OrtStatus* compute(OrtKernelContext* context) const {
    size_t num_inputs = 0;
    TRTBUILD_RETURN_IF_ERROR(api->KernelContext_GetInputCount(context, &num_inputs));
    const OrtValue *x, *channel_scale = nullptr;
    TRTBUILD_RETURN_IF_ERROR(api->KernelContext_GetInput(context, 0, &x));
    if (num_inputs > 1) TRTBUILD_RETURN_IF_ERROR(api->KernelContext_GetInput(context, 1, &channel_scale));
    std::vector<int64_t> dims, cdims;
    TRTBUILD_RETURN_IF_ERROR(shape_of(api, x, dims));
    if (dims.empty()) return op_error(api, name, "x must have at least one dimension");
    Rows r{};
    r.K = dims.back();
    TRTBUILD_RETURN_IF_ERROR(api->GetTensorData(x, reinterpret_cast<const void**>(&r.x)));
    if (channel_scale) {
      TRTBUILD_RETURN_IF_ERROR(shape_of(api, channel_scale, cdims));
      if (cdims.size() != 1 || cdims[0] != r.K)
        return op_error(api, name, "channel_scale must be [K] for x [..., K], K = " + std::to_string(r.K));
      TRTBUILD_RETURN_IF_ERROR(api->GetTensorData(channel_scale, reinterpret_cast<const void**>(&r.aux)));
    }
    dims.pop_back();
    return run_rows(api, context, dims, r, per_token_task);
  }
};

struct SwiGLUQuantize : QuantizeOp<SwiGLUQuantize> {
  static constexpr const char* name = "SwiGLUQuantize";
  static constexpr size_t inputs = 2, outputs = 2, required_inputs = 2;

  OrtStatus* compute(OrtKernelContext* context) const {
    const OrtValue *y, *y_scale;
    TRTBUILD_RETURN_IF_ERROR(api->KernelContext_GetInput(context, 0, &y));
    TRTBUILD_RETURN_IF_ERROR(api->KernelContext_GetInput(context, 1, &y_scale));
    std::vector<int64_t> dims, sdims;
    TRTBUILD_RETURN_IF_ERROR(shape_of(api, y, dims));
    TRTBUILD_RETURN_IF_ERROR(shape_of(api, y_scale, sdims));
    if (dims.empty() || dims.back() % 2 != 0) return op_error(api, name, "y must be [..., 2F]");
    std::vector<int64_t> lead(dims.begin(), dims.end() - 1), want = lead;
    want.push_back(1);
    if (sdims != want) return op_error(api, name, "y_scale must be [..., 1] for y [..., 2F]");
    Rows r{};
    r.K = dims.back() / 2;
    TRTBUILD_RETURN_IF_ERROR(api->GetTensorData(y, reinterpret_cast<const void**>(&r.x)));
    TRTBUILD_RETURN_IF_ERROR(api->GetTensorData(y_scale, reinterpret_cast<const void**>(&r.aux)));
    return run_rows(api, context, lead, r, swiglu_task);
  }
};

}  // namespace

const OrtCustomOp* per_token_quantize_op() {
  static const OpTable<PerTokenQuantize> op;
  return &op;
}

const OrtCustomOp* swiglu_quantize_op() {
  static const OpTable<SwiGLUQuantize> op;
  return &op;
}

}  // namespace trtbuild
