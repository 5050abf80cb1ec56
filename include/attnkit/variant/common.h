// Shared definitions for the variant policies: host/device qualifiers and named constants.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define ATTNKIT_HD __host__ __device__ __forceinline__
#else
#define ATTNKIT_HD inline
#endif

namespace attnkit {

inline constexpr double kLog2e = 1.4426950408889634;
inline constexpr double kLn2 = 0.6931471805599453;

// Floor division for possibly negative numerators (aligned indices can be negative).
ATTNKIT_HD int64_t floor_div(int64_t a, int64_t b) {
  int64_t q = a / b;
  return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}
ATTNKIT_HD int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
ATTNKIT_HD int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

}  // namespace attnkit
