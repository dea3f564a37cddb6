// Tensor-parallel collectives of a rank's engine (TensorRT-LLM's AllReduce plugin and the gather of
// vocab-parallel logits), calling the MPI library the process loaded (mpi4py: MPICH or Open MPI).
//
// trtbuild::AllReduce(x [...] float, mpi [4] int64) -> y [...] float: the sum of x over the
//   tensor-parallel ranks of the stage.
// trtbuild::AllGather(x [R, N] float, mpi) -> y [R, ranks * N] float: tensor-parallel rank r's x in
//   columns r * N .. (r + 1) * N - 1 of every row.
// trtbuild::PipelineSend(x [...] float, mpi; peer) -> sent [1] float: x to world rank `peer` (the
//   next pipeline stage), 0 once sent.
// trtbuild::PipelineRecv(ids [B, S] int64, mpi; peer, hidden_size) -> y [B, S, hidden_size] float:
//   what world rank `peer` (the previous stage) sent.
//
// `mpi` holds the handles of the stage's tensor-parallel communicator, of MPI_FLOAT, of MPI_SUM
// and of the whole world's communicator as the runtime's mpi4py reads them (`handle`): an engine
// stores no handle (they differ per process and per MPI library), only world ranks, so the
// runtime feeds them with every call. The kernel takes MPI_Allreduce and
// MPI_Allgather from the libmpi already loaded (mpi4py loads it RTLD_LOCAL, hence dlopen with
// RTLD_NOLOAD); a handle is an int (MPICH) or a pointer (Open MPI), passed as a 64-bit integer,
// of which an int parameter reads the low half (x86-64 and AArch64 calling conventions).

#include <dlfcn.h>

#include "ort_op.h"

namespace trtbuild {
namespace {

using AllreduceFn = int (*)(const void*, void*, int, intptr_t, intptr_t, intptr_t);
using AllgatherFn = int (*)(const void*, int, intptr_t, void*, int, intptr_t, intptr_t);
using CommSizeFn = int (*)(intptr_t, int*);
using SendFn = int (*)(const void*, int, intptr_t, int, int, intptr_t);
using RecvFn = int (*)(void*, int, intptr_t, int, int, intptr_t, void*);

struct Mpi {
  AllreduceFn allreduce = nullptr;
  AllgatherFn allgather = nullptr;
  CommSizeFn comm_size = nullptr;
  SendFn send = nullptr;
  RecvFn recv = nullptr;
};

// The loaded MPI library's functions, or an error saying how multi-rank engines are run.
OrtStatus* find_mpi(const OrtApi* api, const char* op, Mpi& mpi) {
  for (const char* name : {"libmpi.so.12", "libmpi.so.40", "libmpi.so"}) {
    void* lib = dlopen(name, RTLD_NOLOAD | RTLD_LAZY);
    if (!lib) continue;
    mpi.allreduce = reinterpret_cast<AllreduceFn>(dlsym(lib, "MPI_Allreduce"));
    mpi.allgather = reinterpret_cast<AllgatherFn>(dlsym(lib, "MPI_Allgather"));
    mpi.comm_size = reinterpret_cast<CommSizeFn>(dlsym(lib, "MPI_Comm_size"));
    mpi.send = reinterpret_cast<SendFn>(dlsym(lib, "MPI_Send"));
    mpi.recv = reinterpret_cast<RecvFn>(dlsym(lib, "MPI_Recv"));
    if (mpi.allreduce && mpi.allgather && mpi.comm_size && mpi.send && mpi.recv) return nullptr;
  }
  return op_error(api, op, "no MPI library is loaded in this process: a multi-rank engine runs under mpiexec "
                           "through trtbuild's runtime (mpiexec -n N trtbuild-run --engine_dir ...)");
}

struct Handles {
  intptr_t comm, float_type, sum, world;
};

OrtStatus* read_handles(const OrtApi* api, const char* op, OrtKernelContext* context, Handles& h) {
  const OrtValue* value;
  TRTBUILD_RETURN_IF_ERROR(api->KernelContext_GetInput(context, 1, &value));
  std::vector<int64_t> dims;
  TRTBUILD_RETURN_IF_ERROR(shape_of(api, value, dims));
  if (dims.size() != 1 || dims[0] != 4)
    return op_error(api, op, "mpi must be [4] int64: the stage's comm, MPI_FLOAT, MPI_SUM, the world's comm");
  const int64_t* data;
  TRTBUILD_RETURN_IF_ERROR(api->GetTensorData(value, reinterpret_cast<const void**>(&data)));
  h = {(intptr_t)data[0], (intptr_t)data[1], (intptr_t)data[2], (intptr_t)data[3]};
  return nullptr;
}

template <class K>
struct CollectiveOp {
  static ONNXTensorElementDataType input_type(size_t i) {
    return i == 0 && !K::ids_input ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
  }
  static ONNXTensorElementDataType output_type(size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  static constexpr size_t inputs = 2, outputs = 1, required_inputs = 2;
  static constexpr bool ids_input = false;
  static OrtStatus* create(const OrtApi* api, const OrtKernelInfo* info, K** out) {
    *out = new K{{api}};
    return (*out)->read_attributes(info);
  }
  OrtStatus* read_attributes(const OrtKernelInfo*) { return nullptr; }
  // MPI is looked up on the first call, not when the session is created: the build creates one
  // (to optimize the graph) in a process without MPI.
  OrtStatus* mpi_functions() const {
    return mpi.allreduce ? nullptr : find_mpi(api, K::name, mpi);
  }
  // What every collective starts with: its first input and that input's shape, and the MPI
  // functions and handles it calls.
  OrtStatus* begin(OrtKernelContext* context, const OrtValue*& x, std::vector<int64_t>& dims, Handles& h) const {
    TRTBUILD_RETURN_IF_ERROR(api->KernelContext_GetInput(context, 0, &x));
    TRTBUILD_RETURN_IF_ERROR(mpi_functions());
    TRTBUILD_RETURN_IF_ERROR(read_handles(api, K::name, context, h));
    return shape_of(api, x, dims);
  }
  // MPI counts elements in an int.
  OrtStatus* check_count(int64_t n) const {
    return n > INT_MAX ? op_error(api, K::name, "tensor too large for one MPI call") : nullptr;
  }
  const OrtApi* api;
  mutable Mpi mpi;
};

struct AllReduce : CollectiveOp<AllReduce> {
  static constexpr const char* name = "AllReduce";

  OrtStatus* compute(OrtKernelContext* context) const {
    const OrtValue* x;
    Handles h;
    std::vector<int64_t> dims;
    TRTBUILD_RETURN_IF_ERROR(begin(context, x, dims, h));
    OrtValue* y;
    TRTBUILD_RETURN_IF_ERROR(api->KernelContext_GetOutput(context, 0, dims.data(), dims.size(), &y));
    const float* in;
    float* out;
    TRTBUILD_RETURN_IF_ERROR(api->GetTensorData(x, reinterpret_cast<const void**>(&in)));
    TRTBUILD_RETURN_IF_ERROR(api->GetTensorMutableData(y, reinterpret_cast<void**>(&out)));
    const int64_t n = element_count(dims);
    TRTBUILD_RETURN_IF_ERROR(check_count(n));
    if (n && mpi.allreduce(in, out, (int)n, h.float_type, h.sum, h.comm) != 0)
      return op_error(api, name, "MPI_Allreduce failed");
    return nullptr;
  }
};

struct AllGather : CollectiveOp<AllGather> {
  static constexpr const char* name = "AllGather";

  OrtStatus* compute(OrtKernelContext* context) const {
    const OrtValue* x;
    Handles h;
    std::vector<int64_t> dims;
    TRTBUILD_RETURN_IF_ERROR(begin(context, x, dims, h));
    if (dims.size() != 2) return op_error(api, name, "x must be [rows, N]");
    int ranks = 0;
    if (mpi.comm_size(h.comm, &ranks) != 0 || ranks < 1) return op_error(api, name, "MPI_Comm_size failed");
    const int64_t rows = dims[0], n = dims[1];
    TRTBUILD_RETURN_IF_ERROR(check_count(rows * n * ranks));
    std::vector<int64_t> out_dims{rows, n * ranks};
    OrtValue* y;
    TRTBUILD_RETURN_IF_ERROR(api->KernelContext_GetOutput(context, 0, out_dims.data(), 2, &y));
    const float* in;
    float* out;
    TRTBUILD_RETURN_IF_ERROR(api->GetTensorData(x, reinterpret_cast<const void**>(&in)));
    TRTBUILD_RETURN_IF_ERROR(api->GetTensorMutableData(y, reinterpret_cast<void**>(&out)));
    if (rows * n == 0) return nullptr;
    std::vector<float> blocks((size_t)(rows * n * ranks));  // [ranks, rows, n] as MPI gathers them
    if (mpi.allgather(in, (int)(rows * n), h.float_type, blocks.data(), (int)(rows * n), h.float_type, h.comm) != 0)
      return op_error(api, name, "MPI_Allgather failed");
    for (int r = 0; r < ranks; ++r)
      for (int64_t i = 0; i < rows; ++i)
        std::memcpy(out + i * n * ranks + r * n, blocks.data() + (r * rows + i) * n, n * sizeof(float));
    return nullptr;
  }
};

// An int attribute of the node (peer, hidden_size).
OrtStatus* int_attribute(const OrtApi* api, const OrtKernelInfo* info, const char* op, const char* name, int64_t& v) {
  if (OrtStatus* s = api->KernelInfoGetAttribute_int64(info, name, &v)) {
    api->ReleaseStatus(s);
    return op_error(api, op, std::string("attribute ") + name + " is required");
  }
  return nullptr;
}

struct PipelineSend : CollectiveOp<PipelineSend> {
  static constexpr const char* name = "PipelineSend";
  int64_t peer = -1;

  OrtStatus* read_attributes(const OrtKernelInfo* info) { return int_attribute(api, info, name, "peer", peer); }

  OrtStatus* compute(OrtKernelContext* context) const {
    const OrtValue* x;
    Handles h;
    std::vector<int64_t> dims;
    TRTBUILD_RETURN_IF_ERROR(begin(context, x, dims, h));
    const float* in;
    TRTBUILD_RETURN_IF_ERROR(api->GetTensorData(x, reinterpret_cast<const void**>(&in)));
    const int64_t n = element_count(dims);
    TRTBUILD_RETURN_IF_ERROR(check_count(n));
    if (mpi.send(in, (int)n, h.float_type, (int)peer, 0, h.world) != 0) return op_error(api, name, "MPI_Send failed");
    const int64_t one = 1;
    OrtValue* y;
    TRTBUILD_RETURN_IF_ERROR(api->KernelContext_GetOutput(context, 0, &one, 1, &y));
    float* out;
    TRTBUILD_RETURN_IF_ERROR(api->GetTensorMutableData(y, reinterpret_cast<void**>(&out)));
    out[0] = 0.0f;
    return nullptr;
  }
};

struct PipelineRecv : CollectiveOp<PipelineRecv> {
  static constexpr const char* name = "PipelineRecv";
  static constexpr bool ids_input = true;
  int64_t peer = -1, hidden_size = 0;

  OrtStatus* read_attributes(const OrtKernelInfo* info) {
    TRTBUILD_RETURN_IF_ERROR(int_attribute(api, info, name, "peer", peer));
    return int_attribute(api, info, name, "hidden_size", hidden_size);
  }

  OrtStatus* compute(OrtKernelContext* context) const {
    const OrtValue* ids;
    Handles h;
    std::vector<int64_t> dims;
    TRTBUILD_RETURN_IF_ERROR(begin(context, ids, dims, h));
    if (dims.size() != 2) return op_error(api, name, "ids must be [batch, sequence]");
    dims.push_back(hidden_size);
    OrtValue* y;
    TRTBUILD_RETURN_IF_ERROR(api->KernelContext_GetOutput(context, 0, dims.data(), dims.size(), &y));
    float* out;
    TRTBUILD_RETURN_IF_ERROR(api->GetTensorMutableData(y, reinterpret_cast<void**>(&out)));
    const int64_t n = element_count(dims);
    TRTBUILD_RETURN_IF_ERROR(check_count(n));
    alignas(16) char status[64];  // MPI_Status: 20 bytes in MPICH, 24 in Open MPI
    if (mpi.recv(out, (int)n, h.float_type, (int)peer, 0, h.world, status) != 0)
      return op_error(api, name, "MPI_Recv failed");
    return nullptr;
  }
};

}  // namespace

const OrtCustomOp* pipeline_send_op() {
  static const OpTable<PipelineSend> op;
  return &op;
}

const OrtCustomOp* pipeline_recv_op() {
  static const OpTable<PipelineRecv> op;
  return &op;
}

const OrtCustomOp* all_reduce_op() {
  static const OpTable<AllReduce> op;
  return &op;
}

const OrtCustomOp* all_gather_op() {
  static const OpTable<AllGather> op;
  return &op;
}

}  // namespace trtbuild
