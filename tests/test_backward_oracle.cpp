// The float64 backward oracle against central finite differences of the float64 forward oracle,
// for every mechanism and every gradient it has, on tiny shapes (GQA, Nq != Nk, odd sizes).
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "core/convert.h"
#include "spec_json.h"

namespace attnkit::tools {
namespace {

// Loss L = sum(grad_out * out) of the float64 forward oracle.
double loss(const Instance& inst, const OwnedTensor& grad_out) {
  OwnedTensor out =
      OwnedTensor::zeros(DType::kF64, {inst.dims.batch, inst.dims.hq, inst.dims.nq, inst.dims.dv});
  EXPECT_TRUE(reference_forward(inst.q.view, inst.k.view, inst.v.view, inst.spec, out.view).ok());
  const std::vector<double> o = out.to_doubles(), g = grad_out.to_doubles();
  double l = 0;
  for (size_t i = 0; i < o.size(); ++i) l += o[i] * g[i];
  return l;
}

// Central difference of the loss in element `idx` of tensor t (fp64 or fp32); the step is the
// exact difference of the two perturbed values.
double numeric(Instance& inst, OwnedTensor& t, int64_t idx, const OwnedTensor& grad_out) {
  const double x = core::load_as_double(t.bytes.data(), t.view.dtype, idx), h = 1e-3;
  core::store_from_double(t.bytes.data(), t.view.dtype, idx, x + h);
  const double up = core::load_as_double(t.bytes.data(), t.view.dtype, idx);
  const double lp = loss(inst, grad_out);
  core::store_from_double(t.bytes.data(), t.view.dtype, idx, x - h);
  const double dn = core::load_as_double(t.bytes.data(), t.view.dtype, idx);
  const double lm = loss(inst, grad_out);
  core::store_from_double(t.bytes.data(), t.view.dtype, idx, x);
  return (lp - lm) / (up - dn);
}

struct Case {
  std::string mech;
  Dims dims;
};

void PrintTo(const Case& c, std::ostream* os) {
  *os << c.mech << " nq=" << c.dims.nq << " nk=" << c.dims.nk;
}

class BackwardOracle : public ::testing::TestWithParam<Case> {};

TEST_P(BackwardOracle, MatchesFiniteDifferences) {
  const Case& c = GetParam();
  CheckOptions opt;
  opt.dtype = DType::kF64;
  opt.dims = c.dims;
  opt.seed = 3;
  Instance inst;
  ASSERT_EQ(make_instance(c.mech, opt, inst), "");
  // Learnable forms of the scalar and default parameters.
  OwnedTensor slopes;
  if (inst.spec.mods.alibi != AlibiMode::kOff) {
    std::vector<double> m(c.dims.hq);
    for (int64_t h = 0; h < c.dims.hq; ++h) m[h] = 0.3 + 0.1 * h;
    slopes = OwnedTensor::from_doubles(m, DType::kF32, {c.dims.hq});
    inst.spec.mods.alibi_slopes = slopes.view;
  }
  if (inst.spec.normalizer.kind == NormalizerKind::kSigmoid) inst.spec.normalizer.beta = -0.7f;
  if (inst.spec.mods.bias.defined()) {  // a bias in fp64, broadcast over the batch
    inst.extras["bias"] = random_tensor(DType::kF64, {1, c.dims.hq, c.dims.nq, c.dims.nk}, 1.0, 5);
    inst.spec.mods.bias = inst.extras["bias"].view;
  }
  const Dims& d = c.dims;
  OwnedTensor grad_out = random_tensor(DType::kF64, {d.batch, d.hq, d.nq, d.dv}, 1.0, 77);

  AttentionGrads g;
  std::map<std::string, OwnedTensor> grads;
  auto want = [&](const std::string& name, OwnedTensor& input, TensorView* slot) {
    std::vector<int64_t> shape(input.view.shape, input.view.shape + input.view.ndim);
    grads[name] = OwnedTensor::zeros(DType::kF64, shape);
    *slot = grads[name].view;
  };
  want("q", inst.q, &g.dq);
  want("k", inst.k, &g.dk);
  want("v", inst.v, &g.dv);
  std::vector<std::pair<std::string, OwnedTensor*>> params = {
      {"q", &inst.q}, {"k", &inst.k}, {"v", &inst.v}};
  const std::pair<const char*, TensorView*> extra_slots[] = {
      {"bias", &g.dbias},          {"u", &g.dlow_rank_u},
      {"w", &g.dlow_rank_w},       {"table", &g.drelative_table},
      {"log_f", &g.dforget_log_f}, {"sinks", &g.dsinks},
      {"gain", &g.drela_gain},     {"gate", &g.dgate}};
  for (const auto& [name, slot] : extra_slots)
    if (inst.extras.count(name)) {
      want(name, inst.extras[name], slot);
      params.emplace_back(name, &inst.extras[name]);
    }
  if (slopes.view.defined()) {
    want("slopes", slopes, &g.dalibi_slopes);
    params.emplace_back("slopes", &slopes);
  }
  OwnedTensor dbeta;
  if (inst.spec.normalizer.kind == NormalizerKind::kSigmoid) {
    dbeta = OwnedTensor::zeros(DType::kF64, {1});
    g.dbeta = dbeta.view;
  }
  const Status s =
      reference_backward(inst.q.view, inst.k.view, inst.v.view, grad_out.view, inst.spec, g);
  ASSERT_TRUE(s.ok()) << s.message();

  std::mt19937_64 rng(9);
  for (auto& [name, t] : params) {
    const std::vector<double> analytic = grads[name].to_doubles();
    double scale = 1e-3;
    for (double a : analytic) scale = std::max(scale, std::abs(a));
    const int64_t n = t->view.numel();
    for (int sample = 0; sample < 10; ++sample) {
      const int64_t idx = static_cast<int64_t>(rng() % n);
      const double num = numeric(inst, *t, idx, grad_out);
      ASSERT_NEAR(analytic[idx], num, 2e-5 * scale + 1e-7)
          << c.mech << " d" << name << "[" << idx << "]";
    }
  }
  if (dbeta.view.defined()) {
    const double b0 = *inst.spec.normalizer.beta, h = 1e-3;
    inst.spec.normalizer.beta = static_cast<float>(b0 + h);
    const double up = *inst.spec.normalizer.beta, lp = loss(inst, grad_out);
    inst.spec.normalizer.beta = static_cast<float>(b0 - h);
    const double dn = *inst.spec.normalizer.beta, lm = loss(inst, grad_out);
    EXPECT_NEAR(dbeta.to_doubles()[0], (lp - lm) / (up - dn), 1e-4) << "dbeta";
  }
}

std::vector<Case> cases() {
  std::vector<Case> out;
  const Dims shapes[] = {{2, 4, 2, 12, 12, 5, 3}, {1, 2, 1, 5, 9, 4, 6}};
  for (const std::string& m : mechanism_names())
    for (const Dims& d : shapes)
      if (!mechanism_spec(m, d).is_null()) out.push_back({m, d});
  return out;
}

INSTANTIATE_TEST_SUITE_P(All, BackwardOracle, ::testing::ValuesIn(cases()), [](const auto& info) {
  return info.param.mech + "_nq" + std::to_string(info.param.dims.nq) + "_nk" +
         std::to_string(info.param.dims.nk);
});

// Bad gradient arguments are named, never run.
TEST(BackwardOracleErrors, BadGradients) {
  CheckOptions opt;
  opt.dtype = DType::kF64;
  opt.dims = {1, 2, 1, 6, 6, 4, 4};
  Instance inst;
  ASSERT_EQ(make_instance("causal", opt, inst), "");
  OwnedTensor go = random_tensor(DType::kF64, {1, 2, 6, 4}, 1.0, 1);
  OwnedTensor dq = OwnedTensor::zeros(DType::kF64, {1, 2, 6, 4});
  OwnedTensor dk = OwnedTensor::zeros(DType::kF64, {1, 1, 6, 4});
  OwnedTensor dv = OwnedTensor::zeros(DType::kF64, {1, 1, 6, 4});
  OwnedTensor wrong = OwnedTensor::zeros(DType::kF64, {1, 2, 6, 4});
  OwnedTensor half = OwnedTensor::zeros(DType::kBF16, {1, 1, 6, 4});
  OwnedTensor extra = OwnedTensor::zeros(DType::kF64, {2});
  struct Bad {
    const char* what;
    AttentionGrads g;
    const char* message;
  };
  const AttentionGrads ok{dq.view, dk.view, dv.view};
  std::vector<Bad> bad = {{"no dk", {dq.view, {}, dv.view}, "dk is missing"},
                          {"dk shaped like q", {dq.view, wrong.view, dv.view}, "dk.shape"},
                          {"bf16 dv", {dq.view, dk.view, half.view}, "dv.dtype"}};
  AttentionGrads with_sinks = ok;
  with_sinks.dsinks = extra.view;
  bad.push_back({"dsinks without sinks", with_sinks, "spec has no sinks"});
  AttentionGrads with_beta = ok;
  with_beta.dbeta = OwnedTensor::zeros(DType::kF64, {1}).view;
  bad.push_back({"dbeta with softmax", with_beta, "beta belongs to sigmoid"});
  for (const Bad& b : bad) {
    const Status s =
        reference_backward(inst.q.view, inst.k.view, inst.v.view, go.view, inst.spec, b.g);
    EXPECT_FALSE(s.ok()) << b.what;
    EXPECT_NE(s.message().find(b.message), std::string::npos) << b.what << ": " << s.message();
  }
  OwnedTensor short_go = random_tensor(DType::kF64, {1, 2, 5, 4}, 1.0, 1);
  const Status s =
      reference_backward(inst.q.view, inst.k.view, inst.v.view, short_go.view, inst.spec, ok);
  EXPECT_NE(s.message().find("grad_out.shape"), std::string::npos) << s.message();
  EXPECT_TRUE(
      reference_backward(inst.q.view, inst.k.view, inst.v.view, go.view, inst.spec, ok).ok());
  // An fp32 grad_out 4 bytes into its buffer is aligned for its own elements, not for q's fp64
  // (the oracle's stand-in `out` took its address with q's dtype, and refused it).
  OwnedTensor room = random_tensor(DType::kF32, {1 + 2 * 6 * 4}, 1.0, 2);
  const TensorView go32 =
      TensorView::contiguous(static_cast<float*>(room.view.data) + 1, DType::kF32, {1, 2, 6, 4});
  const Status s32 = reference_backward(inst.q.view, inst.k.view, inst.v.view, go32, inst.spec, ok);
  EXPECT_TRUE(s32.ok()) << s32.message();
}

}  // namespace
}  // namespace attnkit::tools
