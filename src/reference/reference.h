// The oracle's internal entry: the exact float64 computation (rounding = kF64), or the naive
// low-precision one that DESIGN.md's tolerance rule compares against (rounding = the input
// dtype). The public reference_forward() is the exact one.
#pragma once
#include "attnkit/attention.h"

namespace attnkit::reference {

Status forward(const TensorView& q, const TensorView& k, const TensorView& v,
               const AttentionSpec& spec, const TensorView& out, const TensorView& row_stat,
               const AttentionStats& stats, DType rounding);

}  // namespace attnkit::reference
