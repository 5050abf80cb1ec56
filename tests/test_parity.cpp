// Every mechanism x dtype x shape of the shared shape table: the CPU path against the float64
// oracle on random inputs (several scales, odd sizes, Nq != Nk, GQA/MQA, BNHD, dv != d).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "attnkit/variant/score_mods.h"
#include "core/convert.h"
#include "cpu/parallel.h"
#include "spec_json.h"

namespace attnkit::tools {
namespace {

struct Shape {
  const char* name;
  Dims dims;
  double scale;
  bool bnhd;
};
// Edge-heavy: 1, 7, 129, not multiples of any tile, Nq != Nk both ways, MQA and GQA 8.
const Shape kShapes[] = {
    {"gqa_n129_d40", {2, 4, 2, 129, 129, 40, 40}, 1.0, false},
    {"n7_d72_bnhd", {1, 2, 2, 7, 7, 72, 72}, 1.0, true},
    {"n1_mqa8", {1, 8, 1, 1, 1, 64, 64}, 1.0, false},
    {"nq37_nk150_dv24", {1, 2, 1, 37, 150, 64, 24}, 1.0, false},
    {"nq150_nk37", {1, 2, 2, 150, 37, 32, 32}, 1.0, false},
    {"n256_d128_gqa8_scale3", {1, 8, 1, 256, 256, 128, 128}, 3.0, false},
    {"n100_large_logits", {1, 2, 2, 100, 100, 16, 16}, 30.0, false},
};

using Param = std::tuple<std::string, DType, int>;
class Parity : public ::testing::TestWithParam<Param> {};

TEST_P(Parity, MatchesOracle) {
  const auto& [mech, dtype, shape_index] = GetParam();
  const Shape& sh = kShapes[shape_index];
  CheckOptions opt;
  opt.dtype = dtype;
  opt.dims = sh.dims;
  opt.input_scale = sh.scale;
  opt.bnhd = sh.bnhd;
  opt.seed = 1000 + shape_index;
  const CheckResult r = check_mechanism(mech, opt);
  EXPECT_TRUE(r.ok) << mech << " " << r.dtype << " " << sh.name << ": " << r.error;
}

// Every (mechanism, dtype, shape) where the mechanism is defined (grid and document masks need
// Nq = Nk; the forget gate needs Nq <= Nk).
std::vector<Param> params() {
  std::vector<Param> out;
  for (const std::string& m : mechanism_names())
    for (DType t : {DType::kF32, DType::kBF16, DType::kF16})
      for (int s = 0; s < static_cast<int>(std::size(kShapes)); ++s)
        if (!mechanism_spec(m, kShapes[s].dims).is_null()) out.emplace_back(m, t, s);
  return out;
}

INSTANTIATE_TEST_SUITE_P(All, Parity, ::testing::ValuesIn(params()), [](const auto& info) {
  return std::get<0>(info.param) + "_" + dtype_name(std::get<1>(info.param)) + "_" +
         kShapes[std::get<2>(info.param)].name;
});

// Thread counts must not change results beyond rounding (and 1 vs 2 threads are bit-identical:
// every task owns its rows).
TEST(Threads, SameResultAnyThreadCount) {
  for (const char* mech : {"causal", "neighborhood_2d", "sink"}) {
    Instance inst;
    CheckOptions opt;
    opt.dims = {2, 4, 2, 196, 196, 64, 64};
    ASSERT_EQ(make_instance(mech, opt, inst), "");
    std::vector<double> first;
    for (int threads : {1, 2, 3}) {
      Outputs o = make_outputs(inst, false);
      Options op;
      op.num_threads = threads;
      ASSERT_TRUE(attention_forward(inst.q.view, inst.k.view, inst.v.view, inst.spec, o.out.view,
                                    o.row_stat.view, {}, op)
                      .ok());
      if (first.empty())
        first = o.out.to_doubles();
      else
        EXPECT_EQ(first, o.out.to_doubles()) << mech << " threads " << threads;
    }
  }
}

// The policies' dtype decode (used for a bias in q's dtype) agrees with the compiler's
// conversions on every 16-bit pattern.
TEST(Policies, HalfAndBfloatDecodeEveryPattern) {
  for (uint32_t x = 0; x < 65536; ++x) {
    const uint16_t h = static_cast<uint16_t>(x);
    const float f16 = load_float<float>(&h, DType::kF16, 0), want16 = core::f16_to_float(h);
    const float b16 = load_float<float>(&h, DType::kBF16, 0), wantb = core::bf16_to_float(h);
    if (std::isnan(want16))
      EXPECT_TRUE(std::isnan(f16)) << x;
    else
      EXPECT_EQ(f16, want16) << x;
    if (std::isnan(wantb))
      EXPECT_TRUE(std::isnan(b16)) << x;
    else
      EXPECT_EQ(b16, wantb) << x;
  }
}

// The oracle's fp16 rounding (round_f16: bit arithmetic) equals the round trip through
// _Float16 on every float's top 19 bits with the 13 bits below them at ties, next to ties, zero
// and full (fp16's normal and subnormal ranges, overflow to infinity, NaN). Checked once on all
// 2^32 floats when it was written.
TEST(Policies, HalfRoundingMatchesTheCompiler) {
  for (uint32_t top = 0; top < (1u << 19); ++top)
    for (uint32_t low : {0x0u, 0x1u, 0xfffu, 0x1000u, 0x1001u, 0x1fffu}) {
      const uint32_t u = top << 13 | low;
      float f;
      std::memcpy(&f, &u, 4);
      const float got = core::round_f16(f), want = core::f16_to_float(core::float_to_f16(f));
      if (std::isnan(want))
        ASSERT_TRUE(std::isnan(got)) << std::hex << u;
      else
        ASSERT_EQ(got, want) << std::hex << u;
    }
}

// A bias given in q's dtype (bf16, fp16) equals the same values given in fp32.
TEST(Policies, BiasInInputDtype) {
  for (DType t : {DType::kBF16, DType::kF16}) {
    Instance inst;
    CheckOptions opt;
    opt.dtype = t;
    opt.dims = {2, 2, 1, 70, 90, 32, 32};
    ASSERT_EQ(make_instance("bias", opt, inst), "");
    const std::vector<double> vals = inst.extras["bias"].to_doubles();
    OwnedTensor low = OwnedTensor::from_doubles(vals, t, {2, 2, 70, 90});
    OwnedTensor wide = OwnedTensor::from_doubles(low.to_doubles(), DType::kF32, {2, 2, 70, 90});
    Outputs a = make_outputs(inst, false), b = make_outputs(inst, false);
    inst.spec.mods.bias = low.view;
    ASSERT_TRUE(
        attention_forward(inst.q.view, inst.k.view, inst.v.view, inst.spec, a.out.view).ok());
    OwnedTensor ref = OwnedTensor::zeros(DType::kF64, {2, 2, 70, 32});
    ASSERT_TRUE(reference_forward(inst.q.view, inst.k.view, inst.v.view, inst.spec, ref.view).ok());
    inst.spec.mods.bias = wide.view;
    ASSERT_TRUE(
        attention_forward(inst.q.view, inst.k.view, inst.v.view, inst.spec, b.out.view).ok());
    EXPECT_EQ(a.out.to_doubles(), b.out.to_doubles()) << dtype_name(t);
    EXPECT_LE(rel_error(a.out.to_doubles(), ref.to_doubles()), tolerance_for(t)) << dtype_name(t);
  }
}

// The naive low-precision computation behind the tolerance rule really is low precision (else
// the rule would be vacuous) and close to exact in fp32.
TEST(Tolerance, NaiveComputationIsLowPrecision) {
  for (DType t : {DType::kF32, DType::kBF16, DType::kF16}) {
    CheckOptions opt;
    opt.dtype = t;
    opt.dims = {1, 4, 2, 129, 129, 64, 64};
    const CheckResult r = check_mechanism("causal", opt);
    ASSERT_TRUE(r.ok) << r.error;
    if (t == DType::kF32) {
      EXPECT_LT(r.naive_err, 1e-6);
    } else {
      EXPECT_GT(r.naive_err, t == DType::kBF16 ? 1e-3 : 1e-4) << dtype_name(t);
      EXPECT_LT(r.tol, tolerance_for(t)) << dtype_name(t);  // the rule is the binding one
    }
  }
}

// A task's exception leaves parallel_for after the region (an exception out of an OpenMP
// region ends the program), the first one thrown; the tasks before it ran.
TEST(Parallel, AnExceptionInATaskIsThrownAfterTheRegion) {
  std::vector<int> ran(64, 0);
  auto body = [&](int64_t t, int) {
    if (t == 5) throw std::runtime_error("task 5");
    ran[t] = 1;
  };
  EXPECT_THROW(cpu::parallel_for(64, 4, body), std::runtime_error);
  EXPECT_THROW(cpu::parallel_for(64, 1, body), std::runtime_error);  // the serial path too
  EXPECT_EQ(ran[0], 1);
  cpu::parallel_for(3, 8, [&](int64_t t, int w) { EXPECT_LT(w, 3) << t; });  // no more than tasks
}

// fp32's bound grows with the largest row max (one fp32 unit of it, up to 1e-4): logits of a
// few keep 1e-5, logits of hundreds (inputs of scale 10 at d 64: |S| to ~500) get more, never
// past 1e-4.
TEST(Tolerance, Fp32BoundFollowsTheTopScore) {
  CheckOptions opt;
  opt.dtype = DType::kF32;
  opt.dims = {1, 2, 2, 40, 70, 64, 64};
  for (double scale : {1.0, 10.0}) {
    opt.input_scale = scale;
    const CheckResult r = check_mechanism("dense", opt);
    ASSERT_TRUE(r.ok) << r.error;
    if (scale == 1.0)
      EXPECT_EQ(r.tol, 1e-5);
    else
      EXPECT_GT(r.tol, 2e-5);
    EXPECT_LE(r.tol, 1e-4);
  }
}

}  // namespace
}  // namespace attnkit::tools
