// Scalar dtype conversion (bf16 and fp16 round to nearest even). For packing and the oracle;
// the SIMD kernels convert whole rows with their own vector code.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "attnkit/tensor.h"

namespace attnkit::core {

inline float bf16_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float f16_to_float(uint16_t h) {
  _Float16 x;
  std::memcpy(&x, &h, 2);
  return static_cast<float>(x);
}
inline uint16_t float_to_f16(float f) {
  const _Float16 x = static_cast<_Float16>(f);
  uint16_t h;
  std::memcpy(&h, &x, 2);
  return h;
}

inline double load_as_double(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::kF32:
      return static_cast<const float*>(p)[i];
    case DType::kF64:
      return static_cast<const double*>(p)[i];
    case DType::kBF16:
      return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
    case DType::kF16:
      return f16_to_float(static_cast<const uint16_t*>(p)[i]);
    case DType::kI32:
      return static_cast<const int32_t*>(p)[i];
  }
  return 0;
}
inline void store_from_double(void* p, DType t, int64_t i, double x) {
  switch (t) {
    case DType::kF32:
      static_cast<float*>(p)[i] = static_cast<float>(x);
      break;
    case DType::kF64:
      static_cast<double*>(p)[i] = x;
      break;
    case DType::kBF16:
      static_cast<uint16_t*>(p)[i] = float_to_bf16(static_cast<float>(x));
      break;
    case DType::kF16:
      static_cast<uint16_t*>(p)[i] = float_to_f16(static_cast<float>(x));
      break;
    case DType::kI32:
      static_cast<int32_t*>(p)[i] = static_cast<int32_t>(x);
      break;
  }
}
// f rounded to the nearest fp16 value (ties to even), as a float: the same value as the round trip
// through _Float16, without the library calls that the round trip costs on CPUs compiled without
// F16C (the oracle rounds every product of P V: hundreds of millions of calls).
inline float round_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t a = u & 0x7fffffffu;
  if (a >= 0x7f800000u) return f;  // infinities and NaN
  if (a < 0x38800000u) {           // below 2^-14: fp16's subnormals, multiples of 2^-24
    // f + 0.75 lies in [0.5, 1), where floats are 2^-24 apart: the sum rounds f to its multiple
    // (to nearest even, 0.75 being an even one) and the difference is exact; the sign of a zero
    // kept. (IEEE arithmetic in float: FLT_EVAL_METHOD 0, no -ffast-math.)
    return std::copysign((f + 0.75f) - 0.75f, f);
  }
  u += 0xfffu + ((u >> 13) & 1u);  // 23 -> 10 mantissa bits, ties to even
  u &= ~0x1fffu;
  float r;
  std::memcpy(&r, &u, 4);
  return std::fabs(r) > 65504.f ? std::copysign(std::numeric_limits<float>::infinity(), f) : r;
}

// Rounds x to dtype t and back (what storing in t loses).
inline double round_to(DType t, double x) {
  switch (t) {
    case DType::kF32:
      return static_cast<float>(x);
    case DType::kBF16:
      return bf16_to_float(float_to_bf16(static_cast<float>(x)));
    case DType::kF16:
      return round_f16(static_cast<float>(x));
    default:
      return x;
  }
}

}  // namespace attnkit::core
