// bf16 tile GEMMs with vdpbf16ps (layouts in tile_ops_avx512.h). Register block: 6 rows x 4 vectors
// (64 columns) of fp32 accumulators, 24 of the 32 zmm registers; per k pair, 4 vector loads of
// B and 6 32-bit broadcasts of A feed 24 dot products (48 multiply-adds per lane). This file
// alone is compiled for AVX-512 (F, BW, VL) + BF16 (a target pragma after the includes, so no
// inline function of a header is emitted with those instructions); callers reach the bf16
// kernels only when bf16_dot_enabled(), the transposes when avx512_supported().
#include "cpu/tile_ops_avx512.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define ATTNKIT_HAVE_BF16_DOT 1
#endif

namespace attnkit::cpu {

bool bf16_dot_supported() {
#if defined(ATTNKIT_HAVE_BF16_DOT)
  static const bool ok = avx512_supported() && __builtin_cpu_supports("avx512bf16");
  return ok;
#else
  return false;
#endif
}

bool avx512_supported() {
#if defined(ATTNKIT_HAVE_BF16_DOT)
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl");
  return ok;
#else
  return false;
#endif
}

namespace {
std::atomic<int> g_bf16_dot{-1};  // -1: not decided yet
}  // namespace

bool bf16_dot_enabled() {
  int on = g_bf16_dot.load(std::memory_order_relaxed);
  if (on < 0) {
    const char* env = std::getenv("ATTNKIT_CPU_BF16_DOT");
    on = bf16_dot_supported() && !(env && std::strcmp(env, "0") == 0);
    g_bf16_dot.store(on, std::memory_order_relaxed);
  }
  return on != 0;
}

void set_bf16_dot(bool on) { g_bf16_dot.store(on && bf16_dot_supported()); }

#if defined(ATTNKIT_HAVE_BF16_DOT)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16")
// GCC 12 warns inside its own intrinsics (their _mm512_undefined_ps() pass-through operand).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
namespace {

constexpr int kRows = 6;

// One block of R rows x NV vectors (16 columns each) of C over every k pair.
template <int R, int NV>
inline void block(const uint16_t* A, size_t lda, const uint16_t* B, size_t ldb, size_t kpairs,
                  float* C, size_t ldc, const float* alpha, bool load_c, float mul) {
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r) {
    const __m512 a = _mm512_set1_ps(alpha ? alpha[r] : 1.f);
    for (int v = 0; v < NV; ++v) {
      acc[r][v] = load_c ? _mm512_loadu_ps(C + r * ldc + 16 * v) : _mm512_setzero_ps();
      if (load_c && alpha) acc[r][v] = _mm512_mul_ps(acc[r][v], a);
    }
  }
  for (size_t p = 0; p < kpairs; ++p, B += ldb) {
    __m512bh b[NV];
    for (int v = 0; v < NV; ++v) b[v] = (__m512bh)_mm512_loadu_si512(B + 32 * v);
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, A + r * lda + 2 * p, 4);
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], a, b[v]);
    }
  }
  const __m512 m = _mm512_set1_ps(mul);
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v)
      _mm512_storeu_ps(C + r * ldc + 16 * v, mul == 1.f ? acc[r][v] : _mm512_mul_ps(acc[r][v], m));
}

// f(std::integral_constant<int, n>) for a run-time n in [1, kMax]; nothing for n = 0.
template <int kMax, class F>
inline void with_count(size_t n, F&& f) {
  if constexpr (kMax >= 1) {
    if (n == kMax) return f(std::integral_constant<int, kMax>{});
    with_count<kMax - 1>(n, f);
  }
}

// Every row of one column strip of NV vectors.
template <int NV>
void strip(const uint16_t* A, size_t lda, const uint16_t* B, size_t ldb, size_t kpairs, float* C,
           size_t ldc, size_t rows, const float* alpha, bool load_c, float mul) {
  size_t r = 0;
  for (; r + kRows <= rows; r += kRows)
    block<kRows, NV>(A + r * lda, lda, B, ldb, kpairs, C + r * ldc, ldc,
                     alpha ? alpha + r : nullptr, load_c, mul);
  with_count<kRows - 1>(rows - r, [&](auto R) {
    block<R.value, NV>(A + r * lda, lda, B, ldb, kpairs, C + r * ldc, ldc,
                       alpha ? alpha + r : nullptr, load_c, mul);
  });
}

}  // namespace

void gemm_bf16(const uint16_t* A, size_t lda, const uint16_t* B, size_t kpairs, float* C,
               size_t ldc, size_t rows, size_t ncols, const float* alpha, bool load_c, float mul) {
  const size_t ldb = 2 * ncols;  // bf16 elements per k pair
  size_t c0 = 0;
  for (; c0 + 64 <= ncols; c0 += 64)
    strip<4>(A, lda, B + 2 * c0, ldb, kpairs, C + c0, ldc, rows, alpha, load_c, mul);
  with_count<3>((ncols - c0) / 16, [&](auto NV) {
    strip<NV.value>(A, lda, B + 2 * c0, ldb, kpairs, C + c0, ldc, rows, alpha, load_c, mul);
  });
}

namespace {

// Horizontal reductions of 16 vectors at once: lane L of the result is op over the lanes of
// v[kSlot[L]], in 15 steps of two shuffles and one op (against 16 x 4 for one at a time).
// Halves, then 128-bit quarters, then pairs, then lanes are combined; kSlot is where the tree
// leaves row L.
constexpr int kSlot[16] = {0, 8, 4, 12, 1, 9, 5, 13, 2, 10, 6, 14, 3, 11, 7, 15};

struct MaxOp {
  __m512 operator()(__m512 a, __m512 b) const { return _mm512_max_ps(a, b); }
};
struct AddOp {
  __m512 operator()(__m512 a, __m512 b) const { return _mm512_add_ps(a, b); }
};

template <class Op>
inline __m512 reduce16(const __m512* v, Op op) {
  __m512 w[8], x[4], y[2];
  for (int i = 0; i < 8; ++i)  // [v0 halves | v1 halves]
    w[i] = op(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
              _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int i = 0; i < 4; ++i)  // one row per 128-bit quarter
    x[i] = op(_mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
              _mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  for (int i = 0; i < 2; ++i)
    y[i] =
        op(_mm512_unpacklo_ps(x[2 * i], x[2 * i + 1]), _mm512_unpackhi_ps(x[2 * i], x[2 * i + 1]));
  return op(_mm512_unpacklo_ps(y[0], y[1]), _mm512_unpackhi_ps(y[0], y[1]));
}

// exp(x) for x <= 0 given t = x log2(e): 2^n 2^f, n = round(t), f in [-1/2, 1/2], a degree-5 fit
// of 2^f (relative error 1.7e-7, below bf16's 4e-3), vscalefps for 2^n; t clamped at -160 so
// that -inf gives 0.
inline __m512 exp2_nonpositive(__m512 t) {
  t = _mm512_max_ps(t, _mm512_set1_ps(-160.f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.3400433e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6760374e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5503272e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022107e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000001f));
  return _mm512_scalef_ps(p, n);
}

// Quarter q (16 keys) of row r's scores, -inf where the row's mask bits are 0.
inline __m512 masked_scores(const float* S, const TileMask& mask, size_t r, int q) {
  const uint64_t bits = mask.row_bits ? mask.row_bits[r] : mask.keys;
  return _mm512_mask_blend_ps(static_cast<__mmask16>(bits >> (16 * q)),
                              _mm512_set1_ps(-__builtin_inff()),
                              _mm512_loadu_ps(S + r * 64 + 16 * q));
}

}  // namespace

void softmax_step_bf16(const float* S, size_t rows, SoftmaxRows st, TileMask mask, uint16_t* P) {
  const __m512 ninf = _mm512_set1_ps(-__builtin_inff()), zero = _mm512_setzero_ps();
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
  const __m512bh ones = (__m512bh)_mm512_set1_epi16(0x3f80);  // bf16 1.0
  for (size_t r0 = 0; r0 < rows; r0 += 16) {
    const size_t n = rows - r0 < 16 ? rows - r0 : 16;
    const __mmask16 live = static_cast<__mmask16>((1u << n) - 1);
    __m512 v[16];
    for (int L = 0; L < 16; ++L) {  // row maxima
      const size_t r = r0 + L;
      v[kSlot[L]] =
          static_cast<size_t>(L) < n
              ? _mm512_max_ps(
                    _mm512_max_ps(masked_scores(S, mask, r, 0), masked_scores(S, mask, r, 1)),
                    _mm512_max_ps(masked_scores(S, mask, r, 2), masked_scores(S, mask, r, 3)))
              : ninf;
    }
    const __m512 mx = reduce16(v, MaxOp());
    const __m512 m_old = _mm512_maskz_loadu_ps(live, st.m + r0);
    const __m512 m_new = _mm512_max_ps(m_old, mx);
    _mm512_mask_storeu_ps(st.rmax + r0, live,
                          _mm512_max_ps(_mm512_maskz_loadu_ps(live, st.rmax + r0), mx));
    // Rows with no allowed key so far keep m = -inf and P = 0 (exp against m = 0); alpha is 1
    // exactly where m stays (so O is not rescaled).
    const __mmask16 dead = _mm512_cmp_ps_mask(m_new, ninf, _CMP_EQ_OQ);
    const __mmask16 same = _mm512_cmp_ps_mask(m_new, m_old, _CMP_EQ_OQ);
    const __m512 m_use = _mm512_mask_blend_ps(dead, m_new, zero);
    const __m512 alpha = _mm512_mask_blend_ps(
        same, exp2_nonpositive(_mm512_mul_ps(_mm512_sub_ps(m_old, m_use), log2e)),
        _mm512_set1_ps(1.f));
    alignas(64) float mlog[16], mu[16];
    _mm512_store_ps(mlog, _mm512_mul_ps(m_use, log2e));
    _mm512_store_ps(mu, m_use);
    __m512 sums[16], rsums[16];
    for (int L = 0; L < 16; ++L) {
      if (static_cast<size_t>(L) >= n) {
        sums[kSlot[L]] = rsums[kSlot[L]] = zero;
        continue;
      }
      uint16_t* pr = P + (r0 + L) * 64;
      const __m512 ml = _mm512_set1_ps(mlog[L]);
      __m512 p[4];
      // s log2 e - m log2 e in one FMA; a row whose maximum is below -FLT_MAX / log2 e (an
      // additive mask of fp32's lowest value on every key) takes (s - m) log2 e, as -inf - -inf
      // would be NaN.
      if (mlog[L] > -__builtin_inff()) {
        for (int q = 0; q < 4; ++q)
          p[q] = exp2_nonpositive(_mm512_fmsub_ps(masked_scores(S, mask, r0 + L, q), log2e, ml));
      } else {
        const __m512 m = _mm512_set1_ps(mu[L]);
        for (int q = 0; q < 4; ++q)
          p[q] = exp2_nonpositive(
              _mm512_mul_ps(_mm512_sub_ps(masked_scores(S, mask, r0 + L, q), m), log2e));
      }
      sums[kSlot[L]] = _mm512_add_ps(_mm512_add_ps(p[0], p[1]), _mm512_add_ps(p[2], p[3]));
      const __m512bh lo = _mm512_cvtne2ps_pbh(p[1], p[0]), hi = _mm512_cvtne2ps_pbh(p[3], p[2]);
      _mm512_storeu_si512(pr, (__m512i)lo);
      _mm512_storeu_si512(pr + 32, (__m512i)hi);
      // The sum of the weights as P V sees them: pairs of bf16 times 1.
      rsums[kSlot[L]] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(zero, lo, ones), hi, ones);
    }
    const AddOp add;
    const __m512 l =
        _mm512_fmadd_ps(_mm512_maskz_loadu_ps(live, st.l + r0), alpha, reduce16(sums, add));
    const __m512 lp =
        _mm512_fmadd_ps(_mm512_maskz_loadu_ps(live, st.lp + r0), alpha, reduce16(rsums, add));
    _mm512_mask_storeu_ps(st.l + r0, live, l);
    _mm512_mask_storeu_ps(st.lp + r0, live, lp);
    _mm512_mask_storeu_ps(st.m + r0, live, m_new);
    _mm512_mask_storeu_ps(st.alpha + r0, live, alpha);
  }
}

namespace {

// In-register transpose of 16 x 16 32-bit words: r[i] holds row i, then column i.
inline void transpose16(__m512i* r) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i + 0], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i + 0], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_i32x4(r[8 * i + j], r[8 * i + j + 4], 0x88);
      t[8 * i + j + 4] = _mm512_shuffle_i32x4(r[8 * i + j], r[8 * i + j + 4], 0xdd);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xdd);
  }
}

inline __mmask32 first_n32(int64_t n) {
  return n >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((uint32_t{1} << n) - 1);
}

}  // namespace

void transpose_rows_to_words(const void* const* rows, int64_t bytes, uint32_t* out) {
  const int64_t words = (bytes + 3) / 4;
  for (int64_t w0 = 0; w0 < words; w0 += 16) {
    const int64_t left = bytes - 4 * w0;  // bytes of this block of 16 words
    const __mmask64 m = left >= 64 ? ~__mmask64{0} : (__mmask64{1} << left) - 1;
    const int64_t n = words - w0 < 16 ? words - w0 : 16;
    for (int x0 = 0; x0 < 64; x0 += 16) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i)
        r[i] = rows[x0 + i]
                   ? _mm512_maskz_loadu_epi8(m, static_cast<const char*>(rows[x0 + i]) + 4 * w0)
                   : _mm512_setzero_si512();
      transpose16(r);
      for (int64_t j = 0; j < n; ++j) _mm512_storeu_si512(out + (w0 + j) * 64 + x0, r[j]);
    }
  }
}

void pack_v_pairs_bf16(const uint16_t* r0, const uint16_t* r1, int64_t dv, int64_t dv_pad,
                       uint32_t* out) {
  // Word e of the output is (r0[e], r1[e]): 16-bit lanes i and 32 + i interleaved.
  alignas(64) static constexpr uint16_t kLo[32] = {0,  32, 1,  33, 2,  34, 3,  35, 4,  36, 5,
                                                   37, 6,  38, 7,  39, 8,  40, 9,  41, 10, 42,
                                                   11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static constexpr uint16_t kHi[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21,
                                                   53, 22, 54, 23, 55, 24, 56, 25, 57, 26, 58,
                                                   27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i lo = _mm512_load_si512(kLo), hi = _mm512_load_si512(kHi);
  for (int64_t e = 0; e < dv_pad; e += 32) {
    const __mmask32 m = first_n32(dv - e > 0 ? dv - e : 0);
    const __m512i a = r0 ? _mm512_maskz_loadu_epi16(m, r0 + e) : _mm512_setzero_si512();
    const __m512i b = r1 ? _mm512_maskz_loadu_epi16(m, r1 + e) : _mm512_setzero_si512();
    const int64_t left = dv_pad - e;  // words of this step: 32, or 16 at an odd end
    _mm512_storeu_si512(out + e, _mm512_permutex2var_epi16(a, lo, b));
    if (left > 16) _mm512_storeu_si512(out + e + 16, _mm512_permutex2var_epi16(a, hi, b));
  }
}

void split_word_halves(const uint32_t* words, int64_t wrows, uint16_t* out) {
  for (int64_t w = 0; w < wrows; ++w)
    for (int64_t x = 0; x < 64; x += 16) {
      const __m512i v = _mm512_loadu_si512(words + w * 64 + x);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 2 * w * 64 + x),
                          _mm512_cvtepi32_epi16(v));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (2 * w + 1) * 64 + x),
                          _mm512_cvtepi32_epi16(_mm512_srli_epi32(v, 16)));
    }
}

void to_bf16_rows(const float* src, size_t ld_src, uint16_t* dst, size_t ld_dst, size_t rows,
                  size_t cols) {
  for (size_t r = 0; r < rows; ++r)
    for (size_t c = 0; c < cols; c += 32) {
      const float* s = src + r * ld_src + c;
      // The second argument gives the lower 16 elements.
      const __m512bh h = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(s + 16), _mm512_loadu_ps(s));
      _mm512_storeu_si512(dst + r * ld_dst + c, (__m512i)h);
    }
}
#pragma GCC pop_options
#else
void gemm_bf16(const uint16_t*, size_t, const uint16_t*, size_t, float*, size_t, size_t, size_t,
               const float*, bool, float) {}
void to_bf16_rows(const float*, size_t, uint16_t*, size_t, size_t, size_t) {}
void softmax_step_bf16(const float*, size_t, SoftmaxRows, TileMask, uint16_t*) {}
void transpose_rows_to_words(const void* const*, int64_t, uint32_t*) {}
void pack_v_pairs_bf16(const uint16_t*, const uint16_t*, int64_t, int64_t, uint32_t*) {}
void split_word_halves(const uint32_t*, int64_t, uint16_t*) {}
#endif

}  // namespace attnkit::cpu
