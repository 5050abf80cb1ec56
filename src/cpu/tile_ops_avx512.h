// Tile GEMMs on bf16 pairs with the AVX512_BF16 dot product (vdpbf16ps: per fp32 lane,
// acc += a0 b0 + a1 b1 over a pair of bf16, products exact, sums in fp32), for bf16 inputs on
// CPUs that have it (src/cpu/tile_ops_avx512.cc; chosen at run time, DESIGN.md: Highway 1.0.3 has
// no bf16 dot op), with the AVX-512 pieces around them (the bf16 softmax step, tile packing).
//
// Layouts, in bf16 elements (uint16_t):
//   A: rows of the left operand, element (r, k) at A[r * lda + k]; k padded to an even count
//      with zeros (the pair (2p, 2p + 1) is read as one 32-bit broadcast).
//   B: the right operand as k pairs, element (k, c) at B[(k / 2) * 2 * ncols + 2 c + (k & 1)]
//      (one 64-byte vector holds 16 columns of one pair).
#pragma once
#include <cstddef>
#include <cstdint>

namespace attnkit::cpu {

// True when this CPU runs the bf16 dot kernels and they are enabled: the environment variable
// ATTNKIT_CPU_BF16_DOT=0 turns them off (A/B timing); set_bf16_dot(false) too (tests).
bool bf16_dot_enabled();
void set_bf16_dot(bool on);
bool bf16_dot_supported();

// C[rows x ncols] (fp32, row stride ldc) = mul ((alpha[r] C or 0) + A B) over kpairs pairs of k
// (mul scales what C held too); ncols a multiple of 16. alpha may be null (1); load_c false
// writes C without reading it.
void gemm_bf16(const uint16_t* A, size_t lda, const uint16_t* B, size_t kpairs, float* C,
               size_t ldc, size_t rows, size_t ncols, const float* alpha, bool load_c, float mul);

// dst[r * ld_dst + c] = bf16(src[r * ld_src + c]) (round to nearest even) for c < cols, cols a
// multiple of 32.
void to_bf16_rows(const float* src, size_t ld_src, uint16_t* dst, size_t ld_dst, size_t rows,
                  size_t cols);

// AVX-512 F, BW and VL (the transposes below; the bf16 kernels need BF16 too).
bool avx512_supported();

// The B operands of a key tile. K^T in 32-bit words: out[w * 64 + x] = word w of row x, for the
// 64 rows of the tile's keys and w < ceil(bytes / 4) (null: a key past the tile, zeros; a row's
// last word is zero-filled past `bytes`): for bf16 K, head-dim pairs (k_x[2w], k_x[2w + 1]); for
// fp32 K, K^T itself. V as key pairs: out[e] = (r0[e], r1[e]) for e < dv_pad (zeros past dv; a
// null row gives zeros); dv_pad a multiple of 16.
void transpose_rows_to_words(const void* const* rows, int64_t bytes, uint32_t* out);
void pack_v_pairs_bf16(const uint16_t* r0, const uint16_t* r1, int64_t dv, int64_t dv_pad,
                       uint32_t* out);
// 16-bit rows from the word layout above: out row 2w = the low halves of words[w * 64 ..
// w * 64 + 63], row 2w + 1 the high halves, for w < wrows (a bf16 tile transposed: [2 wrows][64]).
void split_word_halves(const uint32_t* words, int64_t wrows, uint16_t* out);

// The running state of a tile's query rows (online softmax), each array indexed by row.
struct SoftmaxRows {
  float* m;      // running max of the scores (-inf: none allowed yet; the sink's logit)
  float* l;      // sum of exp(s - m), exact (LSE = m + log l)
  float* lp;     // the same sum of the weights rounded to bf16, as P V uses them (O divides by it)
  float* alpha;  // out: exp(m_old - m_new), the rescale of O and of both sums
  float* rmax;   // running max of the scores, unscaled by any sink
};

// The allowed keys of a tile's rows: bit x of row_bits[r] (a partial tile), or of `keys` for
// every row (a full tile: the tile's keys).
struct TileMask {
  const uint64_t* row_bits;
  uint64_t keys;
};

// The online-softmax step of one tile for P V in bf16, 16 rows at a time on vectors (no
// per-row horizontal chains): S [rows][64] scaled scores, masked here (-inf where `mask` says
// no; S keeps its values); P [rows][64] gets bf16(exp(s - m_new)); the state moves to m_new.
// Rows whose scores are all -inf so far give P = 0 and alpha = 1.
void softmax_step_bf16(const float* S, size_t rows, SoftmaxRows st, TileMask mask, uint16_t* P);

}  // namespace attnkit::cpu
