// CPU backward pass (src/cpu/backward.cc): FlashAttention-2-style recompute over a BlockMask.
#pragma once
#include "core/problem.h"

namespace attnkit::cpu {

// Says why the CPU backward cannot run this spec (ok when it can).
Status backward_supports(const core::Problem& p);
Status backward(const core::Problem& p, const core::GradOperands& g, const AttentionGrads& grads);

}  // namespace attnkit::cpu
