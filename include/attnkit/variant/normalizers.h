// Normalizer definitions (MECHANISMS.md 1.3) as scalar functions shared by every backend.
// The fast kernels implement the same formulas on vectors; the reference calls these.
#pragma once
#include <cmath>

#include "attnkit/spec.h"
#include "attnkit/variant/common.h"

namespace attnkit {

// log(1 + exp(x)) without overflow.
template <class T>
ATTNKIT_HD T softplus(T x) {
  return (x > 0 ? x : T(0)) + std::log1p(std::exp(-(x > 0 ? x : -x)));
}
template <class T>
ATTNKIT_HD T sigmoid(T x) {
  return x >= 0 ? T(1) / (T(1) + std::exp(-x)) : std::exp(x) / (T(1) + std::exp(x));
}
// log f(s) of the kernel's feature (-inf where f(s) = 0): the normalized kernel runs as a softmax
// over p log f(s), so that no row's weights underflow or overflow (MECHANISMS.md 1.3's weights
// are exp of these). Below s = -16, where softplus(s) leaves fp32's normal range, log softplus(s)
// = s - e^s / 2 + 5/24 e^2s - ... (the dropped term is under an ulp of s in double).
template <class T>
ATTNKIT_HD T log_kernel_feature(T s, KernelFeature f) {
  if (f == KernelFeature::kSoftplus)
    return s < T(-16) ? s - std::exp(s) / 2 : std::log(softplus(s));
  return s > 0 ? std::log(s) : -INFINITY;
}
// d log f(s) / ds: sigmoid(s) / softplus(s), or 1 / s for ReLU (0 where f(s) = 0).
template <class T>
ATTNKIT_HD T dlog_kernel_feature(T s, KernelFeature f) {
  if (f == KernelFeature::kSoftplus)
    return s < T(-16) ? 1 - std::exp(s) / 2 : sigmoid(s) / softplus(s);
  return s > 0 ? 1 / s : T(0);
}
// The length scale of the normalized kernel: log(n_i) for a row with n_i allowed keys.
template <class T>
ATTNKIT_HD T length_scale(int64_t allowed_keys) {
  return allowed_keys > 1 ? std::log(static_cast<T>(allowed_keys)) : T(0);
}
// A score times its row's length scale; a -inf score (masked, or an additive -inf) stays -inf
// where the scale is 0 (-inf * 0 would be NaN).
template <class T>
ATTNKIT_HD T length_scaled(T s, T ls) {
  return s == -INFINITY ? s : s * ls;
}

}  // namespace attnkit
