// The CUDA backend's backward pass (sm_90a), on a validated problem whose tensors are on a GPU.
#pragma once
#include "attnkit/attention.h"
#include "core/problem.h"

namespace attnkit::cuda {

// Whether the CUDA kernels differentiate this problem; the error names the rule it breaks
// (dtype, head dim not built, a mechanism or gradient not on CUDA yet).
// `deterministic` (Options) is refused: dq is added with atomics.
Status backward_supports(const core::Problem& p, const core::GradOperands& g,
                         const AttentionGrads& grads, bool deterministic);
// dry_run: every check the call makes (the flavor's too), then return before any device work
// (can_run_backward).
Status backward(const core::Problem& p, const core::GradOperands& g, const AttentionGrads& grads,
                bool deterministic, bool dry_run = false);

}  // namespace attnkit::cuda
