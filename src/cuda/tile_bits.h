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

// The backward's 32 scores of a thread (key rows r = 0, 1; query columns c8 * 8 + col0 + e of
// a 64-query tile): bit r * 16 + 2 * c8 + e is set where the column is below q_lim (= nq - m0 -
// col0, the queries left in the sequence from the thread's first column).
ATTNKIT_HD uint32_t query_bits(int q_lim) {
  if (q_lim >= 64) return 0xFFFFFFFFu;
  if (q_lim <= 0) return 0u;
  const int full = q_lim >> 3, rem = q_lim & 7;  // whole 8-column chunks, then the next one's
  uint32_t low = (1u << (2 * full)) - 1u;
  if (rem >= 1) low |= 1u << (2 * full);
  if (rem >= 2) low |= 2u << (2 * full);
  return low | (low << 16);
}

}  // namespace attnkit::cuda
