// A partial tile's element-mask bits (the block table's bit slots: a query row's keys one bit
// each, 32 to a word) gathered into a thread's fragment order, host and device.
#pragma once
#include <cstdint>

#include "attnkit/variant/common.h"

namespace attnkit::cuda {

// Of one 32-key word, the thread's keys (c % 4) * 8 + col0 + e (col0 = 2 * (lane % 4), c = 0..3,
// e = 0..1) as bits 2 * c + e: each byte's two low bits after the shift by col0, packed. A loop
// over the keys indexed the words by col0 at run time, and the words went to local memory.
ATTNKIT_HD uint32_t quad_bits(uint32_t word, int col0) {
  const uint32_t v = (word >> col0) & 0x03030303u;
  return (v | (v >> 6) | (v >> 12) | (v >> 18)) & 0xFFu;
}

}  // namespace attnkit::cuda
