#include "core/block_mask.h"

#include <omp.h>

#include <algorithm>
#include <bit>

namespace attnkit::core {

TileTokens Tiling::tile(int64_t t) const {
  TileTokens x;
  x.start = starts[t];
  x.count = starts[t + 1] - starts[t];
  if (order.empty()) {
    x.lo = x.start;
    x.hi = x.start + x.count - 1;
  } else {
    x.tokens = order.data() + x.start;
    x.lo = *std::min_element(x.tokens, x.tokens + x.count);
    x.hi = *std::max_element(x.tokens, x.tokens + x.count);
  }
  return x;
}

namespace {

// The first grid node (2-D or 3-D) of the mask tree, or null.
const MaskNode* grid_node(const Mask& m) {
  for (const MaskNode& n : m.nodes)
    if ((n.kind == MaskKind::kNeighborhood || n.kind == MaskKind::kMaxvitBlock) && n.ndim >= 2)
      return &n;
  return nullptr;
}

Tiling linear_tiling(int64_t n) {
  Tiling t;
  for (int64_t s = 0; s < n; s += kTileTokens) t.starts.push_back(s);
  t.starts.push_back(n);
  return t;
}

// Boxes of at most kTileTokens tokens that follow the grid (row-major over boxes and inside).
Tiling grid_tiling(const MaskNode& g) {
  int64_t box[kMaxGridDims] = {1, 1, 1};
  if (g.ndim == 2) {
    box[0] = std::min<int64_t>(8, g.shape[0]);
    box[1] = std::min<int64_t>(kTileTokens / box[0], g.shape[1]);
  } else {
    box[0] = std::min<int64_t>(4, g.shape[0]);
    box[1] = std::min<int64_t>(4, g.shape[1]);
    box[2] = std::min<int64_t>(kTileTokens / (box[0] * box[1]), g.shape[2]);
  }
  const int64_t s0 = g.shape[0], s1 = g.ndim > 1 ? g.shape[1] : 1, s2 = g.ndim > 2 ? g.shape[2] : 1;
  const int64_t b2 = g.ndim > 2 ? box[2] : 1;
  Tiling t;
  t.order.reserve(s0 * s1 * s2);
  for (int64_t x0 = 0; x0 < s0; x0 += box[0])
    for (int64_t x1 = 0; x1 < s1; x1 += box[1])
      for (int64_t x2 = 0; x2 < s2; x2 += b2) {
        t.starts.push_back(static_cast<int64_t>(t.order.size()));
        for (int64_t y0 = x0; y0 < std::min(s0, x0 + box[0]); ++y0)
          for (int64_t y1 = x1; y1 < std::min(s1, x1 + box[1]); ++y1)
            for (int64_t y2 = x2; y2 < std::min(s2, x2 + b2); ++y2)
              t.order.push_back(static_cast<int32_t>((y0 * s1 + y1) * s2 + y2));
      }
  t.starts.push_back(static_cast<int64_t>(t.order.size()));
  return t;
}

}  // namespace

bool block_mask_per_batch(const Problem& p) {
  if (p.mask_per_batch) return true;
  for (const Sequence& s : p.seqs)
    if (s.nq != p.seqs[0].nq || s.nk != p.seqs[0].nk) return true;
  return false;
}

BlockMask build_block_mask(const Problem& p, int64_t b, int64_t h, bool count_rows,
                           int num_threads) {
  const Sequence& s = p.seqs[b];
  const MaskEval eval = p.mask_eval(b, h);
  BlockMask bm;
  const MaskNode* g = grid_node(p.spec->mask);
  bm.q = g ? grid_tiling(*g) : linear_tiling(s.nq);
  bm.k = g ? grid_tiling(*g) : linear_tiling(s.nk);
  const int64_t nqt = bm.q.num_tiles(), nkt = bm.k.num_tiles();
  // Tiles with their grid boxes precomputed (classify reads them).
  auto with_box = [&](TileTokens t) {
    if (g) {
      const MaskEval none{};
      none.grid_box(*g, t, t.box_lo, t.box_hi);
      t.box_ndim = g->ndim;
      t.box_exact = true;  // grid_tiling lays tiles out as row-major boxes
      for (int d = 0; d < g->ndim; ++d) t.box_shape[d] = g->shape[d];
    }
    return t;
  };
  std::vector<TileTokens> ktiles(nkt);
  for (int64_t u = 0; u < nkt; ++u) ktiles[u] = with_box(bm.k.tile(u));

  // Per query tile, in parallel; then concatenated in tile order.
  std::vector<std::vector<BlockEntry>> rows(nqt);
  std::vector<std::vector<uint64_t>> words(nqt);
  std::vector<int64_t> pairs(nqt, 0);
  if (count_rows) bm.allowed_keys.assign(s.nq, 0);
  const bool trivial = p.spec->mask.is_none();
  // Threads pay off from a few thousand tile pairs (a team costs about 1000 classifications of
  // a band; a document mask's cost 100 ns or more each).
  const int threads = nqt * nkt >= 2048 ? num_threads : 1;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t t = 0; t < nqt; ++t) {
    const TileTokens qt = with_box(bm.q.tile(t));
    for (int64_t u = 0; u < nkt; ++u) {
      const TileTokens& kt = ktiles[u];
      TileClass c = trivial ? TileClass::kFull : eval.classify(qt, kt);
      if (c == TileClass::kEmpty) continue;
      BlockEntry e{static_cast<int32_t>(u), c, -1};
      if (c == TileClass::kPartial) {
        const size_t at = words[t].size();
        uint64_t any = 0, all = ~uint64_t{0};
        const uint64_t full_row = kt.count == 64 ? ~uint64_t{0} : ((uint64_t{1} << kt.count) - 1);
        uint64_t tile[kTileTokens];
        eval.tile_bits(0, qt, kt, tile);
        for (int64_t r = 0; r < qt.count; ++r) {
          const uint64_t w = tile[r];
          words[t].push_back(w);
          any |= w;
          all &= w | ~full_row;
        }
        if (any == 0) {
          words[t].resize(at);
          continue;
        }
        if (all == ~uint64_t{0}) {
          words[t].resize(at);
          e.cls = TileClass::kFull;
        } else {
          e.bits = static_cast<int64_t>(at);
        }
      }
      if (e.cls == TileClass::kFull) {
        pairs[t] += qt.count * kt.count;
        if (count_rows)
          for (int64_t r = 0; r < qt.count; ++r) bm.allowed_keys[qt.at(r)] += kt.count;
      } else {
        for (int64_t r = 0; r < qt.count; ++r) {
          const int n = std::popcount(words[t][e.bits + r]);
          pairs[t] += n;
          if (count_rows) bm.allowed_keys[qt.at(r)] += n;
        }
      }
      rows[t].push_back(e);
    }
  }
  bm.row_begin.assign(nqt + 1, 0);
  for (int64_t t = 0; t < nqt; ++t) {
    bm.row_begin[t + 1] = bm.row_begin[t] + static_cast<int64_t>(rows[t].size());
    const int64_t base = static_cast<int64_t>(bm.bits.size());
    for (BlockEntry e : rows[t]) {
      if (e.bits >= 0) e.bits += base;
      bm.entries.push_back(e);
      ++bm.visited_tiles;
      (e.cls == TileClass::kFull ? bm.full_tiles : bm.partial_tiles)++;
    }
    bm.bits.insert(bm.bits.end(), words[t].begin(), words[t].end());
    bm.allowed_pairs += pairs[t];
  }
  return bm;
}

BlockMaskSet build_block_masks(const Problem& p, bool count_rows, int num_threads) {
  BlockMaskSet set;
  set.hq = p.hq;
  const bool per_batch = block_mask_per_batch(p);
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t h = 0; h < p.hq; ++h) {
      if ((b == 0 || per_batch) && (h == 0 || p.mask_per_head)) {
        set.masks.push_back(build_block_mask(p, b, h, count_rows, num_threads));
        set.mask_of.push_back(static_cast<int32_t>(set.masks.size() - 1));
      } else {  // the same mask as an earlier (batch, head)
        set.mask_of.push_back(set.mask_of[(per_batch ? b : 0) * p.hq + (p.mask_per_head ? h : 0)]);
      }
    }
  return set;
}

int64_t allowed_pairs(const Problem& p) {
  int64_t pairs = 0;
  for (int64_t b = 0; b < p.batch; ++b) {
    if (!p.mask_per_head) {
      pairs += p.hq * build_block_mask(p, b, 0, false, 1).allowed_pairs;
      continue;
    }
    for (int64_t h = 0; h < p.hq; ++h) pairs += build_block_mask(p, b, h, false, 1).allowed_pairs;
  }
  return pairs;
}

}  // namespace attnkit::core
