// Mask policies (MECHANISMS.md 1.1): which pairs (i, j) are allowed.
//
// Two hooks, used by the float64 reference, the CPU kernels and (later) the CUDA kernels:
//   allowed(node, i, j)     one pair; i is the query index within its sequence, j the key index
//   classify(node, qt, kt)  a whole tile pair: empty, partial or full. It must be conservative
//                           (never empty or full when it is not); the BlockMask builder refines
//                           partial tiles exactly, so "partial" is always a correct answer.
// Position rules use the aligned query index i' = i + offset (offset = Nk - Nq bottom-right).
#pragma once
#include <cstdint>
#include <type_traits>

#include "attnkit/spec.h"
#include "attnkit/variant/common.h"

namespace attnkit {

enum class TileClass : uint8_t { kEmpty = 0, kPartial = 1, kFull = 2 };

// Segment ids of one document mask, resolved to memory (int32, batch stride may be 0).
struct SegmentIds {
  const int32_t* q = nullptr;
  const int32_t* k = nullptr;
  int64_t q_batch_stride = 0, q_stride = 1;
  int64_t k_batch_stride = 0, k_stride = 1;
  int32_t last = 0;  // block attention: the highest query segment id of the batch element
};

// A tile of tokens: `count` tokens, either start..start+count-1 or tokens[0..count).
struct TileTokens {
  const int32_t* tokens = nullptr;
  int64_t start = 0, count = 0;
  int64_t lo = 0, hi = -1;  // min and max token index
  // Optional: the tile's bounding box on a grid of shape box_shape (box_ndim 0: not computed).
  // box_exact: the tile is exactly that box, its tokens in row-major order (grid tilings).
  int box_ndim = 0;
  bool box_exact = false;
  int64_t box_shape[kMaxGridDims] = {1, 1, 1};
  int64_t box_lo[kMaxGridDims] = {0, 0, 0}, box_hi[kMaxGridDims] = {0, 0, 0};
  // Optional: the lowest and highest id of segment tensor s over the tile's tokens at seg[2 s]
  // and seg[2 s + 1] (query ids for a query tile, key ids for a key tile; null: read them).
  const int32_t* seg = nullptr;
  ATTNKIT_HD int64_t at(int64_t t) const { return tokens ? tokens[t] : start + t; }
};

// A block map of one (batch element, query head), resolved to memory.
struct BlockMapView {
  const int32_t* data = nullptr;  // cell (r, c) at data[r * sr + c * sc]
  int64_t sr = 0, sc = 1;
};

// Everything the mask hooks read, for one batch element, query head and sequence.
struct MaskEval {
  const MaskNode* nodes = nullptr;
  const int64_t* globals = nullptr;
  const SegmentIds* segments = nullptr;  // indexed by MaskNode::seg_q
  const BlockMapView* maps = nullptr;    // indexed by MaskNode::map
  int64_t offset = 0;                    // aligned query index i' = i + offset

  ATTNKIT_HD bool is_global(const MaskNode& n, int64_t x) const {
    for (int32_t g = 0; g < n.globals_count; ++g)
      if (globals[n.globals_begin + g] == x) return true;
    return false;
  }
  ATTNKIT_HD int32_t seg_q(const MaskNode& n, int64_t i) const {
    const SegmentIds& s = segments[n.seg_q];
    return s.q[i * s.q_stride];
  }
  ATTNKIT_HD int32_t seg_k(const MaskNode& n, int64_t j) const {
    const SegmentIds& s = segments[n.seg_q];
    return s.k[j * s.k_stride];
  }

  // Per-dimension neighborhood window of NATTEN: the key range [lo, hi] (in coordinates of the
  // query's dilation group) for query coordinate x, in I's arithmetic (int64_t; int for the CUDA
  // forward's grid tiles, grid_window).
  template <class I = int64_t>
  ATTNKIT_HD static void na_window(std::type_identity_t<I> x, std::type_identity_t<I> extent,
                                   std::type_identity_t<I> k, std::type_identity_t<I> dl,
                                   bool causal, I* lo, I* hi) {
    const auto max = [](I a, I b) { return a > b ? a : b; };
    // dl == 1 (the common case) needs no division.
    const I g = dl == 1 ? 0 : x % dl, u = dl == 1 ? x : x / dl;
    const I len = dl == 1 ? extent : (extent - g + dl - 1) / dl;
    if (causal) {
      *lo = max(0, u - k + 1);
      *hi = u;
    } else {
      const I a = max(u - k / 2, 0), b = max(len - k, 0);
      *lo = a < b ? a : b;
      *hi = *lo + k - 1;
    }
  }
  // A neighborhood's test per dim in a query half (the query's dilation group g and its key
  // window [lo, hi] in group coordinates) and a key half (the key's group g and index u in it):
  // allowed where the groups match and lo <= u <= hi. NaSide holds a token's half for every dim,
  // so that the CUDA bits pass computes a row's once a block and a key's once a word.
  ATTNKIT_HD static void na_query_dim(const MaskNode& n, int d, int64_t x, int64_t* g, int64_t* lo,
                                      int64_t* hi) {
    const int64_t dl = n.dilation[d];
    *g = dl == 1 ? 0 : x % dl;
    na_window(x, n.shape[d], n.kernel[d], dl, n.dim_causal[d], lo, hi);
  }
  ATTNKIT_HD static void na_key_dim(const MaskNode& n, int d, int64_t x, int64_t* g, int64_t* u) {
    const int64_t dl = n.dilation[d];
    *g = dl == 1 ? 0 : x % dl;
    *u = dl == 1 ? x : x / dl;
  }
  ATTNKIT_HD static bool na_dim(const MaskNode& n, int d, int64_t xq, int64_t xk) {
    int64_t gq, lo, hi, gk, u;
    na_key_dim(n, d, xk, &gk, &u);
    na_query_dim(n, d, xq, &gq, &lo, &hi);
    return gq == gk && u >= lo && u <= hi;
  }
  // A token's half of every dim (a query's g, lo, hi; a key's g and u, as lo = hi = u), in U
  // (int64_t, or uint32_t for a narrow grid's coordinates).
  template <class U>
  struct NaSide {
    U g[kMaxGridDims] = {0, 0, 0}, lo[kMaxGridDims] = {0, 0, 0}, hi[kMaxGridDims] = {0, 0, 0};
  };
  template <class U = int64_t>
  ATTNKIT_HD static NaSide<U> na_side(const MaskNode& n, int64_t x, bool query) {
    int64_t c[kMaxGridDims] = {0, 0, 0};
    coords<U>(n, x, c);
    NaSide<U> t;
    for (int d = 0; d < kMaxGridDims && d < n.ndim; ++d) {
      int64_t g, lo, hi;
      if (query) {
        na_query_dim(n, d, c[d], &g, &lo, &hi);
      } else {
        na_key_dim(n, d, c[d], &g, &lo);
        hi = lo;
      }
      t.g[d] = static_cast<U>(g);
      t.lo[d] = static_cast<U>(lo);
      t.hi[d] = static_cast<U>(hi);
    }
    return t;
  }
  template <class U>
  ATTNKIT_HD static bool na_allowed(const MaskNode& n, const NaSide<U>& q, const NaSide<U>& k) {
    for (int d = 0; d < kMaxGridDims && d < n.ndim; ++d)
      if (k.g[d] != q.g[d] || k.lo[d] < q.lo[d] || k.lo[d] > q.hi[d]) return false;
    return true;
  }
  // Row-major coordinates of flat index x on the node's grid, in U's arithmetic: int64_t, or
  // uint32_t where x and the extents are below 2^32 (narrow_grid; the window bounds then fit
  // too, lying in [0, extent)): the CUDA bits pass, as a GPU's 64-bit division is a subroutine
  // of ~70 instructions and a 2-D neighborhood's test made four. (The general kernels keep
  // int64_t: both widths inlined there took fwd 64x64's spills from 196 to 1336 bytes.)
  template <class U = int64_t>
  ATTNKIT_HD static void coords(const MaskNode& n, int64_t x, int64_t* c) {
    U y = static_cast<U>(x);
    for (int d = n.ndim - 1; d >= 0; --d) {
      const U e = static_cast<U>(n.shape[d]);
      c[d] = static_cast<int64_t>(y % e);
      y /= e;
    }
  }
  // Whether every extent of the node's grid lies in [1, 2^32): coords<uint32_t> is then exact
  // for indices below 2^32.
  ATTNKIT_HD static bool narrow_grid(const MaskNode& n) {
    bool ok = true;
    for (int d = 0; d < kMaxGridDims && d < n.ndim; ++d)
      ok = ok && n.shape[d] > 0 && n.shape[d] <= int64_t{0xffffffff};
    return ok;
  }

  ATTNKIT_HD bool allowed(int32_t id, int64_t i, int64_t j) const {
    const MaskNode& n = nodes[id];
    switch (n.kind) {
      case MaskKind::kAnd:
        return allowed(n.child0, i, j) && allowed(n.child1, i, j);
      case MaskKind::kOr:
        return allowed(n.child0, i, j) || allowed(n.child1, i, j);
      case MaskKind::kNot:
        return !allowed(n.child0, i, j);
      default:
        return allowed_leaf(n, i, j);
    }
  }
  ATTNKIT_HD bool allowed(int64_t i, int64_t j) const { return allowed(0, i, j); }

  // Non-recursive forms for GPU kernels (a recursive device function has a stack that cannot be
  // sized statically). Every child has a larger index than its parent, as the Mask builders make
  // them, so one pass from the last node back to the root evaluates the tree.
  static constexpr int kMaxFlatNodes = 16;
  ATTNKIT_HD bool allowed_flat(int32_t count, int64_t i, int64_t j) const {
    if (count == 1) return allowed_leaf(nodes[0], i, j);
    bool val[kMaxFlatNodes];
    for (int32_t id = count - 1; id >= 0; --id) {
      const MaskNode& n = nodes[id];
      val[id] = n.kind == MaskKind::kAnd   ? val[n.child0] && val[n.child1]
                : n.kind == MaskKind::kOr  ? val[n.child0] || val[n.child1]
                : n.kind == MaskKind::kNot ? !val[n.child0]
                                           : allowed_leaf(n, i, j);
    }
    return val[0];
  }
  ATTNKIT_HD TileClass classify_flat(int32_t count, const TileTokens& qt,
                                     const TileTokens& kt) const {
    if (count == 1) return classify_leaf(nodes[0], qt, kt);
    TileClass val[kMaxFlatNodes];
    for (int32_t id = count - 1; id >= 0; --id) {
      const MaskNode& n = nodes[id];
      val[id] = n.kind == MaskKind::kAnd   ? both(val[n.child0], val[n.child1])
                : n.kind == MaskKind::kOr  ? either(val[n.child0], val[n.child1])
                : n.kind == MaskKind::kNot ? invert(val[n.child0])
                                           : classify_leaf(n, qt, kt);
    }
    return val[0];
  }

  // One leaf node (no combinators).
  ATTNKIT_HD bool allowed_leaf(const MaskNode& n, int64_t i, int64_t j) const {
    const int64_t ia = i + offset;
    switch (n.kind) {
      case MaskKind::kNone:
        return true;
      case MaskKind::kCausal:
        return j <= ia;
      case MaskKind::kSlidingWindow:
        return j >= ia - n.a && j <= ia + n.b;
      case MaskKind::kGlobalWindow:
        return (j >= ia - n.a && j <= ia + n.b) || is_global(n, j) || is_global(n, ia);
      case MaskKind::kChunked:
        return floor_div(ia, n.a) == floor_div(j, n.a) && (!n.causal || j <= ia);
      case MaskKind::kDocument:
        return seg_q(n, i) == seg_k(n, j) && (!n.causal || j <= ia);
      case MaskKind::kBlockAttention: {
        const int32_t sq = seg_q(n, i);
        return j <= ia && (sq == seg_k(n, j) || sq == segments[n.seg_q].last);
      }
      case MaskKind::kPrefixLM:
        return j < n.a || j <= ia;
      case MaskKind::kNeighborhood: {
        int64_t cq[kMaxGridDims], ck[kMaxGridDims];
        coords(n, i, cq);
        coords(n, j, ck);
        for (int d = 0; d < n.ndim; ++d)
          if (!na_dim(n, d, cq[d], ck[d])) return false;
        return true;
      }
      case MaskKind::kMaxvitBlock: {
        int64_t cq[kMaxGridDims], ck[kMaxGridDims];
        coords(n, i, cq);
        coords(n, j, ck);
        return cq[0] / n.a == ck[0] / n.a && cq[1] / n.a == ck[1] / n.a;
      }
      case MaskKind::kMaxvitGrid: {
        int64_t cq[kMaxGridDims], ck[kMaxGridDims];
        coords(n, i, cq);
        coords(n, j, ck);
        const int64_t ph = n.shape[0] / n.a, pw = n.shape[1] / n.a;
        return cq[0] % ph == ck[0] % ph && cq[1] % pw == ck[1] % pw;
      }
      case MaskKind::kBlockMap: {
        const BlockMapView& m = maps[n.map];
        return m.data[(i / n.a) * m.sr + (j / n.b) * m.sc] != 0;
      }
      default:  // combinators are not leaves
        return false;
    }
  }

  // ---- tile classification -------------------------------------------------------------
  // 1-D rule "lo(i') <= j <= hi(i')" with both bounds non-decreasing in i'.
  ATTNKIT_HD static TileClass band(int64_t qlo, int64_t qhi, int64_t klo, int64_t khi, int64_t left,
                                   int64_t right) {
    if (khi < qlo - left || klo > qhi + right) return TileClass::kEmpty;
    if (klo >= qhi - left && khi <= qlo + right) return TileClass::kFull;
    return TileClass::kPartial;
  }
  // The tiles t in [0, count) that band() finds full against the fixed positions [lo, hi]: those
  // whose positions [base + t size, base + t size + size - 1] all lie in [hi - left, lo + right].
  // They are [*begin, *end), empty where *begin >= *end; the GPU kernels find them once a work
  // item instead of classifying every tile. The transposed band (the fixed positions are keys,
  // the tiles queries) swaps left and right.
  ATTNKIT_HD static void band_full_tiles(int64_t lo, int64_t hi, int64_t left, int64_t right,
                                         int64_t base, int64_t size, int64_t count, int* begin,
                                         int* end) {
    const int64_t first = -floor_div(base - (hi - left), size);  // ceil((hi-left-base)/size)
    const int64_t last = floor_div(lo + right - base - (size - 1), size);  // the last t allowed
    *begin = static_cast<int>(imin(imax(first, 0), count));
    *end = static_cast<int>(imax(imin(last + 1, count), 0));
  }
  ATTNKIT_HD static TileClass both(TileClass a, TileClass b) {
    if (a == TileClass::kEmpty || b == TileClass::kEmpty) return TileClass::kEmpty;
    if (a == TileClass::kFull && b == TileClass::kFull) return TileClass::kFull;
    return TileClass::kPartial;
  }
  ATTNKIT_HD static TileClass either(TileClass a, TileClass b) {
    if (a == TileClass::kFull || b == TileClass::kFull) return TileClass::kFull;
    if (a == TileClass::kEmpty && b == TileClass::kEmpty) return TileClass::kEmpty;
    return TileClass::kPartial;
  }
  ATTNKIT_HD void seg_range(const MaskNode& n, const TileTokens& t, bool query, int32_t* lo,
                            int32_t* hi) const {
    if (t.seg) {
      *lo = t.seg[2 * n.seg_q];
      *hi = t.seg[2 * n.seg_q + 1];
      return;
    }
    *lo = INT32_MAX;
    *hi = INT32_MIN;
    for (int64_t x = 0; x < t.count; ++x) {
      const int32_t s = query ? seg_q(n, t.at(x)) : seg_k(n, t.at(x));
      *lo = s < *lo ? s : *lo;
      *hi = s > *hi ? s : *hi;
    }
  }
  ATTNKIT_HD void grid_box(const MaskNode& n, const TileTokens& t, int64_t* lo, int64_t* hi) const {
    bool cached = t.box_ndim == n.ndim;
    for (int d = 0; cached && d < n.ndim; ++d) cached = t.box_shape[d] == n.shape[d];
    if (cached) {
      for (int d = 0; d < n.ndim; ++d) {
        lo[d] = t.box_lo[d];
        hi[d] = t.box_hi[d];
      }
      return;
    }
    for (int d = 0; d < n.ndim; ++d) {
      lo[d] = INT64_MAX;
      hi[d] = INT64_MIN;
    }
    for (int64_t x = 0; x < t.count; ++x) {
      int64_t c[kMaxGridDims];
      coords(n, t.at(x), c);
      for (int d = 0; d < n.ndim; ++d) {
        lo[d] = imin(lo[d], c[d]);
        hi[d] = imax(hi[d], c[d]);
      }
    }
  }

  ATTNKIT_HD static TileClass invert(TileClass c) {
    return c == TileClass::kFull    ? TileClass::kEmpty
           : c == TileClass::kEmpty ? TileClass::kFull
                                    : TileClass::kPartial;
  }

  ATTNKIT_HD TileClass classify(int32_t id, const TileTokens& qt, const TileTokens& kt) const {
    const MaskNode& n = nodes[id];
    switch (n.kind) {
      case MaskKind::kAnd:
        return both(classify(n.child0, qt, kt), classify(n.child1, qt, kt));
      case MaskKind::kOr:
        return either(classify(n.child0, qt, kt), classify(n.child1, qt, kt));
      case MaskKind::kNot:
        return invert(classify(n.child0, qt, kt));
      default:
        return classify_leaf(n, qt, kt);
    }
  }
  ATTNKIT_HD TileClass classify_leaf(const MaskNode& n, const TileTokens& qt,
                                     const TileTokens& kt) const {
    const int64_t qlo = qt.lo + offset, qhi = qt.hi + offset, klo = kt.lo, khi = kt.hi;
    const TileClass causal = band(qlo, qhi, klo, khi, INT64_MAX / 4, 0);
    switch (n.kind) {
      case MaskKind::kNone:
        return TileClass::kFull;
      case MaskKind::kCausal:
        return causal;
      case MaskKind::kSlidingWindow:
        return band(qlo, qhi, klo, khi, n.a, n.b);
      case MaskKind::kGlobalWindow: {
        const TileClass w = band(qlo, qhi, klo, khi, n.a, n.b);
        if (w == TileClass::kFull) return w;
        for (int32_t g = 0; g < n.globals_count; ++g) {
          const int64_t x = globals[n.globals_begin + g];
          if ((x >= klo && x <= khi) || (x >= qlo && x <= qhi)) return TileClass::kPartial;
        }
        return w;
      }
      case MaskKind::kChunked: {
        const int64_t a = floor_div(qlo, n.a), b = floor_div(qhi, n.a);
        const int64_t c = floor_div(klo, n.a), d = floor_div(khi, n.a);
        TileClass t = (b < c || a > d)               ? TileClass::kEmpty
                      : (a == b && b == c && c == d) ? TileClass::kFull
                                                     : TileClass::kPartial;
        return n.causal ? both(t, causal) : t;
      }
      case MaskKind::kDocument: {
        int32_t a, b, c, d;
        seg_range(n, qt, true, &a, &b);
        seg_range(n, kt, false, &c, &d);
        TileClass t = (b < c || a > d)               ? TileClass::kEmpty
                      : (a == b && b == c && c == d) ? TileClass::kFull
                                                     : TileClass::kPartial;
        return n.causal ? both(t, causal) : t;
      }
      case MaskKind::kBlockAttention: {
        if (causal == TileClass::kEmpty) return causal;
        int32_t a, b, c, d;
        seg_range(n, qt, true, &a, &b);
        seg_range(n, kt, false, &c, &d);
        const int32_t last = segments[n.seg_q].last;
        if (a == last && b == last) return causal;  // the last segment sees every earlier token
        const TileClass t = (b < c || a > d) && (b < last) ? TileClass::kEmpty
                            : (a == b && b == c && c == d) ? TileClass::kFull
                                                           : TileClass::kPartial;
        return both(t, causal);
      }
      case MaskKind::kPrefixLM:
        if (khi < n.a) return TileClass::kFull;
        return either(causal, klo >= n.a ? TileClass::kEmpty : TileClass::kPartial);
      case MaskKind::kNeighborhood: {
        int64_t ql[kMaxGridDims], qh[kMaxGridDims], kl[kMaxGridDims], kh[kMaxGridDims];
        grid_box(n, qt, ql, qh);
        grid_box(n, kt, kl, kh);
        TileClass t = TileClass::kFull;
        for (int d = 0; d < n.ndim; ++d) {
          // Union and intersection of the key windows of the query coordinates in the box.
          int64_t ulo = INT64_MAX, uhi = INT64_MIN, ilo = INT64_MIN, ihi = INT64_MAX;
          for (int64_t x = ql[d]; x <= qh[d]; ++x) {
            int64_t lo, hi;
            na_window(x, n.shape[d], n.kernel[d], n.dilation[d], n.dim_causal[d], &lo, &hi);
            if (n.dilation[d] > 1) {
              const int64_t g = x % n.dilation[d];
              lo = lo * n.dilation[d] + g;
              hi = hi * n.dilation[d] + g;
            }
            ulo = imin(ulo, lo);
            uhi = imax(uhi, hi);
            ilo = imax(ilo, lo);
            ihi = imin(ihi, hi);
          }
          if (kh[d] < ulo || kl[d] > uhi) return TileClass::kEmpty;
          if (!(n.dilation[d] == 1 && kl[d] >= ilo && kh[d] <= ihi)) t = TileClass::kPartial;
        }
        return t;
      }
      case MaskKind::kMaxvitBlock: {
        int64_t ql[kMaxGridDims], qh[kMaxGridDims], kl[kMaxGridDims], kh[kMaxGridDims];
        grid_box(n, qt, ql, qh);
        grid_box(n, kt, kl, kh);
        TileClass t = TileClass::kFull;
        for (int d = 0; d < 2; ++d) {
          const int64_t a = ql[d] / n.a, b = qh[d] / n.a, c = kl[d] / n.a, e = kh[d] / n.a;
          if (b < c || a > e) return TileClass::kEmpty;
          if (!(a == b && b == c && c == e)) t = TileClass::kPartial;
        }
        return t;
      }
      case MaskKind::kMaxvitGrid:
        return TileClass::kPartial;
      case MaskKind::kBlockMap: {  // every cell the tile pair touches (query index, not aligned)
        const BlockMapView& m = maps[n.map];
        bool any = false, all = true;
        for (int64_t r = qt.lo / n.a; r <= qt.hi / n.a; ++r)
          for (int64_t c = klo / n.b; c <= khi / n.b; ++c) {
            const bool on = m.data[r * m.sr + c * m.sc] != 0;
            any = any || on;
            all = all && on;
          }
        return !any ? TileClass::kEmpty : all ? TileClass::kFull : TileClass::kPartial;
      }
      default:  // combinators are not leaves
        return TileClass::kPartial;
    }
  }
  ATTNKIT_HD TileClass classify(const TileTokens& qt, const TileTokens& kt) const {
    return classify(0, qt, kt);
  }

  // Neighborhood bits when both tiles are exact row-major boxes of the node's grid and every
  // dilation is 1: a row's allowed keys in the key box are a sub-box, so its bits are a few
  // shifted runs. Returns false when the fast path does not apply.
  ATTNKIT_HD bool box_bits(const MaskNode& n, const TileTokens& qt, const TileTokens& kt,
                           uint64_t* rows) const {
    auto exact = [&](const TileTokens& t) {
      if (!t.box_exact || t.box_ndim != n.ndim) return false;
      for (int d = 0; d < n.ndim; ++d)
        if (t.box_shape[d] != n.shape[d] || n.dilation[d] != 1) return false;
      return true;
    };
    if (!exact(qt) || !exact(kt)) return false;
    int64_t qext[kMaxGridDims] = {1, 1, 1}, kext[kMaxGridDims] = {1, 1, 1};
    for (int d = 0; d < n.ndim; ++d) {
      qext[d] = qt.box_hi[d] - qt.box_lo[d] + 1;
      kext[d] = kt.box_hi[d] - kt.box_lo[d] + 1;
    }
    for (int64_t r = 0; r < qt.count; ++r) {
      // Coordinates of query r from its place in the row-major box.
      int64_t c[kMaxGridDims], lo[kMaxGridDims], hi[kMaxGridDims], rem = r;
      for (int d = n.ndim - 1; d >= 0; --d) {
        c[d] = qt.box_lo[d] + rem % qext[d];
        rem /= qext[d];
      }
      bool empty = false;
      for (int d = 0; d < n.ndim; ++d) {
        na_window(c[d], n.shape[d], n.kernel[d], 1, n.dim_causal[d], &lo[d], &hi[d]);
        lo[d] = imax(lo[d], kt.box_lo[d]) - kt.box_lo[d];  // in key-box coordinates
        hi[d] = imin(hi[d], kt.box_hi[d]) - kt.box_lo[d];
        empty = empty || lo[d] > hi[d];
      }
      uint64_t w = 0;
      if (!empty) {
        const int last = n.ndim - 1;
        const int64_t len = hi[last] - lo[last] + 1;  // 1 to 64
        const uint64_t run = (len >= 64 ? ~uint64_t{0} : ((uint64_t{1} << len) - 1)) << lo[last];
        if (n.ndim == 1) {
          w = run;
        } else if (n.ndim == 2) {
          for (int64_t y = lo[0]; y <= hi[0]; ++y) w |= run << (y * kext[1]);
        } else {
          for (int64_t z = lo[0]; z <= hi[0]; ++z)
            for (int64_t y = lo[1]; y <= hi[1]; ++y) w |= run << ((z * kext[1] + y) * kext[2]);
        }
      }
      rows[r] = w;
    }
    return true;
  }

  // ---- exact bits of a tile pair (rows[r] bit x: allowed(q token r, k token x)) --------------
  // The same answer as `allowed` per element; grid masks and combinators work a row at a time
  // (the query's window once per row, key coordinates once per tile).
  static constexpr int kMaxTileTokens = 64;
  ATTNKIT_HD void tile_bits(int32_t id, const TileTokens& qt, const TileTokens& kt,
                            uint64_t* rows) const {
    const MaskNode& n = nodes[id];
    const uint64_t full = kt.count >= 64 ? ~uint64_t{0} : ((uint64_t{1} << kt.count) - 1);
    switch (n.kind) {
      case MaskKind::kAnd:
      case MaskKind::kOr: {
        uint64_t other[kMaxTileTokens];
        tile_bits(n.child0, qt, kt, rows);
        tile_bits(n.child1, qt, kt, other);
        for (int64_t r = 0; r < qt.count; ++r)
          rows[r] = n.kind == MaskKind::kAnd ? (rows[r] & other[r]) : (rows[r] | other[r]);
        return;
      }
      case MaskKind::kNot:
        tile_bits(n.child0, qt, kt, rows);
        for (int64_t r = 0; r < qt.count; ++r) rows[r] = ~rows[r] & full;
        return;
      case MaskKind::kNeighborhood: {
        if (box_bits(n, qt, kt, rows)) return;
        int64_t ck[kMaxTileTokens][kMaxGridDims];
        for (int64_t x = 0; x < kt.count; ++x) coords(n, kt.at(x), ck[x]);
        for (int64_t r = 0; r < qt.count; ++r) {
          int64_t cq[kMaxGridDims], lo[kMaxGridDims], hi[kMaxGridDims];
          coords(n, qt.at(r), cq);
          for (int d = 0; d < n.ndim; ++d) {
            na_window(cq[d], n.shape[d], n.kernel[d], n.dilation[d], n.dim_causal[d], &lo[d],
                      &hi[d]);
            if (n.dilation[d] > 1) {  // key coordinate range of the window
              const int64_t g = cq[d] % n.dilation[d];
              lo[d] = lo[d] * n.dilation[d] + g;
              hi[d] = hi[d] * n.dilation[d] + g;
            }
          }
          uint64_t w = 0;
          for (int64_t x = 0; x < kt.count; ++x) {
            bool ok = true;
            for (int d = 0; d < n.ndim; ++d)
              ok = ok && ck[x][d] >= lo[d] && ck[x][d] <= hi[d] &&
                   (n.dilation[d] == 1 || (ck[x][d] - lo[d]) % n.dilation[d] == 0);
            w |= static_cast<uint64_t>(ok) << x;
          }
          rows[r] = w;
        }
        return;
      }
      case MaskKind::kDocument: {  // the keys' segments read once per tile, not per pair
        int32_t sk[kMaxTileTokens];
        for (int64_t x = 0; x < kt.count; ++x) sk[x] = seg_k(n, kt.at(x));
        for (int64_t r = 0; r < qt.count; ++r) {
          const int64_t i = qt.at(r), ia = i + offset;
          const int32_t sq = seg_q(n, i);
          uint64_t w = 0;
          for (int64_t x = 0; x < kt.count; ++x)
            w |= static_cast<uint64_t>(sk[x] == sq && (!n.causal || kt.at(x) <= ia)) << x;
          rows[r] = w;
        }
        return;
      }
      default:
        for (int64_t r = 0; r < qt.count; ++r) {
          const int64_t i = qt.at(r);
          uint64_t w = 0;
          for (int64_t x = 0; x < kt.count; ++x)
            w |= static_cast<uint64_t>(allowed(id, i, kt.at(x))) << x;
          rows[r] = w;
        }
    }
  }
};

}  // namespace attnkit
