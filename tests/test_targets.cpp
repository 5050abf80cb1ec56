// Every compiled SIMD target of the CPU kernels that this machine can run (Highway's forced
// targets), against the float64 oracle: each mechanism once, with statistics, odd sizes.
#include <gtest/gtest.h>
#include <hwy/targets.h>

#include <cstdio>
#include <random>

#include "attnkit/registry.h"
#include "core/convert.h"
#include "cpu/forward.h"
#include "cpu/tile_ops_avx512.h"
#include "spec_json.h"

namespace attnkit::tools {
namespace {

TEST(SimdTargets, EveryTargetMatchesOracle) {
  const std::vector<int64_t> targets = cpu::simd_targets();
  ASSERT_GE(targets.size(), 2u);  // at least the best vector target and a fallback
  for (int64_t target : targets) {
    hwy::SetSupportedTargetsForTest(target);
    EXPECT_EQ(cpu_simd_target(), hwy::TargetName(target));
    std::printf("target %s\n", hwy::TargetName(target));
    for (const std::string& m : mechanism_names())
      for (DType dtype : {DType::kF32, DType::kBF16}) {  // bf16: with its dot products if any
        CheckOptions opt;
        opt.dtype = dtype;
        opt.dims = {1, 4, 2, 81, 81, 40, 24};
        opt.seed = 11;
        if (mechanism_spec(m, opt.dims).is_null()) continue;
        const CheckResult r = check_mechanism(m, opt);
        EXPECT_TRUE(r.ok) << hwy::TargetName(target) << " " << m << " " << r.dtype << ": "
                          << r.error;
      }
  }
  hwy::SetSupportedTargetsForTest(0);  // back to what the CPU supports
}

// The bf16 dot-product GEMM (tile_ops_avx512.h) against a double product of the same bf16 values:
// every row remainder of the 6-row block (1..13 rows), every column strip (16..80 columns), odd
// pair counts, alpha with and without loading C, and the output multiplier.
TEST(Bf16Dot, GemmMatchesDoubleProduct) {
  if (!cpu::bf16_dot_supported()) GTEST_SKIP() << "this CPU has no AVX512_BF16";
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> u(-2.f, 2.f);
  for (size_t rows : {1, 5, 6, 7, 13})
    for (size_t ncols : {16, 32, 48, 64, 80})
      for (size_t kpairs : {1, 3, 64}) {
        const size_t lda = 2 * kpairs + 2;  // row stride beyond the pairs
        std::vector<uint16_t> A(rows * lda), B(kpairs * 2 * ncols);
        for (uint16_t& x : A) x = core::float_to_bf16(u(rng));
        for (uint16_t& x : B) x = core::float_to_bf16(u(rng));
        std::vector<float> C0(rows * ncols), alpha(rows);
        for (float& x : C0) x = u(rng);
        for (float& x : alpha) x = u(rng);
        for (int mode = 0; mode < 3; ++mode) {  // write; load C; load C times alpha
          const float mul = mode == 0 ? 0.37f : 1.f;
          std::vector<float> C = C0;
          cpu::gemm_bf16(A.data(), lda, B.data(), kpairs, C.data(), ncols, rows, ncols,
                         mode == 2 ? alpha.data() : nullptr, mode > 0, mul);
          for (size_t r = 0; r < rows; ++r)
            for (size_t c = 0; c < ncols; ++c) {
              double acc = 0, mag = 0;
              for (size_t k = 0; k < 2 * kpairs; ++k) {
                const double t = double(core::bf16_to_float(A[r * lda + k])) *
                                 core::bf16_to_float(B[(k / 2) * 2 * ncols + 2 * c + (k & 1)]);
                acc += t;
                mag += std::abs(t);
              }
              const double c0 = C0[r * ncols + c];
              const double want = mode == 0 ? mul * acc : (mode == 2 ? alpha[r] * c0 : c0) + acc;
              EXPECT_NEAR(C[r * ncols + c], want, 1e-5 * (mag + std::abs(c0) + 1))
                  << "rows " << rows << " ncols " << ncols << " kpairs " << kpairs << " mode "
                  << mode << " at " << r << "," << c;
            }
        }
      }
}

// bf16 inputs run on the bf16 dot products where the CPU has them, else widened to fp32: both
// paths against the oracle for every mechanism (odd sizes, GQA, dv != d, an odd head dim), with
// and without the entropy statistic (without it, the dot path's softmax step runs on vectors,
// element masks and row maxima included; with it, the per-row step).
TEST(Bf16Dot, BothPathsMatchOracle) {
  for (bool dot : {true, false}) {
    if (dot && !cpu::bf16_dot_supported()) continue;
    cpu::set_bf16_dot(dot);
    EXPECT_EQ(cpu_bf16_dot(), dot);
    for (const std::string& m : mechanism_names())
      for (const Dims& dims : {Dims{1, 4, 2, 81, 81, 41, 24}, Dims{2, 2, 1, 130, 130, 128, 72}})
        for (bool entropy : {true, false}) {
          CheckOptions opt;
          opt.dtype = DType::kBF16;
          opt.dims = dims;
          opt.seed = 12;
          opt.entropy = entropy;
          if (mechanism_spec(m, opt.dims).is_null()) continue;
          const CheckResult r = check_mechanism(m, opt);
          EXPECT_TRUE(r.ok) << (dot ? "bf16 dot " : "widened ") << m
                            << (entropy ? "" : " (no entropy)") << ": " << r.error;
        }
  }
  cpu::set_bf16_dot(cpu::bf16_dot_supported());
}

// The backward on the bf16 dot products (S and dQ from bf16 Q and K without low-rank head dims;
// dP, dV and dK from bf16 dO and V without a gate or ReLA; all five with both), or widened: both
// against the float64 backward oracle for every mechanism, odd head dims included.
TEST(Bf16Dot, BackwardBothPathsMatchOracle) {
  for (bool dot : {true, false}) {
    if (dot && !cpu::bf16_dot_supported()) continue;
    cpu::set_bf16_dot(dot);
    for (const std::string& m : mechanism_names())
      for (const Dims& dims : {Dims{1, 4, 2, 81, 81, 41, 24}, Dims{2, 2, 1, 130, 130, 128, 72},
                               Dims{1, 2, 1, 67, 67, 33, 17}}) {
        CheckOptions opt;
        opt.dtype = DType::kBF16;
        opt.dims = dims;
        opt.seed = 13;
        if (mechanism_spec(m, opt.dims).is_null()) continue;
        const CheckResult r = check_backward(m, opt);
        EXPECT_TRUE(r.ok) << (dot ? "bf16 dot " : "widened ") << m << ": " << r.error;
      }
  }
  cpu::set_bf16_dot(cpu::bf16_dot_supported());
}

}  // namespace
}  // namespace attnkit::tools
