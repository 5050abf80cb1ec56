// The public entry points: validate once (src/core), then run on the tensors' backend.
#include "attnkit/attention.h"

#include "core/problem.h"
#include "cpu/backward.h"
#include "cpu/forward.h"
#if defined(ATTNKIT_WITH_CUDA)
#include "cuda/backward.h"
#include "cuda/forward.h"
#endif

namespace attnkit {

Status can_run(const TensorView& q, const TensorView& k, const TensorView& v,
               const AttentionSpec& spec, const TensorView& out, const TensorView& row_stat,
               const AttentionStats& stats, const Options& options) {
  core::Problem p;
  Status s = core::validate_and_resolve(q, k, v, spec, out, row_stat, stats, options, false, &p);
#if defined(ATTNKIT_WITH_CUDA)
  if (s.ok() && p.device == Device::kCUDA) return cuda::forward(p, /*dry_run=*/true);
#endif
  return s;
}

Status attention_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                         const AttentionSpec& spec, const TensorView& out,
                         const TensorView& row_stat, const AttentionStats& stats,
                         const Options& options) {
  core::Problem p;
  Status s = core::validate_and_resolve(q, k, v, spec, out, row_stat, stats, options, false, &p);
  if (!s.ok()) return s;
#if defined(ATTNKIT_WITH_CUDA)
  if (p.device == Device::kCUDA) return cuda::forward(p);
#endif
  return cpu::forward(p);
}

namespace {
Status check_backward_call(const TensorView& q, const TensorView& k, const TensorView& v,
                           const TensorView& out, const TensorView& row_stat,
                           const TensorView& grad_out, const AttentionSpec& spec,
                           const AttentionGrads& grads, const Options& options, core::Problem* p,
                           core::GradOperands* g) {
  Status s = core::validate_and_resolve(q, k, v, spec, out, row_stat, {}, options, false, p);
  if (!s.ok()) return s;
  s = core::validate_grads(*p, q, k, v, grad_out, grads, g);
  if (!s.ok()) return s;
#if defined(ATTNKIT_WITH_CUDA)
  if (p->device == Device::kCUDA)
    return cuda::backward_supports(*p, *g, grads, options.deterministic);
#endif
  auto is16 = [](DType t) { return t == DType::kBF16 || t == DType::kF16; };
  if (is16(g->dq.dtype) || is16(g->dk.dtype) || is16(g->dv.dtype) ||
      (grads.dbias.defined() && is16(grads.dbias.dtype)))
    return Status(StatusCode::kNotImplemented,
                  "cpu backend: 16-bit dq, dk, dv, dbias are written by the CUDA backward only "
                  "(the CPU writes fp32 or fp64)");
  return cpu::backward_supports(*p);
}
}  // namespace

Status can_run_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                        const TensorView& out, const TensorView& row_stat,
                        const TensorView& grad_out, const AttentionSpec& spec,
                        const AttentionGrads& grads, const Options& options) {
  core::Problem p;
  core::GradOperands g;
  Status s = check_backward_call(q, k, v, out, row_stat, grad_out, spec, grads, options, &p, &g);
#if defined(ATTNKIT_WITH_CUDA)
  if (s.ok() && p.device == Device::kCUDA)
    return cuda::backward(p, g, grads, options.deterministic, /*dry_run=*/true);
#endif
  return s;
}

Status attention_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                          const TensorView& out, const TensorView& row_stat,
                          const TensorView& grad_out, const AttentionSpec& spec,
                          const AttentionGrads& grads, const Options& options) {
  core::Problem p;
  core::GradOperands g;
  Status s = check_backward_call(q, k, v, out, row_stat, grad_out, spec, grads, options, &p, &g);
  if (!s.ok()) return s;
#if defined(ATTNKIT_WITH_CUDA)
  if (p.device == Device::kCUDA) return cuda::backward(p, g, grads, options.deterministic);
#endif
  core::zero_padding_grads(p, grads);
  return cpu::backward(p, g, grads);
}

}  // namespace attnkit
