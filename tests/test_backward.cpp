// The CPU backward pass against the float64 backward oracle: every mechanism (masks, score mods
// with their gradients, normalizers, gates), fp32 / bf16 / fp16 inputs, GQA, Nq != Nk both ways,
// odd sizes, BNHD, varlen; fully masked rows; bit-identical gradients for any thread count;
// a missing row_stat refused.
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

// Every gradient of one backward run: dq, dk, dv, then the spec's extras (extra_grads order).
using Result = std::vector<std::vector<double>>;

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
  std::vector<OwnedTensor> grads;
  grads.push_back(like(inst.q));
  grads.push_back(like(inst.k));
  grads.push_back(like(inst.v));
  AttentionGrads g{grads[0].view, grads[1].view, grads[2].view};
  for (const ExtraGrad& e : extra_grads(inst.spec)) {
    grads.push_back(OwnedTensor::zeros(DType::kF32, e.shape));
    g.*e.member = grads.back().view;
  }
  const Status s = attention_backward(inst.q.view, inst.k.view, inst.v.view, o.out.view,
                                      o.row_stat.view, grad_out.view, inst.spec, g, op);
  EXPECT_TRUE(s.ok()) << s.message();
  Result r;
  for (const OwnedTensor& t : grads) r.push_back(t.to_doubles());
  return r;
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

// The CPU backward covers every mechanism (the docs promise it).
TEST(BackwardCoverage, EveryMechanism) {
  for (const std::string& m : mechanism_names())
    EXPECT_TRUE(backward_covered(m, {1, 2, 2, 16, 16, 8, 8})) << m;
}

// Bit-identical gradients (every one, extras included) across thread counts.
TEST(BackwardDeterminism, SameBitsForAnyThreadCount) {
  for (const char* mech : {"causal", "neighborhood_2d", "sink", "bias_broadcast", "alibi_slopes",
                           "relative_t5", "forget_gate", "low_rank_bias", "sigmoid", "rela"}) {
    CheckOptions opt;
    opt.dims = {2, 4, 2, 196, 196, 64, 64};
    Instance inst;
    ASSERT_EQ(make_instance(mech, opt, inst), "");
    const OwnedTensor go = make_grad_out(inst);
    const Result one = cpu_grads(inst, go, 1);
    for (int threads : {2, 3}) {
      const Result more = cpu_grads(inst, go, threads);
      ASSERT_EQ(one.size(), more.size());
      for (size_t i = 0; i < one.size(); ++i)
        EXPECT_EQ(one[i], more[i]) << mech << " " << threads << " gradient " << i;
    }
  }
}

// Rows with no allowed key get zero dq (and zero dbias rows), and no gradient has a NaN, for
// every normalizer.
TEST(BackwardFullyMasked, ZeroGradients) {
  for (const char* mech : {"causal", "sink", "sigmoid", "kernel_relu_length_scale", "rela", "gate",
                           "softcap", "alibi_slopes", "bias_broadcast"}) {
    CheckOptions opt;
    opt.dims = {1, 2, 2, 150, 37, 16, 16};  // causal bottom-right: rows 0..112 see nothing
    Instance inst;
    ASSERT_EQ(make_instance(mech, opt, inst), "");
    const Result r = cpu_grads(inst, make_grad_out(inst), 2);
    for (const std::vector<double>& g : r)
      for (double x : g) ASSERT_FALSE(std::isnan(x)) << mech;
    for (int64_t h = 0; h < 2; ++h)
      for (int64_t i = 0; i < 113; ++i)
        for (int64_t c = 0; c < 16; ++c) ASSERT_EQ(r[0][(h * 150 + i) * 16 + c], 0.0) << mech;
    if (std::string(mech) == "bias_broadcast") {  // dbias [1, 1, 150, 37]
      for (int64_t x = 0; x < 113 * 37; ++x) ASSERT_EQ(r[3][x], 0.0);
    }
  }
}

// A causal call's operands for the backward's rules: inputs of `dtype`, batch `b`, 2 heads,
// 16 tokens, head dim 8, the forward's out (inputs' dtype) and LSE, fp32 dq, dk, dv.
struct RulesCall {
  Instance inst;
  OwnedTensor out, lse, dq, dk, dv;
  AttentionGrads g;
  RulesCall(DType dtype, int64_t b) {
    CheckOptions opt;
    opt.dtype = dtype;
    opt.dims = {b, 2, 2, 16, 16, 8, 8};
    EXPECT_EQ(make_instance("causal", opt, inst), "");
    out = OwnedTensor::zeros(dtype, {b, 2, 16, 8});
    lse = OwnedTensor::zeros(DType::kF32, {b, 2, 16});
    for (OwnedTensor* t : {&dq, &dk, &dv}) *t = OwnedTensor::zeros(DType::kF32, {b, 2, 16, 8});
    g = AttentionGrads{dq.view, dk.view, dv.view};
  }
  Status check() const {
    return can_run_backward(inst.q.view, inst.k.view, inst.v.view, out.view, lse.view, out.view,
                            inst.spec, g);
  }
};

// 16-bit dq, dk, dv (the inputs' dtype) are written by the CUDA backward only: the CPU refuses
// them by name; a dtype that is neither the inputs' nor fp32/fp64 is a type error.
TEST(BackwardRules, SixteenBitGradientsAreCudaOnly) {
  RulesCall c(DType::kBF16, 1);
  OwnedTensor dq16 = OwnedTensor::zeros(DType::kBF16, {1, 2, 16, 8});
  c.g.dq = dq16.view;
  Status s = c.check();
  EXPECT_EQ(s.code(), StatusCode::kNotImplemented) << s.message();
  EXPECT_NE(s.message().find("CUDA backward only"), std::string::npos) << s.message();
  OwnedTensor dq_fp16 = OwnedTensor::zeros(DType::kF16, {1, 2, 16, 8});
  c.g.dq = dq_fp16.view;
  s = c.check();
  EXPECT_EQ(s.code(), StatusCode::kTypeError) << s.message();
  EXPECT_NE(s.message().find("dq.dtype = fp16"), std::string::npos) << s.message();
}

// A gradient is written element by element: a view whose elements overlap (stride 0 on a dim
// of size > 1) is refused by name instead of receiving whichever write lands last.
TEST(BackwardRules, OverlappingGradientViewsAreRefused) {
  RulesCall c(DType::kF32, 2);
  EXPECT_TRUE(c.check().ok()) << c.check().message();
  c.g.dk.strides[0] = 0;  // both batch elements on the same memory
  const Status s = c.check();
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.message();
  EXPECT_NE(s.message().find("dk.strides[0] = 0"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("must not overlap"), std::string::npos) << s.message();
}

// Zeroed gradients of packed q [tq, hq, d], k and v [tk, hk, d or dv] and the extras (a member
// of AttentionGrads and its shape each), in fp32 for the CPU backward and fp64 for the oracle.
struct VarlenGrads {
  std::vector<OwnedTensor> fast, ref;
  AttentionGrads fg, rg;
};
VarlenGrads varlen_grads(
    int64_t tq, int64_t tk, int64_t hq, int64_t hk, int64_t d, int64_t dv,
    const std::vector<std::pair<TensorView AttentionGrads::*, std::vector<int64_t>>>& extras = {}) {
  VarlenGrads g;
  for (DType t : {DType::kF32, DType::kF64}) {
    std::vector<OwnedTensor>& x = t == DType::kF32 ? g.fast : g.ref;
    x.push_back(OwnedTensor::zeros(t, {tq, hq, d}));
    x.push_back(OwnedTensor::zeros(t, {tk, hk, d}));
    x.push_back(OwnedTensor::zeros(t, {tk, hk, dv}));
    for (const auto& e : extras) x.push_back(OwnedTensor::zeros(t, e.second));
  }
  g.fg = {g.fast[0].view, g.fast[1].view, g.fast[2].view};
  g.rg = {g.ref[0].view, g.ref[1].view, g.ref[2].view};
  for (size_t i = 0; i < extras.size(); ++i) {
    g.fg.*extras[i].first = g.fast[3 + i].view;
    g.rg.*extras[i].first = g.ref[3 + i].view;
  }
  return g;
}

// Varlen through the CPU backward against the oracle, with per-sequence normalizers and gates.
TEST(BackwardVarlen, MatchesOracle) {
  const std::vector<int32_t> cq = {0, 5, 75, 204}, ck = {0, 9, 79, 179};
  const int64_t hq = 4, hk = 2, d = 40, dv = 24, tq = cq.back(), tk = ck.back();
  OwnedTensor q = random_tensor(DType::kF32, {tq, hq, d}, 1.0, 1);
  OwnedTensor k = random_tensor(DType::kF32, {tk, hk, d}, 1.0, 2);
  OwnedTensor v = random_tensor(DType::kF32, {tk, hk, dv}, 1.0, 3);
  OwnedTensor go = random_tensor(DType::kF32, {tq, hq, dv}, 1.0, 4);
  OwnedTensor gate = random_tensor(DType::kF32, {tq, hq, dv}, 1.0, 5);
  OwnedTensor gate_head = random_tensor(DType::kF32, {hq, tq}, 1.0, 6);
  OwnedTensor slopes = OwnedTensor::from_doubles({0.5, 0.25, 0.125, 0.0625}, DType::kF32, {hq});
  OwnedTensor gain = OwnedTensor::from_doubles(std::vector<double>(dv, 1.1), DType::kF32, {dv});
  OwnedTensor cu_q = OwnedTensor::from_ints(cq, {4}), cu_k = OwnedTensor::from_ints(ck, {4});
  for (int variant = 0; variant < 4; ++variant) {
    AttentionSpec spec;
    spec.mask = Mask::causal();
    spec.cu_seqlens_q = cu_q.view;
    spec.cu_seqlens_kv = cu_k.view;
    std::vector<std::pair<TensorView AttentionGrads::*, std::vector<int64_t>>> extras;
    if (variant == 1) {  // sigmoid, per-head gate
      spec.normalizer.kind = NormalizerKind::kSigmoid;
      spec.gate_kind = GateKind::kPerHead;
      spec.gate = gate_head.view;
      extras = {{&AttentionGrads::dgate, {hq, tq}}, {&AttentionGrads::dbeta, {1}}};
    } else if (variant == 2) {  // ReLA, elementwise gate
      spec.normalizer.kind = NormalizerKind::kReLA;
      spec.normalizer.rela_gain = gain.view;
      spec.gate_kind = GateKind::kElementwise;
      spec.gate = gate.view;
      extras = {{&AttentionGrads::dgate, {tq, hq, dv}}, {&AttentionGrads::drela_gain, {dv}}};
    } else if (variant == 3) {  // normalized kernel with length scale, ALiBi slopes, softcap
      spec.normalizer.kind = NormalizerKind::kKernel;
      spec.normalizer.feature = KernelFeature::kReLU;
      spec.normalizer.power = 2.f;
      spec.normalizer.length_scale = true;
      spec.mods.alibi = AlibiMode::kCausal;
      spec.mods.alibi_slopes = slopes.view;
      spec.mods.softcap = 5.f;
      extras = {{&AttentionGrads::dalibi_slopes, {hq}}};
    }
    const bool stat = spec.normalizer.kind != NormalizerKind::kSigmoid;
    OwnedTensor out = OwnedTensor::zeros(DType::kF32, {tq, hq, dv});
    OwnedTensor row_stat = stat ? OwnedTensor::zeros(DType::kF32, {hq, tq}) : OwnedTensor{};
    ASSERT_TRUE(attention_forward(q.view, k.view, v.view, spec, out.view, row_stat.view).ok());
    const VarlenGrads g = varlen_grads(tq, tk, hq, hk, d, dv, extras);
    const Status s =
        attention_backward(q.view, k.view, v.view, out.view, row_stat.view, go.view, spec, g.fg);
    ASSERT_TRUE(s.ok()) << s.message();
    ASSERT_TRUE(reference_backward(q.view, k.view, v.view, go.view, spec, g.rg).ok());
    for (size_t i = 0; i < g.fast.size(); ++i)
      EXPECT_LE(rel_error(g.fast[i].to_doubles(), g.ref[i].to_doubles()), i < 3 ? 2e-5 : 1e-4)
          << "variant " << variant << " gradient " << i;
  }
}

// A packed sequence without keys (cu_seqlens need only be non-decreasing): its rows weigh nothing
// (O = 0, no gradient through them), unmasked and causal, and the others match the oracle.
TEST(BackwardVarlen, ASequenceWithoutKeys) {
  const std::vector<int32_t> cq = {0, 3, 133, 197}, ck = {0, 5, 5, 205};
  const int64_t hq = 4, hk = 2, d = 16, tq = cq.back(), tk = ck.back();
  OwnedTensor q = random_tensor(DType::kF32, {tq, hq, d}, 1.0, 11);
  OwnedTensor k = random_tensor(DType::kF32, {tk, hk, d}, 1.0, 12);
  OwnedTensor v = random_tensor(DType::kF32, {tk, hk, d}, 1.0, 13);
  OwnedTensor go = random_tensor(DType::kF32, {tq, hq, d}, 1.0, 14);
  OwnedTensor cu_q = OwnedTensor::from_ints(cq, {4}), cu_k = OwnedTensor::from_ints(ck, {4});
  for (const bool causal : {false, true}) {
    AttentionSpec spec;
    if (causal) spec.mask = Mask::causal();
    spec.cu_seqlens_q = cu_q.view;
    spec.cu_seqlens_kv = cu_k.view;
    OwnedTensor out = OwnedTensor::zeros(DType::kF32, {tq, hq, d});
    OwnedTensor lse = OwnedTensor::zeros(DType::kF32, {hq, tq});
    ASSERT_TRUE(attention_forward(q.view, k.view, v.view, spec, out.view, lse.view).ok());
    const std::vector<double> o = out.to_doubles();
    for (int64_t i = cq[1] * hq * d; i < cq[2] * hq * d; ++i)
      ASSERT_EQ(o[i], 0.0) << "causal " << causal << " element " << i;
    const VarlenGrads g = varlen_grads(tq, tk, hq, hk, d, d);
    const Status s =
        attention_backward(q.view, k.view, v.view, out.view, lse.view, go.view, spec, g.fg);
    ASSERT_TRUE(s.ok()) << s.message();
    ASSERT_TRUE(reference_backward(q.view, k.view, v.view, go.view, spec, g.rg).ok());
    for (size_t i = 0; i < g.fast.size(); ++i) {
      const std::vector<double> got = g.fast[i].to_doubles();
      for (double x : got)
        ASSERT_TRUE(std::isfinite(x)) << "causal " << causal << " gradient " << i;
      EXPECT_LE(rel_error(got, g.ref[i].to_doubles()), 2e-5)
          << "causal " << causal << " gradient " << i;
    }
    const std::vector<double> dq = g.fast[0].to_doubles();
    for (int64_t i = cq[1] * hq * d; i < cq[2] * hq * d; ++i)
      ASSERT_EQ(dq[i], 0.0) << "causal " << causal << " dq element " << i;
  }
}

// The softmax family and the normalized kernel need the forward's row statistic.
TEST(BackwardRowStat, MissingIsRefused) {
  for (const char* mech : {"causal", "sink", "kernel_softplus"}) {
    CheckOptions opt;
    opt.dims = {1, 2, 2, 16, 16, 8, 8};
    Instance inst;
    ASSERT_EQ(make_instance(mech, opt, inst), "");
    Outputs o = make_outputs(inst, false);
    OwnedTensor go = make_grad_out(inst);
    OwnedTensor dq = OwnedTensor::zeros(DType::kF32, {1, 2, 16, 8});
    OwnedTensor dk = OwnedTensor::zeros(DType::kF32, {1, 2, 16, 8});
    OwnedTensor dv = OwnedTensor::zeros(DType::kF32, {1, 2, 16, 8});
    const Status s = attention_backward(inst.q.view, inst.k.view, inst.v.view, o.out.view, {},
                                        go.view, inst.spec, {dq.view, dk.view, dv.view});
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << mech << ": " << s.message();
    EXPECT_NE(s.message().find("row_stat"), std::string::npos) << s.message();
  }
}

}  // namespace
}  // namespace attnkit::tools
