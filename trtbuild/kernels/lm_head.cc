// A tied float engine's lm_head, reading the embedding table where it lies (TensorRT-LLM has no
// such plugin; on a CPU it is what keeps memory at the size of the model):
//
// trtbuild::LmHead(x [M, K] float, w [N, K] float) -> y [M, N] float,  y = x · wᵀ
//
// onnxruntime's Gemm prepacks w into a copy of its own at load; for a tied lm_head that is the
// embedding table, which the Gather reads too, in memory twice (113 MB on SmolLM2). Here every
// output is a dot product of a row of x with a row of w, both contiguous along K: no copy, and w is
// streamed once a call when M is a decode step's few rows (memory-bound, as every decode GEMM is).
// Many rows (a scored prompt's logits) are tiled: a block of x's rows stays in cache while w's rows
// stream past it. At load the table moves from the file mapping into huge pages at the same
// addresses (move_to_huge_pages), which both the Gather and this kernel then read.

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>
#include <array>
#include <tuple>
#include <utility>

#include "file_pages.h"
#include "ort_op.h"

namespace trtbuild {
namespace {

constexpr int64_t kRowBlockBytes = 256 << 10;  // x rows a work item keeps in cache
constexpr int64_t kColBlockBytes = 64 << 10;   // w rows a work item reads
constexpr int kMaxTileRows = 8, kMaxTileCols = 4;

// y[m][n] = x[m] · w[n] for MR rows of x (stride ldx) and NR rows of w (stride K).
template <int MR, int NR>
void tile(const float* x, int64_t ldx, const float* w, int64_t K, float* y, int64_t ldy) {
  constexpr int count = MR * NR, padded = (count + 3) / 4 * 4;
  vf acc[padded] = {};  // acc[m * NR + n]
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    vf xv[MR];
    for (int m = 0; m < MR; ++m) xv[m] = load(x + m * ldx + k);
    for (int n = 0; n < NR; ++n) {
      const vf wv = load(w + n * K + k);
      for (int m = 0; m < MR; ++m) acc[m * NR + n] += xv[m] * wv;
    }
    // w two tiles on, so that its memory reads overlap these FMAs where they are many (M = 8: 24%
    // faster on one core); past w's end it is a no-op (a prefetch does not fault)
    if constexpr (MR >= 4) __builtin_prefetch(w + 2 * NR * K + k, 0, 0);
  }
  float sums[padded];
  for (int i = 0; i < padded; i += 4) sum4(acc + i, sums + i);
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) {
      float s = sums[m * NR + n];
      for (int64_t j = k; j < K; ++j) s += x[m * ldx + j] * w[n * K + j];
      y[m * ldy + n] = s;
    }
}

using TileFn = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t);

template <int MR, int... NR>
constexpr std::array<TileFn, sizeof...(NR)> tile_row() {
  return {tile<MR, NR>...};
}

// The tile for m <= kMaxTileRows rows of x and n <= kMaxTileCols rows of w.
TileFn tile_for(int m, int n) {
  static const std::array<TileFn, kMaxTileCols> table[kMaxTileRows] = {
      tile_row<1, 1, 2, 3, 4>(), tile_row<2, 1, 2, 3, 4>(), tile_row<3, 1, 2, 3, 4>(), tile_row<4, 1, 2, 3, 4>(),
      tile_row<5, 1, 2, 3, 4>(), tile_row<6, 1, 2, 3, 4>(), tile_row<7, 1, 2, 3, 4>(), tile_row<8, 1, 2, 3, 4>()};
  return table[m - 1][n - 1];
}

// The tile shape for M rows of x. A decode step's few rows: all of them against one row of w at a
// time, so that w is read once, front to back (reading 2-4 of its rows side by side streamed 40%
// slower from memory on one core: AMD EPYC Zen 4). Many rows: a square of accumulators, each of
// w's rows read once per block of x's rows.
std::pair<int, int> tile_shape(int64_t M) {
  if (M <= kMaxTileRows) return {(int)M, 1};
  return kRegisters >= 32 ? std::pair{4, 4} : std::pair{2, 4};
}

struct Problem {
  const float* x;
  const float* w;
  float* y;
  int64_t M, N, K;
  int tile_rows, tile_cols;
  int64_t row_block, col_block, col_blocks, items;  // an item: one block of x's rows by one of w's
};

// Work items run row block by row block, so that a thread's consecutive items share x's block.
void item_task(const Problem& p, int64_t item) {
  const int64_t m0 = item / p.col_blocks * p.row_block, n0 = item % p.col_blocks * p.col_block;
  const int64_t m1 = std::min(p.M, m0 + p.row_block), n1 = std::min(p.N, n0 + p.col_block);
  for (int64_t n = n0; n < n1; n += p.tile_cols) {
    const int nr = (int)std::min<int64_t>(p.tile_cols, n1 - n);
    for (int64_t m = m0; m < m1; m += p.tile_rows) {
      const int mr = (int)std::min<int64_t>(p.tile_rows, m1 - m);
      tile_for(mr, nr)(p.x + m * p.K, p.K, p.w + n * p.K, p.K, p.y + m * p.N + n, p.N);
    }
  }
}

// Moves the pages of [begin, end) that lie wholly inside it from onnxruntime's private mapping of
// the engine file into anonymous memory, at the same addresses and with the same bytes, in 2 MB
// pages where the kernel gives them (transparent huge pages). In 4 KB file pages the weight streams
// slower: the hardware prefetcher stops at each page (a one-core pass over SmolLM2's table: 4.1 ms
// from the file mapping, 3.5 ms in huge pages, 4.8-5.7 ms in ordinary 4 KB anonymous pages). In
// place, so that every reader (a tied model's Gather too) reads the one copy: a second copy would
// be the packed Gemm's cost again, and the Gather's faults into the file would map the page cache's
// large folios (~0.7 MB a row read) back beside it. 2 MB at a time: the move never holds more than
// that twice. Returns an error message, or "" (also when it leaves the weight where it is).
std::string move_to_huge_pages(const void* begin, const void* end) {
  constexpr uintptr_t kHuge = 2 << 20;
  const uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
  const uintptr_t first = ((uintptr_t)begin + page - 1) / page * page, last = (uintptr_t)end / page * page;
  if (last - first < kHuge || !in_private_file_mapping(begin, end)) return "";
  for (uintptr_t chunk = first; chunk < last;) {
    const uintptr_t next = std::min(last, (chunk / kHuge + 1) * kHuge), length = next - chunk;
    // a fresh region at the same offset within a 2 MB page as the chunk, filled, then moved over it
    char* base = static_cast<char*>(mmap(nullptr, length + kHuge, PROT_READ | PROT_WRITE,
                                         MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (base == MAP_FAILED) return "";  // nothing moved yet in this chunk: the rest stays in the file
    char* region = base + ((chunk - (uintptr_t)base) % kHuge);
    if (region > base) munmap(base, region - base);
    if (region + length < base + length + kHuge) munmap(region + length, base + length + kHuge - (region + length));
    madvise(region, length, MADV_HUGEPAGE);  // a hint: without transparent huge pages it still works
    std::memcpy(region, reinterpret_cast<const void*>(chunk), length);
    if (mremap(region, length, length, MREMAP_MAYMOVE | MREMAP_FIXED, reinterpret_cast<void*>(chunk)) == MAP_FAILED)
      return "could not move the weight into anonymous memory (mremap: " + std::string(std::strerror(errno)) + ")";
    chunk = next;
  }
  return "";
}

struct LmHead {
  static constexpr const char* name = "LmHead";
  static constexpr size_t inputs = 2, outputs = 1, required_inputs = 2;
  static ONNXTensorElementDataType input_type(size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  static ONNXTensorElementDataType output_type(size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  static OrtStatus* create(const OrtApi* api, const OrtKernelInfo* info, LmHead** out) {
    int is_constant = 0;
    const OrtValue* w = nullptr;
    if (OrtStatus* status = api->KernelInfoGetConstantInput_tensor(info, 1, &is_constant, &w)) {
      api->ReleaseStatus(status);  // w is then read where it is
    } else if (is_constant && w) {
      std::vector<int64_t> dims;
      const float* data = nullptr;
      TRTBUILD_RETURN_IF_ERROR(shape_of(api, w, dims));
      TRTBUILD_RETURN_IF_ERROR(api->GetTensorData(w, reinterpret_cast<const void**>(&data)));
      const std::string error = move_to_huge_pages(data, data + element_count(dims));
      if (!error.empty()) return op_error(api, name, error);
    }
    *out = new LmHead{api};
    return nullptr;
  }
  const OrtApi* api;

  OrtStatus* compute(OrtKernelContext* context) const {
    const OrtValue *x, *w;
    TRTBUILD_RETURN_IF_ERROR(api->KernelContext_GetInput(context, 0, &x));
    TRTBUILD_RETURN_IF_ERROR(api->KernelContext_GetInput(context, 1, &w));
    std::vector<int64_t> xd, wd;
    TRTBUILD_RETURN_IF_ERROR(shape_of(api, x, xd));
    TRTBUILD_RETURN_IF_ERROR(shape_of(api, w, wd));
    if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1])
      return op_error(api, name, "x must be [M, K] and w [N, K] (the same K)");
    Problem p{};
    p.M = xd[0], p.N = wd[0], p.K = xd[1];
    const int64_t y_shape[2] = {p.M, p.N};
    OrtValue* y;
    TRTBUILD_RETURN_IF_ERROR(api->KernelContext_GetOutput(context, 0, y_shape, 2, &y));
    TRTBUILD_RETURN_IF_ERROR(api->GetTensorData(x, reinterpret_cast<const void**>(&p.x)));
    TRTBUILD_RETURN_IF_ERROR(api->GetTensorData(w, reinterpret_cast<const void**>(&p.w)));
    TRTBUILD_RETURN_IF_ERROR(api->GetTensorMutableData(y, reinterpret_cast<void**>(&p.y)));
    if (p.M == 0 || p.N == 0) return nullptr;
    if (p.K == 0) {
      std::fill(p.y, p.y + p.M * p.N, 0.0f);
      return nullptr;
    }
    const int64_t row_bytes = p.K * (int64_t)sizeof(float);
    std::tie(p.tile_rows, p.tile_cols) = tile_shape(p.M);
    p.row_block = std::max<int64_t>(p.tile_rows, kRowBlockBytes / row_bytes / p.tile_rows * p.tile_rows);
    p.col_block = std::max<int64_t>(p.tile_cols, kColBlockBytes / row_bytes / p.tile_cols * p.tile_cols);
    p.col_blocks = (p.N + p.col_block - 1) / p.col_block;
    p.items = (p.M + p.row_block - 1) / p.row_block * p.col_blocks;
    return run_items<Problem, item_task>(api, context, p, p.items);
  }
};

}  // namespace

const OrtCustomOp* lm_head_op() {
  static const OpTable<LmHead> op;
  return &op;
}

}  // namespace trtbuild
