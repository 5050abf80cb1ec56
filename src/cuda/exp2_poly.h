// 2^x on the FMA and integer pipes, host and device: the forward's softmax takes some of its
// exponentials here so that the special-function unit (16 results a cycle a multiprocessor,
// one warp's 64 exp2s a tile: 512 cycles of its quarter) is not the normalization's bound.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "attnkit/variant/common.h"

namespace attnkit::cuda {

// x's bits as a To (memcpy: device code has it too, and both compilers make it a move).
template <class To, class From>
ATTNKIT_HD To bit_copy(From x) {
  static_assert(sizeof(To) == sizeof(From));
  To y;
  memcpy(&y, &x, sizeof y);
  return y;
}

// 2^x = 2^k 2^f with k = round(x) and f = x - k in [-1/2, 1/2]: k from adding 1.5 * 2^23 (the
// sum's low mantissa bits are k, two's complement), 2^f from a cubic (relative error 1.02e-4,
// below the 16-bit rounding of P: up to 2^-8 in bf16, 2^-11 in fp16), and k added to the
// cubic's exponent field. x is clamped to -127 first: 2^-127 comes out exactly 0 (f = 0, the
// cubic's 1.0 with a zero exponent field), so -inf (a masked score) weighs 0 as on the MUFU,
// and inputs between -127 and -126 give subnormals (not exact ones, never negative). Eight
// instructions and no conversion (conversions run at the MUFU's 16 a cycle a multiprocessor).
// For x < 127.5 (the softmax's are <= 0): past it the exponent field overflows. NaN gives 0
// where the MUFU would give NaN.
ATTNKIT_HD float exp2_poly(float x) {
  constexpr float kRound = 12582912.f;  // 1.5 * 2^23
  x = x > -127.f ? x : -127.f;          // NaN too
  const float t = x + kRound;
  const float f = x - (t - kRound);
  const float p = fmaf(fmaf(fmaf(0.0550085790f, f, 0.242210373f), f, 0.693282902f), f, 1.f);
  return bit_copy<float>(bit_copy<uint32_t>(p) + (bit_copy<uint32_t>(t) << 23));
}

}  // namespace attnkit::cuda
