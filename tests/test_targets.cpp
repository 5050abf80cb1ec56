// Every compiled SIMD target of the CPU kernels that this machine can run (Highway's forced
// targets), against the float64 oracle: each mechanism once, with statistics, odd sizes.
#include <gtest/gtest.h>
#include <hwy/targets.h>

#include <cstdio>

#include "attnkit/registry.h"
#include "cpu/forward.h"
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
    for (const std::string& m : mechanism_names()) {
      CheckOptions opt;
      opt.dims = {1, 4, 2, 81, 81, 40, 24};
      opt.seed = 11;
      if (mechanism_spec(m, opt.dims).is_null()) continue;
      const CheckResult r = check_mechanism(m, opt);
      EXPECT_TRUE(r.ok) << hwy::TargetName(target) << " " << m << ": " << r.error;
    }
  }
  hwy::SetSupportedTargetsForTest(0);  // back to what the CPU supports
}

}  // namespace
}  // namespace attnkit::tools
