// BlockMask (MECHANISMS.md 2.1): for each query tile, the key tiles to visit, each full (no
// element mask) or partial (with an exact bit mask of its allowed pairs).
//
// Tiles are runs of a token order: the identity for 1-D masks, grid boxes (8 x 8 in 2-D,
// 4 x 4 x 4 in 3-D, as NATTEN tiles) when the mask has a 2-D or 3-D grid, so that the work of a
// neighborhood mask follows its density. Built by the masks' classify hook; partial tiles are
// then evaluated element by element (allowed hook) into bits, and refined to empty or full.
#pragma once
#include <cstdint>
#include <vector>

#include "core/problem.h"

namespace attnkit::core {

inline constexpr int kTileTokens = 64;  // tile size in tokens (query and key), <= 64 bits a row

struct Tiling {
  std::vector<int32_t> order;   // position -> token; empty: identity
  std::vector<int64_t> starts;  // first position of each tile, plus the end
  int64_t num_tiles() const { return static_cast<int64_t>(starts.size()) - 1; }
  TileTokens tile(int64_t t) const;
};

struct BlockEntry {
  int32_t k_tile = 0;
  TileClass cls = TileClass::kFull;
  int64_t bits = -1;  // partial: index of the first row's word in BlockMask::bits
};

struct BlockMask {
  Tiling q, k;
  std::vector<int64_t> row_begin;  // entries of q tile t: [row_begin[t], row_begin[t + 1])
  std::vector<BlockEntry> entries;
  std::vector<uint64_t> bits;         // partial tiles: one 64-bit word per query row of the tile
  std::vector<int32_t> allowed_keys;  // per query token (only when asked for)
  int64_t visited_tiles = 0, partial_tiles = 0, full_tiles = 0;
  int64_t allowed_pairs = 0;  // exact count of allowed (i, j)
};

// The BlockMasks of a call: one per (batch element, query head) when the mask differs across
// heads (a block map per head), one per batch element when it differs across the batch (segment
// ids of shape [B, N], varlen sequences of different lengths), else one shared. All the masks
// of one batch element share its tilings.
struct BlockMaskSet {
  std::vector<BlockMask> masks;
  std::vector<int32_t> mask_of;  // [b * hq + h] -> index into masks
  int64_t hq = 1;
  int32_t index(int64_t b, int64_t h) const { return mask_of[b * hq + h]; }
  const BlockMask& of(int64_t b, int64_t h) const { return masks[index(b, h)]; }
};
BlockMaskSet build_block_masks(const Problem& p, bool count_rows, int num_threads);

// Builds the BlockMask of batch element b, query head h. `count_rows` fills allowed_keys.
BlockMask build_block_mask(const Problem& p, int64_t b, int64_t h, bool count_rows,
                           int num_threads);

// The allowed (query, key) pairs of the whole call, every batch element and query head.
int64_t allowed_pairs(const Problem& p);

// Which batch elements share a BlockMask: index of the mask to use for each batch element.
bool block_mask_per_batch(const Problem& p);

}  // namespace attnkit::core
