// Score modification policies (MECHANISMS.md 1.2), resolved for one (batch, query head).
//
// Hook: score(s, i, ia, j) -> s', with i the query index, ia = i' its aligned index and j the
// key index, all within the sequence. Order: additive terms, then softcap. The low-rank bias is
// not a hook on the fast paths: the CPU kernel fuses it as extra head dims of Q and K
// (Q' = [scale q, u], K' = [k, w]); the reference calls it here.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "attnkit/spec.h"
#include "attnkit/variant/common.h"

namespace attnkit {

// T5's relative position bucket of rel = j - i' (MECHANISMS.md 1.2).
ATTNKIT_HD int64_t t5_bucket(int64_t rel, bool bidirectional, int64_t num_buckets,
                             int64_t max_distance) {
  int64_t n = -rel, ret = 0, nb = num_buckets;
  if (bidirectional) {
    nb /= 2;
    ret = n < 0 ? nb : 0;
    n = n < 0 ? -n : n;
  } else {
    n = n > 0 ? n : 0;
  }
  const int64_t e = nb / 2;
  if (n < e) return ret + n;
  const double x = std::log(static_cast<double>(n) / static_cast<double>(e)) /
                   std::log(static_cast<double>(max_distance) / static_cast<double>(e)) *
                   static_cast<double>(nb - e);
  const int64_t large = e + static_cast<int64_t>(x);
  return ret + (large < nb - 1 ? large : nb - 1);
}

// Default ALiBi slope of query head h among H: 2^(-8 (h + 1) / H).
ATTNKIT_HD double alibi_default_slope(int64_t h, int64_t num_heads) {
  return std::exp2(-8.0 * static_cast<double>(h + 1) / static_cast<double>(num_heads));
}

// One element of a floating-point tensor as T (fp32, fp64, bf16, fp16).
template <class T>
ATTNKIT_HD T load_float(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::kF32:
      return static_cast<T>(static_cast<const float*>(p)[i]);
    case DType::kF64:
      return static_cast<T>(static_cast<const double*>(p)[i]);
    case DType::kBF16: {
      const uint32_t u = static_cast<uint32_t>(static_cast<const uint16_t*>(p)[i]) << 16;
      float f;
      std::memcpy(&f, &u, 4);
      return static_cast<T>(f);
    }
    case DType::kF16: {
      const uint16_t h = static_cast<const uint16_t*>(p)[i];
      const int e = (h >> 10) & 0x1f, m = h & 0x3ff;
      const double mag = e == 0    ? std::ldexp(static_cast<double>(m), -24)
                         : e == 31 ? (m ? NAN : INFINITY)
                                   : std::ldexp(static_cast<double>(m | 0x400), e - 25);
      return static_cast<T>((h & 0x8000) ? -mag : mag);
    }
    default:
      return T(0);
  }
}

// One (batch, query head) of ScoreMods, with tensors resolved to row pointers.
template <class T>
struct ScoreModEval {
  T softcap = 0;
  AlibiMode alibi = AlibiMode::kOff;
  T slope = 0;
  const void* bias = nullptr;  // this (b, h) of the bias: element i * bias_si + j * bias_sj
  DType bias_dtype = DType::kF32;
  int64_t bias_si = 0, bias_sj = 0;
  const T* u = nullptr;  // low-rank: u[i * u_stride + r], w[j * w_stride + r]
  const T* w = nullptr;
  int64_t rank = 0, u_stride = 0, w_stride = 0;
  RelativeBucketKind relative = RelativeBucketKind::kOff;
  const T* table = nullptr;            // this head's row of the relative table
  const int32_t* bucket_of = nullptr;  // bucket of rel = j - i', indexed by rel + bucket_origin
  int64_t bucket_origin = 0;
  // Without a bucket_of table (the CUDA kernels) the bucket is computed from the definition.
  bool bidirectional = true;
  int64_t num_buckets = 0, max_distance = 0, clip = 0;
  // c = cumsum(log f) over key positions, in float64 whatever T: the term c[i'] - c[j] is the
  // difference of two sums that grow with the row (in fp32 it lost ~ulp(|c|)).
  const double* forget_c = nullptr;

  ATTNKIT_HD T score(T s, int64_t i, int64_t ia, int64_t j) const {
    return cap(additive(s, i, ia, j));
  }
  // The softcap alone (the last step), and its derivative d cap(t) / dt.
  ATTNKIT_HD T cap(T t) const { return softcap != 0 ? softcap * std::tanh(t / softcap) : t; }
  ATTNKIT_HD T cap_grad(T t) const {
    if (softcap == 0) return T(1);
    const T th = std::tanh(t / softcap);
    return T(1) - th * th;
  }
  // The relative-position bucket of rel = j - i' (MECHANISMS.md 1.2).
  ATTNKIT_HD int64_t bucket(int64_t rel) const {
    if (relative == RelativeBucketKind::kT5)
      return t5_bucket(rel, bidirectional, num_buckets, max_distance);
    return (rel < -clip ? -clip : rel > clip ? clip : rel) + clip;
  }
  // Whether any additive term is present (the fast paths skip the element loop otherwise).
  ATTNKIT_HD bool has_additive() const {
    return bias || u || alibi != AlibiMode::kOff || relative != RelativeBucketKind::kOff ||
           forget_c;
  }
  // Every additive term (bias, low-rank bias, ALiBi, relative buckets, forget gate).
  ATTNKIT_HD T additive(T s, int64_t i, int64_t ia, int64_t j) const {
    if (bias) s += load_float<T>(bias, bias_dtype, i * bias_si + j * bias_sj);
    if (u) {
      T acc = 0;
      for (int64_t r = 0; r < rank; ++r) acc += u[i * u_stride + r] * w[j * w_stride + r];
      s += acc;
    }
    if (alibi == AlibiMode::kCausal) s -= slope * static_cast<T>(ia - j);
    if (alibi == AlibiMode::kSymmetric) s -= slope * static_cast<T>(ia > j ? ia - j : j - ia);
    if (relative != RelativeBucketKind::kOff)
      s += table[bucket_of ? bucket_of[j - ia + bucket_origin] : bucket(j - ia)];
    if (forget_c) s += static_cast<T>(forget_c[ia] - forget_c[j]);
    return s;
  }
};

}  // namespace attnkit
