// The library's entry point: onnxruntime calls RegisterCustomOps when a session registers it
// (SessionOptions.register_custom_ops_library); every trtbuild op joins the "trtbuild" domain.
#include "ort_op.h"

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                                          const OrtApiBase* base) {
  const OrtApi* api = base->GetApi(trtbuild::kOrtApiVersion);
  if (!api) return nullptr;  // onnxruntime < 1.17: the ops stay unknown and loading the model names them
  OrtCustomOpDomain* domain = nullptr;
  // The domain must outlive every session that uses it: it lives as long as the process.
  TRTBUILD_RETURN_IF_ERROR(api->CreateCustomOpDomain("trtbuild", &domain));
  for (const OrtCustomOp* op : {trtbuild::causal_prompt_attention_op(), trtbuild::causal_prompt_attention_int8_kv_op(),
                                trtbuild::generation_attention_op(), trtbuild::generation_attention_int8_kv_op(),
                                trtbuild::per_token_quantize_op(), trtbuild::swiglu_quantize_op(),
                                trtbuild::all_reduce_op(), trtbuild::all_gather_op(),
                                trtbuild::pipeline_send_op(), trtbuild::pipeline_recv_op(),
                                trtbuild::lm_head_op(), trtbuild::weight_only_quant_matmul_op()})
    TRTBUILD_RETURN_IF_ERROR(api->CustomOpDomain_Add(domain, op));
  return api->AddCustomOpDomain(options, domain);
}
