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
// Normalized-kernel weight f(s)^p (0 for s = -inf).
template <class T>
ATTNKIT_HD T kernel_weight(T s, KernelFeature f, T power) {
  const T fx = f == KernelFeature::kSoftplus ? softplus(s) : (s > 0 ? s : T(0));
  if (fx <= 0) return T(0);
  return power == T(1) ? fx : power == T(2) ? fx * fx : std::pow(fx, power);
}
// The length scale of the normalized kernel: log(n_i) for a row with n_i allowed keys.
template <class T>
ATTNKIT_HD T length_scale(int64_t allowed_keys) {
  return allowed_keys > 1 ? std::log(static_cast<T>(allowed_keys)) : T(0);
}

}  // namespace attnkit
