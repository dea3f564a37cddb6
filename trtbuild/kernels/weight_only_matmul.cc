// Weight-only quantized linear layers (TensorRT-LLM's weight_only_quant_matmul and
// weight_only_groupwise_quant_matmul plugins), computed in int8 on the CPU:
//
// trtbuild::WeightOnlyQuantMatMul(x [..., K] float, b [N, blocks, block_size * bits / 8] uint8,
//     scales [N, blocks] float, zero_points uint8 optional) -> y [..., N] float
//   attributes K, N, bits (4 or 8), block_size (a multiple of 16), weights_shared (0 or 1), swiglu (0 or 1)
//
// With swiglu, x is [..., 2K], a gated SiLU MLP's merged fc and gate outputs (fc first), and the op is
// its proj: x' = silu(x[..., :K]) * x[..., K:] is what gets quantized, in the same pass (instead of
// Split, the SiLU and Mul: three nodes and two passes over the row a layer).
//
// The inputs and their layout are onnxruntime's MatMulNBits' (docs/CONTRACTS.md): w[n, k] is the
// k-th value of row n of b (int4: low nibble first), unsigned, with zero point zero_points[n, k /
// block_size] (int4: two to a byte, low nibble first; without the input 2^(bits-1)), and
//   y[m, n] = Σ_b scales[n, b] · sa[m, b] · Σ_{k in block b} (w[n, k] - z[n, b]) · q[m, k]
// where q[m, k] is x quantized to int8 per block of K (sa = max|x| / 127 over the block, rounded
// half to even): what MatMulNBits computes at accuracy_level 4.
//
// Why not MatMulNBits: its kernel (MLAS) multiplies the weights with each row of x anew, so a batch
// of 8 decode rows costs 3-4x one row. Here the weights are repacked once, at load, into panels of
// kPanel outputs with 4 consecutive values of K per output in each 32-bit lane: one instruction
// multiplies kPanel outputs by 4 of K with 4 bytes of x broadcast (VNNI's vpdpbusd, or vpmaddubsw +
// vpmaddwd without it), and weights decoded once serve every row of a tile (up to 8; 4 on AVX2). The file's
// pages of b are then dropped (file_pages.h): memory holds the packed copy only, as with MatMulNBits'
// own prepacking. With weights_shared (a tied int8 embedding table, which a Gather reads too) they
// stay.
//
// On a CPU with AMX (Intel's tile registers; compiled in where -march=native has them and used where
// the OS grants them), tiles of kAmxMinRows rows or more run TDPBSUD instead where blocks are whole
// multiples of 64 values of K: an int8 panel is
// already the B tile's layout (K / 4 rows of kPanel outputs x 4 values), an int4 one is unpacked into
// it, and one instruction multiplies up to 16 rows by 64 values of K for all the panel's outputs. The
// int32 sums are the same, so the outputs are too.

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "file_pages.h"
#include "ort_op.h"

#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AVX512VNNI__)
#define TRTBUILD_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace trtbuild {
namespace {

#if defined(__AVX512F__) && defined(__AVX512BW__)
constexpr int kPanel = 16;  // outputs per panel: int32 lanes of a vector
constexpr int kMaxTileRows = 8;
typedef __m512i vint;
typedef __m512 vflt;
inline vint load_bytes(const void* p) { return _mm512_loadu_si512(p); }
inline vint splat_bytes(uint8_t b) { return _mm512_set1_epi8((char)b); }
inline vint splat32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}
inline vint shift_right4(vint v) { return _mm512_srli_epi16(v, 4); }
inline vint bit_and(vint a, vint b) { return _mm512_and_si512(a, b); }
inline vint add32(vint a, vint b) { return _mm512_add_epi32(a, b); }
inline vflt to_float(vint v) { return _mm512_cvtepi32_ps(v); }
inline vflt load_floats(const float* p) { return _mm512_loadu_ps(p); }
inline void store_floats(float* p, vflt v, int n) {
  if (n == kPanel) _mm512_storeu_ps(p, v);
  else _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1), v);
}
#if defined(__AVX512VNNI__)
#define TRTBUILD_DPBUSD 1
inline vint dpbusd(vint acc, vint w, vint a) { return _mm512_dpbusd_epi32(acc, w, a); }
#endif
inline vint pairs16(vint w, vint a) { return _mm512_maddubs_epi16(w, a); }
inline vint add16(vint a, vint b) { return _mm512_add_epi16(a, b); }
inline vint widen_add(vint acc, vint sums16) { return _mm512_add_epi32(acc, _mm512_madd_epi16(sums16, _mm512_set1_epi16(1))); }
// |w| · (a with w's sign): vpmaddubsw's pairs of u8 x s8 then stay within int16 for s8 weights
inline vint signed_operands(vint w, vint& a) {
  a = _mm512_mask_sub_epi8(a, _mm512_movepi8_mask(w), _mm512_setzero_si512(), a);
  return _mm512_abs_epi8(w);
}
#else
constexpr int kPanel = 8;
constexpr int kMaxTileRows = 4;
typedef __m256i vint;
typedef __m256 vflt;
inline vint load_bytes(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
inline vint splat_bytes(uint8_t b) { return _mm256_set1_epi8((char)b); }
inline vint splat32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}
inline vint shift_right4(vint v) { return _mm256_srli_epi16(v, 4); }
inline vint bit_and(vint a, vint b) { return _mm256_and_si256(a, b); }
inline vint add32(vint a, vint b) { return _mm256_add_epi32(a, b); }
inline vflt to_float(vint v) { return _mm256_cvtepi32_ps(v); }
inline vflt load_floats(const float* p) { return _mm256_loadu_ps(p); }
inline void store_floats(float* p, vflt v, int n) {
  if (n == kPanel) {
    _mm256_storeu_ps(p, v);
  } else {
    float lanes[kPanel];
    _mm256_storeu_ps(lanes, v);
    std::memcpy(p, lanes, n * sizeof(float));
  }
}
#if defined(__AVXVNNI__)
#define TRTBUILD_DPBUSD 1
inline vint dpbusd(vint acc, vint w, vint a) { return _mm256_dpbusd_avx_epi32(acc, w, a); }
#endif
inline vint pairs16(vint w, vint a) { return _mm256_maddubs_epi16(w, a); }
inline vint add16(vint a, vint b) { return _mm256_add_epi16(a, b); }
inline vint widen_add(vint acc, vint sums16) { return _mm256_add_epi32(acc, _mm256_madd_epi16(sums16, _mm256_set1_epi16(1))); }
inline vint signed_operands(vint w, vint& a) {
  a = _mm256_sign_epi8(a, w);
  return _mm256_abs_epi8(w);
}
#endif

// acc + the sums of 4 products of u8 w and s8 a in each 32-bit lane: VNNI's vpdpbusd, or vpmaddubsw's
// int16 pairs widened by vpmaddwd
#if defined(TRTBUILD_DPBUSD)
constexpr bool kDpbusd = true;
inline vint dot4(vint acc, vint w, vint a) { return dpbusd(acc, w, a); }
#else
constexpr bool kDpbusd = false;
inline vint dot4(vint acc, vint w, vint a) { return widen_add(acc, pairs16(w, a)); }
#endif

// int8 weights are stored unsigned where vpdpbusd multiplies them (u8 x s8 in int32); without it,
// vpmaddubsw's int16 pairs would overflow at 255 x 127 x 2, so they are stored signed (w - 128) and
// multiplied as |w| by x with w's sign (at most 128 x 127 x 2).
constexpr bool kSignedInt8 = !kDpbusd;
// Without vpdpbusd, int4 weights' vpmaddubsw pairs (at most 2 x 15 x 127 = 3810) add up in int16 over
// 4 groups of 8 (8 pairs: 30480 < 32767) before one vpmaddwd widens them: 2 instructions per 8 inputs
// and row instead of 6.
constexpr int kInt16Groups = 4;

// The weights a tile reads next are prefetched this far ahead: the hardware's own prefetch left a
// decode step's 8 rows 1.3x and one row 1.25x slower on an Intel Xeon (weights not in cache).
constexpr int kPrefetchBytes = 4096;

// The weights in panels: panel p holds outputs p·kPanel ... p·kPanel + kPanel - 1 (zeros past N).
// int4: 8 values of K per lane in kPanel·4 bytes (lane j's 4 bytes: values k..k+3 in the low
// nibbles, k+4..k+7 in the high ones); int8: 4 values per lane. Scales and zero points (as float,
// less the offset the stored values carry) per panel and block, kPanel floats each.
struct Packed {
  int64_t K = 0, N = 0, bits = 0, block = 0, blocks = 0, k_padded = 0, panels = 0;
  std::vector<uint8_t> weights;  // [panels][k_padded / 4][kPanel][4] bytes (int4: two values a byte)
  std::vector<float> scales, zeros;  // [panels][blocks][kPanel]

  int64_t panel_bytes() const { return k_padded * kPanel * bits / 8; }
};

// The activations of a call, quantized: q[m][k_padded] (zeros past K), per row and block the scale
// and Σq.
struct Quantized {
  std::vector<int8_t> q;
  std::vector<float> scale, sum;
};

// The product rounded to float, then to the nearest integer (half to even), as MLAS quantizes: a
// multiply-add rounding would differ in rare ties, and a value one off moves an output by a step.
inline vi round_to_int(vf product) {
#if defined(__AVX512F__)
  return (vi)_mm512_cvtps_epi32((__m512)product);
#else
  return (vi)_mm256_cvtps_epi32((__m256)product);
#endif
}

// silu(g) * u over K values into out
void swiglu_row(const float* g, const float* u, int64_t K, float* out) {
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    const vf gk = load(g + k);
    store(out + k, gk / (1.0f + vexp(-gk)) * load(u + k));
  }
  for (; k < K; ++k) out[k] = g[k] / (1.0f + std::exp(-g[k])) * u[k];
}

void quantize_rows(const float* x, int64_t rows, const Packed& w, bool swiglu, int8_t* q, float* scale, float* sum) {
  std::vector<float> padded(w.k_padded, 0.0f);
  for (int64_t m = 0; m < rows; ++m) {
    const float* row = x + m * w.K * (swiglu ? 2 : 1);
    if (swiglu) {
      swiglu_row(row, row + w.K, w.K, padded.data());
      row = padded.data();
    } else if (w.k_padded != w.K) {  // the last block is partial: zeros after K
      std::memcpy(padded.data(), row, w.K * sizeof(float));
      row = padded.data();
    }
    for (int64_t b = 0; b < w.blocks; ++b) {
      const float* xb = row + b * w.block;
      vf amax = {};
      for (int64_t k = 0; k < w.block; k += kLanes) {
        const vf v = load(xb + k);
        const vf a = v < 0.0f ? -v : v;
        amax = a > amax ? a : amax;
      }
      const float s = hmax(amax) / 127.0f, inverse = s > 0.0f ? 1.0f / s : 0.0f;
      vi total = {};
      int8_t* qb = q + m * w.k_padded + b * w.block;
      for (int64_t k = 0; k < w.block; k += kLanes) {
        const vi v = round_to_int(load(xb + k) * inverse);
        total += v;
        store_bytes(qb + k, v);
      }
      int32_t t = 0;
      for (int i = 0; i < kLanes; ++i) t += total[i];
      scale[m * w.blocks + b] = s;
      sum[m * w.blocks + b] = (float)t;
    }
  }
}

// y[m][n] for MR rows of q (from row m0) and the outputs of panel p (n columns written), BITS-bit
// weights.
template <int BITS, int MR>
void tile(const Packed& w, int64_t p, const Quantized& a, int64_t m0, float* y, int64_t ldy, int n) {
  const uint8_t* wp = w.weights.data() + p * w.panel_bytes();
  const float* sp = w.scales.data() + p * w.blocks * kPanel;
  const float* zp = w.zeros.data() + p * w.blocks * kPanel;
  const int8_t* q[MR];
  for (int m = 0; m < MR; ++m) q[m] = a.q.data() + (m0 + m) * w.k_padded;
  constexpr int kGroupBytes = kPanel * BITS;  // the panel's bytes for 8 values of K
  const vint low = splat_bytes(0x0F);
  vflt out[MR];
  for (int m = 0; m < MR; ++m) out[m] = vflt{};
  // Few rows: the two halves of each group of 8 accumulate apart, so that each chain of dependent
  // multiply-adds is half as long (one row with one chain ran at its latency, not its throughput).
  constexpr int kChains = MR * 2 <= kMaxTileRows ? 2 : 1;
  for (int64_t b = 0, k = 0; b < w.blocks; ++b) {
    vint acc[kChains][MR];
    for (int c = 0; c < kChains; ++c)
      for (int m = 0; m < MR; ++m) acc[c][m] = vint{};
    vint acc16[MR];
    for (int m = 0; m < MR; ++m) acc16[m] = vint{};
    int pending = 0;  // groups in acc16
    for (const int64_t end = k + w.block; k < end; k += 8) {
      vint w0, w1;
      for (int line = 0; line < kGroupBytes; line += 64) _mm_prefetch((const char*)wp + kPrefetchBytes + line, _MM_HINT_T0);
      if constexpr (BITS == 4) {
        const vint raw = load_bytes(wp);
        w0 = bit_and(raw, low);
        w1 = bit_and(shift_right4(raw), low);
        wp += kPanel * 4;
      } else {
        w0 = load_bytes(wp);
        w1 = load_bytes(wp + kPanel * 4);
        wp += kPanel * 8;
      }
      if constexpr (BITS == 4 && !kDpbusd) {
        for (int m = 0; m < MR; ++m)
          acc16[m] = add16(acc16[m], add16(pairs16(w0, splat32(q[m] + k)), pairs16(w1, splat32(q[m] + k + 4))));
        if (++pending == kInt16Groups || k + 8 == end) {
          for (int m = 0; m < MR; ++m) {
            acc[0][m] = widen_add(acc[0][m], acc16[m]);
            acc16[m] = vint{};
          }
          pending = 0;
        }
        continue;
      }
      for (int m = 0; m < MR; ++m) {
        vint a0 = splat32(q[m] + k), a1 = splat32(q[m] + k + 4), u0 = w0, u1 = w1;
        if constexpr (BITS == 8 && kSignedInt8) {
          u0 = signed_operands(w0, a0);
          u1 = signed_operands(w1, a1);
        }
        acc[0][m] = dot4(acc[0][m], u0, a0);
        acc[kChains - 1][m] = dot4(acc[kChains - 1][m], u1, a1);
      }
    }
    const vflt scale = load_floats(sp + b * kPanel), zero = load_floats(zp + b * kPanel);
    for (int m = 0; m < MR; ++m) {
      const int64_t i = (m0 + m) * w.blocks + b;
      vint total = acc[0][m];
      if constexpr (kChains == 2) total = add32(total, acc[1][m]);
      out[m] += (to_float(total) - zero * a.sum[i]) * (scale * a.scale[i]);
    }
  }
  for (int m = 0; m < MR; ++m) store_floats(y + (m0 + m) * ldy, out[m], n);
}

using TileFn = void (*)(const Packed&, int64_t, const Quantized&, int64_t, float*, int64_t, int);

template <int BITS>
TileFn tile_for(int rows) {
  static const TileFn table[8] = {tile<BITS, 1>, tile<BITS, 2>, tile<BITS, 3>, tile<BITS, 4>,
                                  tile<BITS, 5>, tile<BITS, 6>, tile<BITS, 7>, tile<BITS, 8>};
  return table[std::min(rows, kMaxTileRows) - 1];
}

#if defined(TRTBUILD_AMX)
constexpr int kAmxRows = 16;     // rows of an A tile at most
constexpr int kTileBytes = 64;   // a tile row: the values of K one TDPBSUD multiplies
// Fewer rows, or blocks of K that are not whole tile rows (32, 16: a multiply, a store and the
// scaling per block), and the vector tiles were as fast or faster (Intel Xeon, AMX: 4 rows 0.7x,
// 8 rows 1.2x, 16 1.35x, 512 1.5x at block 128; block 32 level at every row count).
constexpr int kAmxMinRows = 8;
constexpr int kAmxChunk = 512;   // values of K whose weights are unpacked, then multiplied, at once
constexpr int64_t kAmxBatches = 8;  // batches of a call's work items: each loads the tiles' configuration
static_assert(kPanel * 4 == kTileBytes, "a panel's group of 4 values of K is one B tile row");

// Tile registers: a full tile of kAmxRows rows of q in tmm0 (A, rows x 64 bytes) with its sums in
// tmm1 and tmm2 (C, rows x kPanel int32, for even and odd blocks: consecutive blocks' multiplies do
// not wait for each other); a call's last, shorter tile in tmm3, tmm4, tmm5; the weights (B, 16
// rows of kPanel x 4 bytes) alternately in tmm6 and tmm7.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// ldtilecfg / sttilecfg on the whole 64 bytes: GCC 12's _tile_loadconfig and _tile_storeconfig tell
// the compiler they read or write 8 of them, which lets it drop or reorder the others' stores.
inline void load_tile_config(const TileConfig& config) { asm volatile("ldtilecfg %0" : : "m"(config)); }
inline void store_tile_config(TileConfig& config) { asm volatile("sttilecfg %0" : "=m"(config)); }

// The OS must grant a process the tiles' state before it may use them (Linux >= 5.16).
bool amx_granted() {
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  static const bool granted = syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  return granted;
}

// The tile configuration for a call of last_rows (1..16) rows in its last tile.
TileConfig tile_config(int last_rows) {
  TileConfig config;
  const int rows[8] = {kAmxRows, kAmxRows, kAmxRows, last_rows, last_rows, last_rows, 16, 16};
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = (uint8_t)rows[t];
    config.colsb[t] = kTileBytes;
  }
  return config;
}

// A thread's tile configuration while it runs a batch of a call's work items, and the one it had
// back after them: other code on the thread pool's threads keeps its own in the registers between
// its calls (MLAS's AMX GEMMs load theirs once per thread), and would run on ours. Loading one costs
// ~50 ns, reading one back 5: neither is done per item.
class TileScope {
 public:
  template <class Problem>
  explicit TileScope(const Problem& c) {
    if (!c.amx) return;
    store_tile_config(saved_);  // all zeros where none is loaded
    const TileConfig want = tile_config((int)((c.M - 1) % kAmxRows) + 1);
    changed_ = std::memcmp(&saved_, &want, sizeof want) != 0;
    if (changed_) load_tile_config(want);
  }
  ~TileScope() {
    if (!changed_) return;
    if (saved_.palette == 0) _tile_release();
    else load_tile_config(saved_);
  }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;

 private:
  bool changed_ = false;
  TileConfig saved_;
};

// The int32 sums of blocks [b0, b1) for rows of q (tile rows at q, a row every k_padded bytes) and
// the B tile rows at weights (64 bytes each), into sums[block - b0][row][kPanel]. The intrinsics name
// their tile register in an asm string: LAST (the call's last tile) picks the registers by hand.
template <bool LAST>
void amx_sums(const int8_t* q, int64_t k_padded, const uint8_t* weights, int64_t block, int64_t b0, int64_t b1,
              int32_t* sums, int rows) {
  int64_t k = b0 * block;
  int step = 0;  // multiplies so far: which B register is next
  for (int64_t b = b0; b < b1; ++b) {
    const bool odd = (b - b0) % 2;
    if constexpr (LAST) { if (odd) _tile_zero(5); else _tile_zero(4); }
    else { if (odd) _tile_zero(2); else _tile_zero(1); }
    for (const int64_t end = k + block; k < end; k += kTileBytes, weights += 16 * kTileBytes, ++step) {
      if (step % 2) _tile_loadd(7, weights, kTileBytes); else _tile_loadd(6, weights, kTileBytes);
      if constexpr (LAST) {
        _tile_loadd(3, q + k, k_padded);
        if (odd) { if (step % 2) _tile_dpbsud(5, 3, 7); else _tile_dpbsud(5, 3, 6); }
        else { if (step % 2) _tile_dpbsud(4, 3, 7); else _tile_dpbsud(4, 3, 6); }
      } else {
        _tile_loadd(0, q + k, k_padded);
        if (odd) { if (step % 2) _tile_dpbsud(2, 0, 7); else _tile_dpbsud(2, 0, 6); }
        else { if (step % 2) _tile_dpbsud(1, 0, 7); else _tile_dpbsud(1, 0, 6); }
      }
    }
    int32_t* out = sums + (b - b0) * rows * kPanel;
    if constexpr (LAST) { if (odd) _tile_stored(5, out, kTileBytes); else _tile_stored(4, out, kTileBytes); }
    else { if (odd) _tile_stored(2, out, kTileBytes); else _tile_stored(1, out, kTileBytes); }
  }
}

// y[m][n] for the rows m0 .. m0 + rows - 1 and the outputs of panel p, as tile<BITS, rows> computes
// them: per chunk of kAmxChunk values of K, an int4 panel's weights are unpacked into B tile rows
// (group g's low nibbles are row 2g, values 8g..8g+3; its high ones row 2g + 1), the chunk's
// blocks multiplied, then scaled; an int8 panel is B tile rows as it is.
template <int BITS, bool LAST>
void amx_tile(const Packed& w, int64_t p, const Quantized& a, int64_t m0, int rows, float* y, int64_t ldy, int n) {
  const int64_t chunk_blocks = std::max<int64_t>(1, kAmxChunk / w.block);
  const uint8_t* wp = w.weights.data() + p * w.panel_bytes();
  const float* sp = w.scales.data() + p * w.blocks * kPanel;
  const float* zp = w.zeros.data() + p * w.blocks * kPanel;
  const int8_t* q = a.q.data() + m0 * w.k_padded;
  alignas(64) uint8_t unpacked[kAmxChunk / 4 * kTileBytes];
  alignas(64) int32_t sums[kAmxChunk / kTileBytes * kAmxRows * kPanel];
  const vint low = splat_bytes(0x0F);
  vflt out[kAmxRows];
  for (int m = 0; m < rows; ++m) out[m] = vflt{};
  for (int64_t b0 = 0; b0 < w.blocks; b0 += chunk_blocks) {
    const int64_t b1 = std::min(w.blocks, b0 + chunk_blocks), values = (b1 - b0) * w.block;
    const uint8_t* weights = wp + b0 * w.block * kPanel * BITS / 8;
    if constexpr (BITS == 4) {
      for (int64_t g = 0; g < values / 8; ++g) {
        const uint8_t* raw_at = weights + g * kTileBytes;
        _mm_prefetch((const char*)raw_at + kPrefetchBytes, _MM_HINT_T0);
        const vint raw = load_bytes(raw_at);
        _mm512_store_si512(unpacked + 2 * g * kTileBytes, bit_and(raw, low));
        _mm512_store_si512(unpacked + (2 * g + 1) * kTileBytes, bit_and(shift_right4(raw), low));
      }
      weights = unpacked;
    } else {
      for (int64_t line = 0; line < values * kPanel; line += 64) _mm_prefetch((const char*)weights + kPrefetchBytes + line, _MM_HINT_T0);
    }
    amx_sums<LAST>(q, w.k_padded, weights, w.block, b0, b1, sums, rows);
    for (int64_t b = b0; b < b1; ++b) {
      const vflt scale = load_floats(sp + b * kPanel), zero = load_floats(zp + b * kPanel);
      const int32_t* block_sums = sums + (b - b0) * rows * kPanel;
      for (int m = 0; m < rows; ++m) {
        const int64_t i = (m0 + m) * w.blocks + b;
        out[m] += (to_float(load_bytes(block_sums + m * kPanel)) - zero * a.sum[i]) * (scale * a.scale[i]);
      }
    }
  }
  for (int m = 0; m < rows; ++m) store_floats(y + (m0 + m) * ldy, out[m], n);
}
#endif

constexpr int64_t kRowBlockBytes = 256 << 10;  // quantized rows a work item keeps in cache
constexpr int64_t kQuantizeWork = 1 << 15;     // elements a quantizing task handles at least

struct Call {
  const Packed* w;
  bool swiglu;
  const float* x;
  float* y;
  int64_t M, row_block, rows_per_task;
  bool amx;  // tiles of kAmxMinRows rows or more run on AMX
  Quantized a;
};

void quantize_task(void* data, size_t t) {
  Call& c = *static_cast<Call*>(data);
  const int64_t m0 = (int64_t)t * c.rows_per_task, rows = std::min(c.M - m0, c.rows_per_task);
  quantize_rows(c.x + m0 * c.w->K * (c.swiglu ? 2 : 1), rows, *c.w, c.swiglu, c.a.q.data() + m0 * c.w->k_padded, c.a.scale.data() + m0 * c.w->blocks,
                c.a.sum.data() + m0 * c.w->blocks);
}

// Work items run row block by row block (a thread's consecutive items share its quantized rows),
// each item one panel of outputs over one block of rows.
void item_task(const Call& c, int64_t item) {
  const Packed& w = *c.w;
  const int64_t p = item % w.panels, m0 = item / w.panels * c.row_block;
  const int64_t m1 = std::min(c.M, m0 + c.row_block);
  const int n = (int)std::min<int64_t>(kPanel, w.N - p * kPanel);
  int64_t m = m0;
#if defined(TRTBUILD_AMX)
  if (c.amx) {  // row blocks are whole tiles of kAmxRows but the call's last: one shape of last tile
    for (; m1 - m >= kAmxMinRows; m += kAmxRows) {
      const int rows = (int)std::min<int64_t>(kAmxRows, m1 - m);
      if (rows == kAmxRows)
        (w.bits == 4 ? amx_tile<4, false> : amx_tile<8, false>)(w, p, c.a, m, rows, c.y + p * kPanel, w.N, n);
      else
        (w.bits == 4 ? amx_tile<4, true> : amx_tile<8, true>)(w, p, c.a, m, rows, c.y + p * kPanel, w.N, n);
    }
  }
#endif
  for (; m < m1; m += kMaxTileRows) {
    const int rows = (int)std::min<int64_t>(kMaxTileRows, m1 - m);
    (w.bits == 4 ? tile_for<4>(rows) : tile_for<8>(rows))(w, p, c.a, m, c.y + p * kPanel, w.N, n);
  }
}

// The zero point of (n, block) in MatMulNBits' zero_points.
inline int zero_value(const uint8_t* z, int64_t bits, int64_t blocks, int64_t n, int64_t block) {
  if (!z) return 1 << (bits - 1);
  if (bits == 8) return z[n * blocks + block];
  return (z[n * ((blocks + 1) / 2) + block / 2] >> (4 * (block % 2))) & 0x0F;
}

// Row n of b (MatMulNBits' layout: k_padded values, int4 two a byte, low nibble first) into lane j of
// its panel (dst: the panel's first byte).
void pack_row(const uint8_t* row, const Packed& w, int j, int64_t offset, uint8_t* dst) {
  if (w.bits == 4) {  // group g's 4 source bytes hold k = 8g..8g+7; lane j's byte i gets 8g+i and 8g+4+i
    for (int64_t g = 0; g < w.k_padded / 8; ++g) {
      const uint8_t* r = row + 4 * g;
      uint8_t* d = dst + (g * kPanel + j) * 4;
      d[0] = (uint8_t)((r[0] & 0x0F) | (r[2] << 4));
      d[1] = (uint8_t)((r[0] >> 4) | (r[2] & 0xF0));
      d[2] = (uint8_t)((r[1] & 0x0F) | (r[3] << 4));
      d[3] = (uint8_t)((r[1] >> 4) | (r[3] & 0xF0));
    }
  } else {
    for (int64_t q = 0; q < w.k_padded / 4; ++q)
      for (int i = 0; i < 4; ++i) dst[(q * kPanel + j) * 4 + i] = (uint8_t)(row[4 * q + i] - offset);
  }
}

void pack(const uint8_t* b, const float* scales, const uint8_t* z, Packed& w) {
  const int64_t offset = w.bits == 8 && kSignedInt8 ? 128 : 0;  // what the stored values carry
  w.weights.assign(w.panels * w.panel_bytes(), 0);
  w.scales.assign(w.panels * w.blocks * kPanel, 0.0f);
  w.zeros.assign(w.panels * w.blocks * kPanel, 0.0f);
  const int64_t row_bytes = w.k_padded * w.bits / 8;
  for (int64_t p = 0; p < w.panels; ++p) {
    for (int j = 0; j < kPanel && p * kPanel + j < w.N; ++j) {
      const int64_t n = p * kPanel + j;
      pack_row(b + n * row_bytes, w, j, offset, w.weights.data() + p * w.panel_bytes());
      for (int64_t blk = 0; blk < w.blocks; ++blk) {
        w.scales[(p * w.blocks + blk) * kPanel + j] = scales[n * w.blocks + blk];
        w.zeros[(p * w.blocks + blk) * kPanel + j] = (float)(zero_value(z, w.bits, w.blocks, n, blk) - offset);
      }
    }
  }
}

struct WeightOnlyQuantMatMul {
  static constexpr const char* name = "WeightOnlyQuantMatMul";
  static constexpr size_t inputs = 4, outputs = 1, required_inputs = 3;
  static ONNXTensorElementDataType input_type(size_t i) {
    return i == 1 || i == 3 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  static ONNXTensorElementDataType output_type(size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }

  static OrtStatus* attribute(const OrtApi* api, const OrtKernelInfo* info, const char* key, int64_t& value,
                              bool required = true) {
    if (OrtStatus* s = api->KernelInfoGetAttribute_int64(info, key, &value)) {
      api->ReleaseStatus(s);
      if (required) return op_error(api, name, std::string("attribute ") + key + " is missing");
    }
    return nullptr;
  }

  // input i as a constant (an initializer), its data and element count; nullptr data when absent
  static OrtStatus* constant(const OrtApi* api, const OrtKernelInfo* info, size_t i, const char* what,
                             const void** data, int64_t* count, bool optional = false) {
    *data = nullptr;
    *count = 0;
    size_t inputs = 0;
    TRTBUILD_RETURN_IF_ERROR(api->KernelInfo_GetInputCount(info, &inputs));
    if (optional && i >= inputs) return nullptr;  // not given
    int is_constant = 0;
    const OrtValue* v = nullptr;
    if (OrtStatus* s = api->KernelInfoGetConstantInput_tensor(info, i, &is_constant, &v)) {
      api->ReleaseStatus(s);
      is_constant = 0;
    }
    if (!is_constant || !v)
      return op_error(api, name, std::string(what) + " must be an initializer (the weights are packed at load)");
    std::vector<int64_t> dims;
    TRTBUILD_RETURN_IF_ERROR(shape_of(api, v, dims));
    *count = element_count(dims);
    return api->GetTensorData(v, data);
  }

  static OrtStatus* create(const OrtApi* api, const OrtKernelInfo* info, WeightOnlyQuantMatMul** out) {
    auto w = std::make_unique<Packed>();
    int64_t shared = 0, swiglu = 0;
    TRTBUILD_RETURN_IF_ERROR(attribute(api, info, "K", w->K));
    TRTBUILD_RETURN_IF_ERROR(attribute(api, info, "N", w->N));
    TRTBUILD_RETURN_IF_ERROR(attribute(api, info, "bits", w->bits));
    TRTBUILD_RETURN_IF_ERROR(attribute(api, info, "block_size", w->block));
    TRTBUILD_RETURN_IF_ERROR(attribute(api, info, "weights_shared", shared, false));
    TRTBUILD_RETURN_IF_ERROR(attribute(api, info, "swiglu", swiglu, false));
    if (w->bits != 4 && w->bits != 8) return op_error(api, name, "bits must be 4 or 8, not " + std::to_string(w->bits));
    if (w->block <= 0 || w->block % 16 != 0)
      return op_error(api, name, "block_size must be a multiple of 16, not " + std::to_string(w->block));
    if (w->K <= 0 || w->N <= 0) return op_error(api, name, "K and N must be positive");
    w->blocks = (w->K + w->block - 1) / w->block;
    w->k_padded = w->blocks * w->block;
    w->panels = (w->N + kPanel - 1) / kPanel;
    const void *b, *scales, *z;
    int64_t b_count, scale_count, z_count;
    TRTBUILD_RETURN_IF_ERROR(constant(api, info, 1, "b", &b, &b_count));
    TRTBUILD_RETURN_IF_ERROR(constant(api, info, 2, "scales", &scales, &scale_count));
    TRTBUILD_RETURN_IF_ERROR(constant(api, info, 3, "zero_points", &z, &z_count, true));
    const std::string shape = " (N " + std::to_string(w->N) + ", K " + std::to_string(w->K) + ", bits " +
                              std::to_string(w->bits) + ", block_size " + std::to_string(w->block) + ")";
    if (b_count != w->N * w->k_padded * w->bits / 8)
      return op_error(api, name, "b has " + std::to_string(b_count) + " bytes, not N x blocks x block_size x bits / 8" + shape);
    if (scale_count != w->N * w->blocks) return op_error(api, name, "scales must be [N, blocks]" + shape);
    const int64_t z_want = w->N * (w->bits == 4 ? (w->blocks + 1) / 2 : w->blocks);
    if (z && z_count != z_want) return op_error(api, name, "zero_points must have " + std::to_string(z_want) + " bytes" + shape);
    pack(static_cast<const uint8_t*>(b), static_cast<const float*>(scales), static_cast<const uint8_t*>(z), *w);
    if (!shared) {  // none of them is read again
      drop_file_pages(b, static_cast<const uint8_t*>(b) + b_count);
      drop_file_pages(scales, static_cast<const float*>(scales) + scale_count);
      if (z) drop_file_pages(z, static_cast<const uint8_t*>(z) + z_count);
    }
    bool amx = false;
#if defined(TRTBUILD_AMX)
    amx = amx_granted();
#endif
    *out = new WeightOnlyQuantMatMul{api, std::move(w), swiglu != 0, amx};
    return nullptr;
  }

  const OrtApi* api;
  std::unique_ptr<Packed> w;
  bool swiglu;
  bool amx;  // AMX compiled in and granted by the OS

  OrtStatus* compute(OrtKernelContext* context) const {
    const OrtValue* x;
    TRTBUILD_RETURN_IF_ERROR(api->KernelContext_GetInput(context, 0, &x));
    std::vector<int64_t> dims;
    TRTBUILD_RETURN_IF_ERROR(shape_of(api, x, dims));
    const int64_t row = w->K * (swiglu ? 2 : 1);
    if (dims.empty() || dims.back() != row)
      return op_error(api, name, std::string("x must be [..., ") + (swiglu ? "2K" : "K") + "] with K = " + std::to_string(w->K));
    std::vector<int64_t> y_dims = dims;
    y_dims.back() = w->N;
    OrtValue* y;
    TRTBUILD_RETURN_IF_ERROR(api->KernelContext_GetOutput(context, 0, y_dims.data(), y_dims.size(), &y));
    Call c{};
    c.w = w.get();
    c.swiglu = swiglu;
    c.M = element_count(dims) / row;
    TRTBUILD_RETURN_IF_ERROR(api->GetTensorData(x, reinterpret_cast<const void**>(&c.x)));
    TRTBUILD_RETURN_IF_ERROR(api->GetTensorMutableData(y, reinterpret_cast<void**>(&c.y)));
    if (c.M == 0) return nullptr;
    c.a.q.resize(c.M * w->k_padded);
    c.a.scale.resize(c.M * w->blocks);
    c.a.sum.resize(c.M * w->blocks);
    // a SiLU-gated row costs ~4x a plain one (an exponential a value): 8 decode rows of a proj split
    // over the threads instead of one thread quantizing while the other waits (a chain of 30
    // SmolLM2 MLPs at 8 rows 1.06x, 6 of 6 interleaved pairs; 1 and 64+ rows level)
    c.rows_per_task = std::max<int64_t>(1, kQuantizeWork / (row * (swiglu ? 4 : 1)));
    const size_t quantize_tasks = (size_t)((c.M + c.rows_per_task - 1) / c.rows_per_task);
    TRTBUILD_RETURN_IF_ERROR(run_tasks(api, context, quantize_task, quantize_tasks, &c));
    int64_t tile_rows = kMaxTileRows;
#if defined(TRTBUILD_AMX)
    c.amx = amx && c.M >= kAmxMinRows && w->block % kTileBytes == 0 && w->block <= kAmxChunk;
    if (c.amx) tile_rows = kAmxRows;
#endif
    c.row_block = std::max<int64_t>(tile_rows, kRowBlockBytes / w->k_padded / tile_rows * tile_rows);
    const int64_t items = (c.M + c.row_block - 1) / c.row_block * w->panels;
#if defined(TRTBUILD_AMX)
    if (c.amx) return run_items<Call, item_task, TileScope>(api, context, c, items, kAmxBatches);
#endif
    return run_items<Call, item_task>(api, context, c, items);
  }
};

}  // namespace

const OrtCustomOp* weight_only_quant_matmul_op() {
  static const OpTable<WeightOnlyQuantMatMul> op;
  return &op;
}

}  // namespace trtbuild
