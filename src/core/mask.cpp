// Mask builders and combinators: a mask is a tree of MaskNodes, nodes[0] the root.
#include <utility>

#include "attnkit/spec.h"

namespace attnkit {
namespace {

int64_t window_side(int64_t w) { return w < Mask::kUnboundedWindow ? w : Mask::kUnboundedWindow; }

Mask leaf(MaskNode n) {
  Mask m;
  m.nodes[0] = n;
  return m;
}

// Appends the nodes of `src` to `dst`, shifting its child and data indices; returns its root.
int32_t graft(Mask& dst, const Mask& src) {
  const int32_t base = static_cast<int32_t>(dst.nodes.size());
  const int32_t gbase = static_cast<int32_t>(dst.globals.size());
  const int32_t sbase = static_cast<int32_t>(dst.segments.size());
  const int32_t mbase = static_cast<int32_t>(dst.block_maps.size());
  for (MaskNode n : src.nodes) {
    if (n.child0 >= 0) n.child0 += base;
    if (n.child1 >= 0) n.child1 += base;
    if (n.seg_q >= 0) n.seg_q += sbase;
    if (n.seg_k >= 0) n.seg_k += sbase;
    if (n.map >= 0) n.map += mbase;
    n.globals_begin += gbase;
    dst.nodes.push_back(n);
  }
  dst.globals.insert(dst.globals.end(), src.globals.begin(), src.globals.end());
  dst.segments.insert(dst.segments.end(), src.segments.begin(), src.segments.end());
  dst.block_maps.insert(dst.block_maps.end(), src.block_maps.begin(), src.block_maps.end());
  return base;
}

Mask combine(MaskKind kind, const Mask* x, const Mask* y) {
  Mask m;
  m.nodes[0].kind = kind;
  m.nodes[0].child0 = graft(m, *x);
  if (y) m.nodes[0].child1 = graft(m, *y);
  return m;
}

}  // namespace

Mask Mask::none() { return Mask{}; }
Mask Mask::causal() { return leaf({.kind = MaskKind::kCausal}); }
Mask Mask::sliding_window(int64_t left, int64_t right) {
  return leaf({.kind = MaskKind::kSlidingWindow, .a = window_side(left), .b = window_side(right)});
}
Mask Mask::global_window(int64_t left, int64_t right, std::vector<int64_t> globals) {
  Mask m = leaf({.kind = MaskKind::kGlobalWindow, .a = window_side(left), .b = window_side(right)});
  m.nodes[0].globals_count = static_cast<int32_t>(globals.size());
  m.globals = std::move(globals);
  return m;
}
Mask Mask::chunked(int64_t chunk, bool causal) {
  return leaf({.kind = MaskKind::kChunked, .a = chunk, .causal = causal});
}
Mask Mask::document(TensorView segments_q, TensorView segments_k, bool causal) {
  Mask m = leaf({.kind = MaskKind::kDocument, .causal = causal});
  m.nodes[0].seg_q = 0;
  m.nodes[0].seg_k = 1;
  m.segments = {segments_q, segments_k};
  return m;
}
Mask Mask::block_attention(TensorView segments) {
  Mask m = document(segments, segments, true);
  m.nodes[0].kind = MaskKind::kBlockAttention;
  return m;
}
Mask Mask::prefix_lm(int64_t prefix) { return leaf({.kind = MaskKind::kPrefixLM, .a = prefix}); }
Mask Mask::neighborhood(std::vector<int64_t> shape, std::vector<int64_t> kernel,
                        std::vector<int64_t> dilation, std::vector<bool> causal) {
  MaskNode n{.kind = MaskKind::kNeighborhood};
  // Out-of-range ranks are kept as given (ndim) so that validation can name them.
  n.ndim = static_cast<int>(shape.size());
  for (int d = 0; d < kMaxGridDims && d < n.ndim; ++d) {
    n.shape[d] = shape[d];
    n.kernel[d] = d < static_cast<int>(kernel.size()) ? kernel[d] : 0;
    n.dilation[d] = d < static_cast<int>(dilation.size()) ? dilation[d] : 1;
    n.dim_causal[d] = d < static_cast<int>(causal.size()) ? causal[d] : false;
  }
  // A kernel or dilation list of the wrong rank is flagged through b (validation names it).
  n.b = (kernel.size() != shape.size() || (!dilation.empty() && dilation.size() != shape.size()) ||
         (!causal.empty() && causal.size() != shape.size()))
            ? 1
            : 0;
  return leaf(n);
}
Mask Mask::maxvit_block(int64_t height, int64_t width, int64_t window) {
  return leaf(
      {.kind = MaskKind::kMaxvitBlock, .a = window, .ndim = 2, .shape = {height, width, 1}});
}
Mask Mask::maxvit_grid(int64_t height, int64_t width, int64_t grid) {
  return leaf({.kind = MaskKind::kMaxvitGrid, .a = grid, .ndim = 2, .shape = {height, width, 1}});
}
Mask Mask::block_map(TensorView map, int64_t block_q, int64_t block_k) {
  Mask m = leaf({.kind = MaskKind::kBlockMap, .a = block_q, .b = block_k});
  m.nodes[0].map = 0;
  m.block_maps = {map};
  return m;
}

// Causal & a leaf that has a causal form (chunked, document; block attention is causal already)
// is that leaf made causal: the same mask as one node, which the kernels test inline (an and of
// two nodes takes the tree's general test).
Mask operator&(const Mask& x, const Mask& y) {
  const auto causal = [](const Mask& m) {
    return m.nodes.size() == 1 && m.nodes[0].kind == MaskKind::kCausal;
  };
  const auto has_causal_form = [](const Mask& m) {
    if (m.nodes.size() != 1) return false;
    const MaskKind k = m.nodes[0].kind;
    return k == MaskKind::kChunked || k == MaskKind::kDocument || k == MaskKind::kBlockAttention;
  };
  for (const auto& [c, leaf] : {std::pair{&x, &y}, std::pair{&y, &x}})
    if (causal(*c) && has_causal_form(*leaf)) {
      Mask m = *leaf;
      // (block attention's node is left as built: its rule is causal, its flag not read, and
      // the mask cache's fingerprint includes the flag)
      if (m.nodes[0].kind != MaskKind::kBlockAttention) m.nodes[0].causal = true;
      return m;
    }
  return combine(MaskKind::kAnd, &x, &y);
}
Mask operator|(const Mask& x, const Mask& y) { return combine(MaskKind::kOr, &x, &y); }
Mask operator!(const Mask& x) { return combine(MaskKind::kNot, &x, nullptr); }

}  // namespace attnkit
