// The CPU's arithmetic ceilings for docs/perf/cpu.md: fp32 FMA (vfmadd231ps zmm) and bf16 dot
// products (vdpbf16ps zmm, 2 multiply-adds per fp32 lane) from registers, 16 independent chains
// per thread, on 1 and 2 threads. Build and run:
//   g++ -O2 -fopenmp bench/cpu_peak.cpp -o /tmp/cpu_peak && /tmp/cpu_peak
#include <immintrin.h>
#include <omp.h>

#include <chrono>
#include <cstdio>

namespace {

constexpr int kChains = 16;

// a = a * b + c per chain (Dot: a += b0 c0 + b1 c1 over bf16 pairs).
template <bool kDot>
__attribute__((target("avx512f,avx512bf16"))) double chains(long iters) {
  __m512 a[kChains];
  const __m512 b = _mm512_set1_ps(1.0000001f), c = _mm512_set1_ps(0.999999f);
  const __m512bh bh = (__m512bh)_mm512_set1_epi16(0x3f80), ch = (__m512bh)_mm512_set1_epi16(0x3f81);
  for (int i = 0; i < kChains; ++i) a[i] = _mm512_set1_ps(static_cast<float>(i));
  for (long it = 0; it < iters; ++it)
#pragma GCC unroll 16
    for (int i = 0; i < kChains; ++i)
      a[i] = kDot ? _mm512_dpbf16_ps(a[i], bh, ch) : _mm512_fmadd_ps(a[i], b, c);
  __m512 s = a[0];
  for (int i = 1; i < kChains; ++i) s = _mm512_add_ps(s, a[i]);
  return _mm512_reduce_add_ps(s);
}

}  // namespace

int main() {
  const long iters = 200000000 / kChains;
  const bool bf16 = __builtin_cpu_supports("avx512bf16");
  for (int threads = 1; threads <= 2; ++threads)
    for (int kind = 0; kind < (bf16 ? 2 : 1); ++kind) {
      const auto t0 = std::chrono::steady_clock::now();
      double sink = 0;
#pragma omp parallel num_threads(threads) reduction(+ : sink)
      sink += kind ? chains<true>(iters) : chains<false>(iters);
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      const double flops = double(threads) * iters * kChains * 16 * 2 * (kind ? 2 : 1);
      std::printf("%-8s %d thread(s): %6.1f GFLOP/s (%g)\n", kind ? "vdpbf16" : "fma", threads,
                  flops / s / 1e9, sink);
    }
}
