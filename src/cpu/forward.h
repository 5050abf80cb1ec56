// CPU forward pass (src/cpu/forward.cc): tiled online-softmax attention over a BlockMask.
#pragma once
#include <string>

#include "core/problem.h"

namespace attnkit::cpu {

Status forward(const core::Problem& p);
// The SIMD target the dispatcher picks on this machine (e.g. "AVX2").
std::string simd_target();

}  // namespace attnkit::cpu
