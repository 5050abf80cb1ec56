// The CPU backward pass against the float64 backward oracle: every mask mechanism and the sink
// normalizer, fp32 / bf16 / fp16 inputs, GQA, Nq != Nk both ways, odd sizes, BNHD, varlen;
// fully masked rows; bit-identical gradients for any thread count; unsupported specs refused.
#include <gtest/gtest.h>

#include <cmath>

#include "spec_json.h"

namespace attnkit::tools {
namespace {

struct Shape {
  const char* name;
  Dims dims;
  bool bnhd;
};
const Shape kShapes[] = {{"gqa_n129_d40", {2, 4, 2, 129, 129, 40, 40}, false},
                         {"n7_d72_bnhd", {1, 2, 2, 7, 7, 72, 72}, true},
                         {"nq37_nk150_dv24", {1, 2, 1, 37, 150, 64, 24}, false},
                         {"nq150_nk37", {1, 2, 2, 150, 37, 32, 32}, false}};

struct Result {
  std::vector<double> dq, dk, dv, dsinks;
};

// Forward on the CPU, then the CPU backward, for one instance.
Result cpu_grads(const Instance& inst, const OwnedTensor& grad_out, int threads) {
  const Dims& d = inst.dims;
  Outputs o = make_outputs(inst, false);
  if (inst.spec.layout == Layout::kBNHD)
    o.out = OwnedTensor::zeros(inst.dtype, {d.batch, d.nq, d.hq, d.dv});
  Options op;
  op.num_threads = threads;
  EXPECT_TRUE(attention_forward(inst.q.view, inst.k.view, inst.v.view, inst.spec, o.out.view,
                                o.row_stat.view, {}, op)
                  .ok());
  auto like = [](const OwnedTensor& t) {
    return OwnedTensor::zeros(DType::kF32,
                              std::vector<int64_t>(t.view.shape, t.view.shape + t.view.ndim));
  };
  OwnedTensor dq = like(inst.q), dk = like(inst.k), dv = like(inst.v), ds;
  AttentionGrads g{dq.view, dk.view, dv.view};
  if (inst.spec.normalizer.kind == NormalizerKind::kSoftmaxSink) {
    ds = OwnedTensor::zeros(DType::kF32, {d.hq});
    g.dsinks = ds.view;
  }
  const Status s = attention_backward(inst.q.view, inst.k.view, inst.v.view, o.out.view,
                                      o.row_stat.view, grad_out.view, inst.spec, g, op);
  EXPECT_TRUE(s.ok()) << s.message();
  return {dq.to_doubles(), dk.to_doubles(), dv.to_doubles(),
          ds.view.defined() ? ds.to_doubles() : std::vector<double>{}};
}

OwnedTensor make_grad_out(const Instance& inst) {
  const Dims& d = inst.dims;
  return inst.spec.layout == Layout::kBNHD
             ? random_tensor(inst.dtype, {d.batch, d.nq, d.hq, d.dv}, 1.0, 31)
             : random_tensor(inst.dtype, {d.batch, d.hq, d.nq, d.dv}, 1.0, 31);
}

using Param = std::tuple<std::string, DType, int>;
class Backward : public ::testing::TestWithParam<Param> {};

TEST_P(Backward, MatchesOracle) {
  const auto& [mech, dtype, si] = GetParam();
  CheckOptions opt;
  opt.dtype = dtype;
  opt.dims = kShapes[si].dims;
  opt.bnhd = kShapes[si].bnhd;
  opt.seed = 50 + si;
  opt.threads = 2;
  const CheckResult r = check_backward(mech, opt);
  EXPECT_TRUE(r.ok) << mech << " " << r.dtype << " " << kShapes[si].name << ": " << r.error;
}

std::vector<Param> params() {
  std::vector<Param> out;
  // Every mechanism the CPU backward covers (can_run_backward says ok); the rest is checked to
  // be refused in BackwardUnsupported.
  for (const std::string& m : mechanism_names()) {
    if (!backward_covered(m, {1, 2, 2, 16, 16, 8, 8})) continue;
    for (DType t : {DType::kF32, DType::kBF16, DType::kF16})
      for (int s = 0; s < static_cast<int>(std::size(kShapes)); ++s)
        if (!mechanism_spec(m, kShapes[s].dims).is_null()) out.emplace_back(m, t, s);
  }
  return out;
}

INSTANTIATE_TEST_SUITE_P(All, Backward, ::testing::ValuesIn(params()), [](const auto& info) {
  return std::get<0>(info.param) + "_" + dtype_name(std::get<1>(info.param)) + "_" +
         kShapes[std::get<2>(info.param)].name;
});

// The covered set is what the docs promise: every mask mechanism and the sink normalizer.
TEST(BackwardCoverage, EveryMaskAndSink) {
  for (const char* m :
       {"dense", "causal", "causal_top_left", "sliding_window", "global_window", "chunked",
        "document", "block_attention", "prefix_lm", "neighborhood_2d", "maxvit_block",
        "maxvit_grid", "and_causal_document", "or_window_chunked", "not_causal", "sink"})
    EXPECT_TRUE(backward_covered(m, {1, 2, 2, 16, 16, 8, 8})) << m;
}

// Bit-identical gradients across thread counts.
TEST(BackwardDeterminism, SameBitsForAnyThreadCount) {
  for (const char* mech : {"causal", "neighborhood_2d", "sink"}) {
    CheckOptions opt;
    opt.dims = {2, 4, 2, 196, 196, 64, 64};
    Instance inst;
    ASSERT_EQ(make_instance(mech, opt, inst), "");
    const OwnedTensor go = make_grad_out(inst);
    const Result one = cpu_grads(inst, go, 1);
    for (int threads : {2, 3}) {
      const Result more = cpu_grads(inst, go, threads);
      EXPECT_EQ(one.dq, more.dq) << mech << " " << threads;
      EXPECT_EQ(one.dk, more.dk) << mech << " " << threads;
      EXPECT_EQ(one.dv, more.dv) << mech << " " << threads;
    }
  }
}

// Rows with no allowed key get zero dq; keys no query sees get zero dk, dv.
TEST(BackwardFullyMasked, ZeroGradients) {
  CheckOptions opt;
  opt.dims = {1, 2, 2, 150, 37, 16, 16};  // causal bottom-right: rows 0..112 see nothing
  Instance inst;
  ASSERT_EQ(make_instance("causal", opt, inst), "");
  const Result r = cpu_grads(inst, make_grad_out(inst), 2);
  for (int64_t h = 0; h < 2; ++h)
    for (int64_t i = 0; i < 113; ++i)
      for (int64_t c = 0; c < 16; ++c) ASSERT_EQ(r.dq[(h * 150 + i) * 16 + c], 0.0);
}

// Varlen through the CPU backward against the oracle.
TEST(BackwardVarlen, MatchesOracle) {
  const std::vector<int32_t> cq = {0, 5, 75, 204}, ck = {0, 9, 79, 179};
  const int64_t hq = 4, hk = 2, d = 40, dv = 24;
  OwnedTensor q = random_tensor(DType::kF32, {cq.back(), hq, d}, 1.0, 1);
  OwnedTensor k = random_tensor(DType::kF32, {ck.back(), hk, d}, 1.0, 2);
  OwnedTensor v = random_tensor(DType::kF32, {ck.back(), hk, dv}, 1.0, 3);
  OwnedTensor out = OwnedTensor::zeros(DType::kF32, {cq.back(), hq, dv});
  OwnedTensor lse = OwnedTensor::zeros(DType::kF32, {hq, cq.back()});
  OwnedTensor go = random_tensor(DType::kF32, {cq.back(), hq, dv}, 1.0, 4);
  OwnedTensor cu_q = OwnedTensor::from_ints(cq, {4}), cu_k = OwnedTensor::from_ints(ck, {4});
  AttentionSpec spec;
  spec.mask = Mask::causal();
  spec.cu_seqlens_q = cu_q.view;
  spec.cu_seqlens_kv = cu_k.view;
  ASSERT_TRUE(attention_forward(q.view, k.view, v.view, spec, out.view, lse.view).ok());
  OwnedTensor dq = OwnedTensor::zeros(DType::kF32, {cq.back(), hq, d});
  OwnedTensor dk = OwnedTensor::zeros(DType::kF32, {ck.back(), hk, d});
  OwnedTensor dvv = OwnedTensor::zeros(DType::kF32, {ck.back(), hk, dv});
  OwnedTensor rq = OwnedTensor::zeros(DType::kF64, {cq.back(), hq, d});
  OwnedTensor rk = OwnedTensor::zeros(DType::kF64, {ck.back(), hk, d});
  OwnedTensor rv = OwnedTensor::zeros(DType::kF64, {ck.back(), hk, dv});
  ASSERT_TRUE(attention_backward(q.view, k.view, v.view, out.view, lse.view, go.view, spec,
                                 {dq.view, dk.view, dvv.view})
                  .ok());
  ASSERT_TRUE(
      reference_backward(q.view, k.view, v.view, go.view, spec, {rq.view, rk.view, rv.view}).ok());
  EXPECT_LE(rel_error(dq.to_doubles(), rq.to_doubles()), 2e-5);
  EXPECT_LE(rel_error(dk.to_doubles(), rk.to_doubles()), 2e-5);
  EXPECT_LE(rel_error(dvv.to_doubles(), rv.to_doubles()), 2e-5);
}

// What the CPU backward does not do yet is refused with a reason, never run.
TEST(BackwardUnsupported, NamedNotImplemented) {
  for (const char* mech : {"softcap", "bias", "sigmoid", "rela", "gate", "kernel_softplus"}) {
    CheckOptions opt;
    opt.dims = {1, 2, 2, 16, 16, 8, 8};
    Instance inst;
    ASSERT_EQ(make_instance(mech, opt, inst), "");
    Outputs o = make_outputs(inst, false);
    OwnedTensor go = make_grad_out(inst);
    OwnedTensor dq = OwnedTensor::zeros(DType::kF32, {1, 2, 16, 8});
    OwnedTensor dk = OwnedTensor::zeros(DType::kF32, {1, 2, 16, 8});
    OwnedTensor dv = OwnedTensor::zeros(DType::kF32, {1, 2, 16, 8});
    const Status s =
        attention_backward(inst.q.view, inst.k.view, inst.v.view, o.out.view, o.row_stat.view,
                           go.view, inst.spec, {dq.view, dk.view, dv.view});
    EXPECT_EQ(s.code(), StatusCode::kNotImplemented) << mech << ": " << s.message();
    EXPECT_NE(s.message().find("cpu backward"), std::string::npos) << s.message();
  }
}

}  // namespace
}  // namespace attnkit::tools
