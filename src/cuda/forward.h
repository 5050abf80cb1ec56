// The CUDA backend's forward pass (sm_90a), on a validated problem whose tensors are on a GPU.
#pragma once
#include <string>
#include <vector>

#include "core/problem.h"

namespace attnkit::cuda {

// Whether the CUDA kernels run this problem; the error names the rule it breaks (dtype, head dim
// not built, alignment, a feature not on CUDA yet).
Status forward_supports(const core::Problem& p);
Status forward(const core::Problem& p);

// The (head_dim, head_dim_v) pairs and dtypes this build instantiated.
std::vector<std::pair<int, int>> built_head_dims();
std::vector<std::string> built_dtypes();

}  // namespace attnkit::cuda
