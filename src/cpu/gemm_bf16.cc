// bf16 tile GEMMs with vdpbf16ps (layouts in gemm_bf16.h). Register block: 6 rows x 4 vectors
// (64 columns) of fp32 accumulators, 24 of the 32 zmm registers; per k pair, 4 vector loads of
// B and 6 32-bit broadcasts of A feed 24 dot products (48 multiply-adds per lane). This file
// alone is compiled for AVX-512 + BF16 (a target pragma after the includes, so no inline
// function of a header is emitted with those instructions); callers reach it only when
// bf16_dot_enabled().
#include "cpu/gemm_bf16.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define ATTNKIT_HAVE_BF16_DOT 1
#endif

namespace attnkit::cpu {

bool bf16_dot_supported() {
#if defined(ATTNKIT_HAVE_BF16_DOT)
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
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

// Every row of one column strip of NV vectors.
template <int NV>
void strip(const uint16_t* A, size_t lda, const uint16_t* B, size_t ldb, size_t kpairs, float* C,
           size_t ldc, size_t rows, const float* alpha, bool load_c, float mul) {
  size_t r = 0;
  for (; r + kRows <= rows; r += kRows)
    block<kRows, NV>(A + r * lda, lda, B, ldb, kpairs, C + r * ldc, ldc,
                     alpha ? alpha + r : nullptr, load_c, mul);
  const uint16_t* a = A + r * lda;
  float* c = C + r * ldc;
  const float* al = alpha ? alpha + r : nullptr;
  switch (rows - r) {
    case 5:
      block<5, NV>(a, lda, B, ldb, kpairs, c, ldc, al, load_c, mul);
      break;
    case 4:
      block<4, NV>(a, lda, B, ldb, kpairs, c, ldc, al, load_c, mul);
      break;
    case 3:
      block<3, NV>(a, lda, B, ldb, kpairs, c, ldc, al, load_c, mul);
      break;
    case 2:
      block<2, NV>(a, lda, B, ldb, kpairs, c, ldc, al, load_c, mul);
      break;
    case 1:
      block<1, NV>(a, lda, B, ldb, kpairs, c, ldc, al, load_c, mul);
      break;
    default:
      break;
  }
}

}  // namespace

void gemm_bf16(const uint16_t* A, size_t lda, const uint16_t* B, size_t kpairs, float* C,
               size_t ldc, size_t rows, size_t ncols, const float* alpha, bool load_c, float mul) {
  const size_t ldb = 2 * ncols;  // bf16 elements per k pair
  size_t c0 = 0;
  for (; c0 + 64 <= ncols; c0 += 64)
    strip<4>(A, lda, B + 2 * c0, ldb, kpairs, C + c0, ldc, rows, alpha, load_c, mul);
  switch ((ncols - c0) / 16) {
    case 3:
      strip<3>(A, lda, B + 2 * c0, ldb, kpairs, C + c0, ldc, rows, alpha, load_c, mul);
      break;
    case 2:
      strip<2>(A, lda, B + 2 * c0, ldb, kpairs, C + c0, ldc, rows, alpha, load_c, mul);
      break;
    case 1:
      strip<1>(A, lda, B + 2 * c0, ldb, kpairs, C + c0, ldc, rows, alpha, load_c, mul);
      break;
    default:
      break;
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
#endif

}  // namespace attnkit::cpu
