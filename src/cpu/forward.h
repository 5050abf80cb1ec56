// CPU forward pass (src/cpu/forward.cc): tiled online-softmax attention over a BlockMask.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/problem.h"

namespace attnkit::cpu {

Status forward(const core::Problem& p);
// The SIMD target the dispatcher picks on this machine (e.g. "AVX2").
std::string simd_target();
// The Highway targets compiled into the CPU kernels that this CPU can run (tests force each).
std::vector<int64_t> simd_targets();

}  // namespace attnkit::cpu
