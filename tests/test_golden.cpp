// Every case of shared/golden/attention_tier1.json (an independent float64 NumPy reading of
// MECHANISMS.md) through the float64 oracle and through the public API's fp32 CPU path.
#include <gtest/gtest.h>

#include <fstream>

#include "spec_json.h"

namespace attnkit::tools {
namespace {

const json& golden() {
  static const json j = [] {
    std::ifstream f(ATTNKIT_TEST_DATA "/attention_tier1.json");
    return json::parse(f);
  }();
  return j;
}

std::vector<double> numbers(const json& x) {
  std::vector<double> v;
  for (const json& e : x.at("data"))
    v.push_back(e.is_string() ? (e == "-inf" ? -INFINITY : INFINITY) : e.get<double>());
  return v;
}
// Inputs are float32 values written as their shortest decimals: read them as float32.
std::vector<double> floats(const json& x) {
  std::vector<double> v = numbers(x);
  for (double& e : v) e = static_cast<float>(e);
  return v;
}
std::vector<int64_t> shape(const json& x) { return x.at("shape").get<std::vector<int64_t>>(); }

Instance load_case(const json& c, DType dtype) {
  Instance inst;
  inst.dtype = dtype;
  auto sq = shape(c.at("q")), sk = shape(c.at("k")), sv = shape(c.at("v"));
  inst.dims = {sq[0], sq[1], sk[1], sq[2], sk[2], sq[3], sv[3]};
  inst.q = OwnedTensor::from_doubles(floats(c.at("q")), dtype, sq);
  inst.k = OwnedTensor::from_doubles(floats(c.at("k")), dtype, sk);
  inst.v = OwnedTensor::from_doubles(floats(c.at("v")), dtype, sv);
  const std::string err = build_spec(
      c.at("spec"), inst, [&](const std::string& name, const std::vector<int64_t>& want) {
        const json& e = c.at(name);
        if (name != "bias") {  // a bias may broadcast
          EXPECT_EQ(shape(e), want) << name;
        }
        return OwnedTensor::from_doubles(numbers(e), DType::kF32, shape(e));
      });
  EXPECT_EQ(err, "");
  return inst;
}

// max |x - ref| / max(1, |ref|)
double max_rel_error(const std::vector<double>& x, const std::vector<double>& ref) {
  double m = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    if (std::isinf(ref[i]) && x[i] == ref[i]) continue;
    const double e = std::abs(x[i] - ref[i]) / std::max(1.0, std::abs(ref[i]));
    m = std::isnan(e) ? INFINITY : std::max(m, e);
  }
  return m;
}

class Golden : public ::testing::TestWithParam<int> {};

void check_against(const json& c, bool reference) {
  // The oracle runs on float64 tensors (the float32 inputs widened), the CPU path on float32.
  Instance inst = load_case(c, reference ? DType::kF64 : DType::kF32);
  Outputs o = make_outputs(inst, true);
  const AttentionStats st = stats_views(o);
  const Status s = reference ? reference_forward(inst.q.view, inst.k.view, inst.v.view, inst.spec,
                                                 o.out.view, o.row_stat.view, st)
                             : attention_forward(inst.q.view, inst.k.view, inst.v.view, inst.spec,
                                                 o.out.view, o.row_stat.view, st);
  ASSERT_TRUE(s.ok()) << s.message();
  // The oracle agrees to the 12 digits of the file; the fp32 path to fp32 accuracy.
  const double tol = reference ? 1e-9 : 2e-6;
  const std::vector<double> out = o.out.to_doubles(), want = numbers(c.at("out"));
  for (double x : out) ASSERT_FALSE(std::isnan(x));
  EXPECT_LE(rel_error(out, want), tol) << "out";
  EXPECT_LE(max_abs_error(out, want), 10 * tol) << "out max abs";
  if (c.contains("lse")) {
    const std::vector<double> lse = o.row_stat.to_doubles(), wl = numbers(c.at("lse"));
    EXPECT_LE(max_rel_error(lse, wl), reference ? 1e-6 : 1e-5) << "lse (fp32 output)";
  }
  if (c.contains("stats")) {
    const json& gs = c.at("stats");
    // Statistics are fp32 outputs for both paths; the fp32 path's scores carry an absolute
    // error that grows with the logits (fp32 eps times max |s|).
    const std::vector<double> rm = numbers(gs.at("row_max"));
    double big = 1;
    for (double x : rm) big = std::isfinite(x) ? std::max(big, std::abs(x)) : big;
    const double stol = reference ? 1e-6 : 2e-5 + 2e-7 * big;
    EXPECT_LE(max_rel_error(o.row_max.to_doubles(), numbers(gs.at("row_max"))), 1e-6) << "row_max";
    EXPECT_LE(max_rel_error(o.entropy.to_doubles(), numbers(gs.at("entropy"))),
              reference ? 1e-6 : 2e-5)
        << "entropy";
    EXPECT_LE(max_rel_error(o.col_mass.to_doubles(), numbers(gs.at("col_mass"))), stol)
        << "col_mass";
  }
}

TEST_P(Golden, Oracle) { check_against(golden().at("cases").at(GetParam()), true); }
TEST_P(Golden, CpuFp32) { check_against(golden().at("cases").at(GetParam()), false); }

INSTANTIATE_TEST_SUITE_P(Tier1, Golden, ::testing::Range(0, 49), [](const auto& info) {
  std::string n = golden().at("cases").at(info.param).at("name");
  for (char& ch : n)
    if (!isalnum(static_cast<unsigned char>(ch))) ch = '_';
  return n;
});

TEST(GoldenFile, HasEveryCase) { EXPECT_EQ(golden().at("cases").size(), 49u); }

}  // namespace
}  // namespace attnkit::tools
