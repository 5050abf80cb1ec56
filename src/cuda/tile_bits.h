// A partial tile's element-mask bits (the block table's bit slots: a query row's keys one bit
// each, 32 to a word) gathered into a thread's fragment order, host and device.
#pragma once
#include <algorithm>
#include <cstdint>
#include <initializer_list>

#include "attnkit/variant/common.h"
#include "attnkit/variant/masks.h"

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

// A band's allowed columns x = 8 c + e of a thread (c < kCols / 8, e = 0, 1; lo and hi the
// band's bounds relative to the thread's first column, from tile_bound) as the bits 2 c + e of a
// word W: x rises with the bit index, so they are one run, made in a few instructions where a
// compare pair a column cost 2 kCols / 4. (kmax = 63: 2 << 63 wraps to 0, and 0 - 1 is every bit.)
template <int kCols, class W = uint32_t>
ATTNKIT_HD W band_run_bits(int lo, int hi) {
  constexpr int kBits = kCols / 4;
  static_assert(kBits <= 8 * static_cast<int>(sizeof(W)), "one word a row");
  const int kmin = lo <= 0 ? 0 : 2 * (lo >> 3) + std::min(lo & 7, 2);
  const int kmax = hi < 0 ? -1 : std::min(2 * (hi >> 3) + std::min(hi & 7, 1), kBits - 1);
  if (kmin > kmax) return 0u;
  return static_cast<W>(((uint64_t{2} << kmax) - 1) & ~((uint64_t{1} << kmin) - 1));
}

// Grid tiles (the fast forward's 2-D neighborhood, FwdParams::grid): query tiles are 8 x 16
// patches of the token grid (a tile's row x at patch row x / 16, column x % 16; the patches at
// the last rows and columns of a grid whose extents are not multiples of 8 x 16 reach past it:
// the copy engine fills those queries with zeros, and no one stores their rows); key tiles are
// boxes of key_w columns x 128 / key_w rows (key_w 16 or 32; tile row x at box row x / key_w,
// column x % key_w), placed from the first row and column the patch's windows reach, so a
// query patch visits ceil(rows / box rows) x ceil(columns / key_w) boxes of that union.
inline constexpr int kGridRows = 8, kGridCols = 16;

struct GridShape {
  int h = 0, w = 0;        // the token grid (rows, columns); w = 0: no grid tiles
  int kernel[2] = {1, 1};  // (rows, columns), odd unless causal
  bool causal[2] = {false, false};
  // Key boxes: 8 x 16 or 4 x 32 (rows x columns), set together by with_key_w (the rows are
  // kept, not derived: the kernels read both from the constant bank; a derived one took a
  // register: the d64 grid instance spilled 60 / 56 bytes against 48 / 40).
  int key_w = kGridCols, key_h = kGridRows;
  ATTNKIT_HD GridShape with_key_w(int w) const {
    GridShape g = *this;
    g.key_w = w;
    g.key_h = 128 / w;
    return g;
  }
};

struct GridSpan {
  int lo = 0, hi = 0;  // [lo, hi)
};

// The leaf's window (MaskEval::na_window, dilation 1) of coordinate u on an axis of extent n,
// kernel k, as [lo, hi) in 32-bit arithmetic.
ATTNKIT_HD GridSpan grid_window(int u, int n, int k, bool causal) {
  int lo, hi;
  MaskEval::na_window<int>(u, n, k, 1, causal, &lo, &hi);
  return {lo, hi + 1};
}

// The union of the windows of axis coordinates [u, u + count): windows move monotonically with
// the coordinate, so it runs from the first one's start to the last one's end.
ATTNKIT_HD GridSpan grid_reach(int u, int count, int n, int k, bool causal) {
  return {grid_window(u, n, k, causal).lo, grid_window(u + count - 1, n, k, causal).hi};
}

// The key boxes of the query patch at grid row pr0, column pc0: rows x cols boxes, box (r, c)
// from grid row r0 + r * key_h, column c0 + c * key_w (boxes may reach past the grid:
// the copy engine fills those keys with zeros and grid_words masks them).
struct GridKeys {
  int r0 = 0, c0 = 0, rows = 0, cols = 0;
};
ATTNKIT_HD GridKeys grid_keys(const GridShape& g, int pr0, int pc0) {
  // (a patch at the grid's last rows or columns reaches from its queries inside the grid)
  const int qh = g.h - pr0 < kGridRows ? g.h - pr0 : kGridRows;
  const int qw = g.w - pc0 < kGridCols ? g.w - pc0 : kGridCols;
  const GridSpan r = grid_reach(pr0, qh, g.h, g.kernel[0], g.causal[0]);
  const GridSpan c = grid_reach(pc0, qw, g.w, g.kernel[1], g.causal[1]);
  // (ceiling divisions by powers of two as shifts: kernels run this once an item)
  const int wide = g.key_w == 32;
  return {r.lo, c.lo, (r.hi - r.lo + g.key_h - 1) >> (3 - wide),
          (c.hi - c.lo + g.key_w - 1) >> (4 + wide)};
}

// The key boxes' width (16, or 32 where the grid has 32 columns) with the fewest boxes over
// the grid's query patches, or `forced` where it is one of those (host only). A patch's
// count is its rows' count times its columns', so the total is the product of the two sums;
// ties keep 16 (the query patch's shape).
inline int grid_key_width(const GridShape& shape, int forced = 0) {
  int best = kGridCols;
  int64_t best_boxes = -1;
  for (int w : {16, 32}) {
    if (w > shape.w || (w != forced && (forced == 16 || forced == 32))) continue;
    const GridShape g = shape.with_key_w(w);
    int64_t rows = 0, cols = 0;
    for (int r = 0; r < g.h; r += kGridRows) rows += grid_keys(g, r, 0).rows;
    for (int c = 0; c < g.w; c += kGridCols) cols += grid_keys(g, 0, c).cols;
    if (best_boxes < 0 || rows * cols < best_boxes) best = w, best_boxes = rows * cols;
  }
  return best;
}

// The token of grid query (qr, qc), or `none` where it lies past the grid (a partial patch's
// rows that no one stores).
ATTNKIT_HD int grid_token(const GridShape& g, int qr, int qc, int none) {
  return qr < g.h && qc < g.w ? qr * g.w + qc : none;
}

// Whether grid tiles beat the block table for this grid: its patches hold at least a quarter as
// many queries as their rows (a grid narrower than a patch leaves most of each empty). Run 120,
// H100, 8192 tokens, 5 x 5: grid tiles 1.46x / 1.79x / 2.06x faster than the table built per
// call at 6 / 8 / 10 of a patch's 16 columns; a quarter (4 columns) extrapolates to ~1.1x.
inline bool grid_tiles_worth_it(const GridShape& g) {
  const int64_t patches =
      int64_t{(g.h + kGridRows - 1) / kGridRows} * ((g.w + kGridCols - 1) / kGridCols);
  return 4 * int64_t{g.h} * g.w >= patches * kGridRows * kGridCols;
}

// A thread's window tests against the key box at grid row kr, column kc as the bits of two
// words, one for each of its queries (qr, qc) and (qr, qc + 8): bit 2 c + e for score c * 4 +
// 2 q + e (tile column c * 8 + col0 + e, col0 = 2 * (lane % 4)), the tabled tiles' layout. A
// box row's key columns make a word of bits, quad_bits takes the thread's; the product with a
// 1 a row repeats them over the allowed rows (key_w / 4 bits a box row: no carries).
ATTNKIT_HD void grid_words(const GridShape& g, int qr, int qc, int kr, int kc, int col0,
                           uint32_t (&allow)[2]) {
  const int kw = g.key_w, kh = g.key_h, step = kw / 4;
  const auto clip = [](int x, int n) { return x < 0 ? 0 : (x > n ? n : x); };
  const GridSpan wr = grid_window(qr, g.h, g.kernel[0], g.causal[0]);
  const int lr = clip(wr.lo - kr, kh), hr = clip(wr.hi - kr, kh);
  const uint32_t ones = kw == 16 ? 0x11111111u : 0x01010101u;
  const uint32_t rows = lr < hr ? (ones >> (step * (kh - hr))) & (ones << (step * lr)) : 0u;
  const auto word = [&](int c) {
    const GridSpan wc = grid_window(c, g.w, g.kernel[1], g.causal[1]);
    const int lo = clip(wc.lo - kc, kw), hi = clip(wc.hi - kc, kw);
    const uint32_t cols = lo < hi ? (0xFFFFFFFFu >> (32 - hi)) & (0xFFFFFFFFu << lo) : 0u;
    return quad_bits(cols, col0) * rows;
  };
  allow[0] = word(qc);
  allow[1] = word(qc + 8);
}

}  // namespace attnkit::cuda
