// The CUDA backend's forward pass (sm_90a), on a validated problem whose tensors are on a GPU.
#pragma once
#include <string>
#include <vector>

#include "core/problem.h"

namespace attnkit::cuda {

// Whether the CUDA kernels run this problem; the error names the rule it breaks (dtype, head dim
// not built, alignment, a feature not on CUDA yet).
Status forward_supports(const core::Problem& p);
// dry_run: every check the call makes (the flavor's too: a block table's key tiles, the copy
// engine's strides, the query tiles' count), then return before any device work (can_run).
Status forward(const core::Problem& p, bool dry_run = false);

// The (head_dim, head_dim_v) pairs and dtypes this build instantiated.
std::vector<std::pair<int, int>> built_head_dims();
std::vector<std::string> built_dtypes();

}  // namespace attnkit::cuda
