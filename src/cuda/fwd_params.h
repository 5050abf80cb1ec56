// The forward kernel's arguments: one plain struct passed by value (__grid_constant__), so the
// mask tree, its globals and every pointer travel with the launch and no device allocation is
// needed. Pointers are device pointers; strides count elements.
#pragma once
#include <cstdint>

#include "attnkit/spec.h"
#include "attnkit/variant/masks.h"
#include "cuda/tile_bits.h"

namespace attnkit::cuda {

inline constexpr int kMaxMaskNodes = MaskEval::kMaxFlatNodes;  // the flat evaluation's bound
inline constexpr int kMaxMaskGlobals = 64;
inline constexpr int kMaxMaskSegments = 4;
inline constexpr int kMaxBlockMaps = 4;
inline constexpr int kWideKeys = 176;  // FwdParams::keys176's key tiles

// A segment-id pair of a document-like mask node: batch element b reads q + b * q_sb.
struct SegmentTemplate {
  const int32_t* q = nullptr;
  const int32_t* k = nullptr;
  int64_t q_sb = 0, q_s = 1, k_sb = 0, k_s = 1;
  int32_t last[8] = {};  // block attention's last segment for the first 8 batch elements
};

// A block map: (b, h) reads data + b * sb + h * sh (0 for broadcast dims).
struct BlockMapTemplate {
  const int32_t* data = nullptr;
  int64_t sb = 0, sh = 0, sr = 0, sc = 1;
};

// Whether the fast forward instance of head dim d takes a softcap: not at d <= 64, where the
// branch alone cost the dense forward 3% (run 39); a softcap there runs the general kernel.
constexpr bool fast_softcap(int d) { return d > 64; }

// The pairs schedule of a band's items (FwdParams::pairs): CTA `cta` of `ctas` walks pairs cta,
// cta + ctas, ...; a pair is item x of a head and its mirror tiles - 1 - x (item x of a head is
// its query tile tiles - 1 - x): a long row with a short one, so that under a causal band every
// pair visits as many key tiles (tiles + 1 where nq = nk and the key tiles are as long as the
// query tiles). An odd count's middle tiles, half that work each, pair across two heads. Heads
// 2 b and 2 b + 1 give pairs b * tiles + r (tiles = 2 half + tiles % 2, half = tiles / 2 pairs a
// head): r < half head 2 b's item r, then head 2 b + 1's, then the two middles (a last head
// alone: its pairs, then its middle alone). (Dealt with each head's pairs, a middle alone was every
// (half + 1)-th pair, so that where half + 1 divided ctas a CTA walked only middles or none: at 7
// tiles on 132 CTAs a quarter of them walked half as much; run 218: 192-row tiles -7.7% at 7 tiles
// a head.) The pairs of two heads stay together, as their keys do in the L2. pair_first gives a
// CTA's first item, pair_next the one after `item`; past the last pair both give heads * tiles,
// which ends the walk. In 32-bit arithmetic from the item alone (a 64-bit division's subroutine and
// a count of the CTA's items raised the fast kernel's spills 4 -> 84 bytes): with items < 2^31 and
// CTAs < 2^20, every value < 2^32.
ATTNKIT_HD int64_t pair_item(uint32_t u, uint32_t tiles, uint32_t heads) {
  const uint32_t half = tiles / 2, odd = tiles % 2;
  const uint32_t b = u / tiles, r = u - b * tiles, h = 2 * b;
  const int64_t end = int64_t{heads} * tiles;
  if (h >= heads) return end;
  if (r < half) return int64_t{h * tiles + r};
  if (h + 1 == heads) return odd && r == half ? int64_t{h * tiles + half} : end;
  if (r < 2 * half) return int64_t{(h + 1) * tiles + (r - half)};
  return int64_t{h * tiles + half};  // the middles: head h's, then h + 1's
}
ATTNKIT_HD int64_t pair_first(int cta, int tiles, int heads) {
  return pair_item(static_cast<uint32_t>(cta), static_cast<uint32_t>(tiles),
                   static_cast<uint32_t>(heads));
}
ATTNKIT_HD int64_t pair_next(int64_t item, int ctas, int tiles, int heads) {
  const uint32_t t = static_cast<uint32_t>(tiles), hs = static_cast<uint32_t>(heads);
  const uint32_t h = static_cast<uint32_t>(item) / t, x = static_cast<uint32_t>(item) - h * t;
  const uint32_t half = t / 2;
  if (2 * x + 1 < t) return int64_t{h * t + t - 1 - x};  // a pair's first: its mirror
  uint32_t r;                                            // this pair's place among its heads'
  if (2 * x + 1 == t) {                                  // a middle
    if (h % 2 == 0 && h + 1 < hs) return int64_t{(h + 1) * t + half};  // the next head's
    r = h % 2 == 0 ? half : 2 * half;  // a last head's alone, or the second of two
  } else {
    r = (h % 2) * half + (t - 1 - x);  // a pair's second: the pair of its mirror
  }
  return pair_item((h / 2) * t + r + static_cast<uint32_t>(ctas), t, hs);
}

// The pairs a band's items make (pair_item).
inline int64_t pair_count(int64_t heads, int tiles) {
  return heads / 2 * tiles + heads % 2 * ((tiles + 1) / 2);
}

struct FwdParams {
  // q, k, v, out and the gate: row (b, h, n) at ptr + b * sb + h * sh + n * sn.
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  int64_t q_sb = 0, q_sh = 0, q_sn = 0, k_sb = 0, k_sh = 0, k_sn = 0;
  int64_t v_sb = 0, v_sh = 0, v_sn = 0, o_sb = 0, o_sh = 0, o_sn = 0;
  DType out_dtype = DType::kBF16;
  // out's base and batch, head and row strides in multiples of 16 bytes: the fast flavor stores
  // its 16-bit rows of full width 16 bytes a lane (store_rows), else a column pair a lane.
  bool out_rows16 = false;
  float* row_stat = nullptr;
  int64_t st_sb = 0, st_sh = 0, st_sn = 0;

  int batch = 0, hq = 0, hk = 0, group = 1, d = 0, dv = 0;
  int nq = 0, nk = 0;             // per sequence without varlen
  const int32_t* cu_q = nullptr;  // varlen: device cu_seqlens (rows of q and k start there)
  const int32_t* cu_k = nullptr;
  bool bottom_right = true;  // aligned query index i' = i + (nk - nq)
  int num_q_tiles = 0;       // of the longest query sequence (kGrid: the grid's patches)
  // The forward's work items (num_q_tiles * hq * batch query tiles) and the CTAs that walk them:
  // persistent > 0 launches that many (one a multiprocessor), which take items past their first
  // from sched (a zeroed counter), in pairs (pair_first: a band's items without varlen, pairs
  // set) or else every gridDim.x-th item (items of one length); 0 launches one CTA an item.
  int num_items = 0, persistent = 0;
  int* sched = nullptr;
  bool pairs = false;
  float scale = 1.f, scale_log2 = 1.f;  // scale and scale * log2(e)
  bool pingpong = true;  // the fast kernel's consumer warpgroups take turns at issuing
  // With pingpong: an item's last P V takes no turn, and the last warpgroup lets 0 go first
  // once a CTA rather than once an item, so that one warpgroup's rows and next item overlap the
  // other's last steps (FlashAttention-3's order); else both store their rows before either
  // issues the next item's first S.
  bool turns_run_on = false;
  // The fast kernel's O through shared memory and the copy engine (TmaMaps::o: 16-bit rows of
  // the inputs' dtype, dv = 64, no varlen), in the instances with room (FwdShape::kTmaOut).
  bool tma_out = false;
  bool raw_output = false;  // out receives O before ReLA's RMS and gain (and no gate)
  // Query tiles of 192 rows, three consumer warpgroups (FlashAttention-3's d64 tile), so that two
  // warpgroups' matrix multiplies cover each one's normalization: d = dv = 64, the fast kernel
  // with no score mods but ALiBi, by default without a mask or causal from 768 query rows
  // (ATTNKIT_CUDA_FWD_ROWS192=1: any band; forward.cu says when).
  bool rows192 = false;
  // Key tiles of 176 instead of 128 (FlashAttention-3's d128 tile without a mask): each tile's
  // fixed costs (O's rescale, the turns, the waits) over 1.375x the keys, in two stages; d = dv =
  // 128, the fast kernel with no mask and no score mods, by default from 8192 keys on
  // (ATTNKIT_CUDA_FWD_KEYS176; forward.cu says when).
  bool keys176 = false;
  // The fast kernel's query tiles under a band with an upper bound (causal, sliding) end at the
  // sequence's end, so that a partial tile is the first, whose rows visit the fewest keys, not
  // the last, whose rows visit the most (run 171, d64 causal in 192-row tiles: +13% at N 1024,
  // +5% at 4096; ATTNKIT_CUDA_FWD_ALIGN_END=0: off). The first tile's rows before 0 are zeros
  // (the copy engine's fill past the map) or another sequence's (varlen): masked by the band or
  // not, never stored (the threads store a warpgroup's rows that start before 0: a tensor store
  // there is an illegal instruction, run 169).
  bool align_end = false;

  // Masks. The fast kernel knows only bands: allowed(i, j) = i' - left <= j <= i' + right
  // (left, right may be "infinite"). The general kernel evaluates the mask tree.
  int64_t band_left = 0, band_right = 0;
  // A 2-D neighborhood (dilation 1) on grid tiles (the fast kernel's kGrid instance, tile_bits.h):
  // query patches and key boxes of the token grid, loaded through 5-D tensor maps; grid.w = 0
  // otherwise.
  GridShape grid;
  int num_nodes = 1;
  MaskNode nodes[kMaxMaskNodes];
  int64_t globals[kMaxMaskGlobals] = {};
  SegmentTemplate segments[kMaxMaskSegments];
  int num_segments = 0;
  BlockMapTemplate maps[kMaxBlockMaps];
  int num_maps = 0;

  // The general kernel's block table (built on the device by classify_tiles_kernel): the
  // TileClass of (query tile, key tile) of (b, h) at tile_class[b * tc_sb + h * tc_sh + qt *
  // tc_nkt + kt] (tc_sb / tc_sh are 0 when the mask is the same for every batch element / head).
  const uint8_t* tile_class = nullptr;
  int64_t tc_sb = 0, tc_sh = 0;
  int tc_nkt = 0;
  // classify_tiles_kernel gathers each tile's segment id ranges first (they fit in its shared
  // memory, classify_smem; else seg_range reads each tile's ids itself).
  bool tc_seg_ranges = false;
  // Element-mask bits of partial tiles (table entries kTileBits + s): query row r (of the tile's
  // kM) of slot s at tile_bits[b * tb_sb + h * tb_sh + qt * tb_sq + (s * kM + r) * kN / 32],
  // one bit per key; tb_slots slots per query tile (0: no bits).
  const uint32_t* tile_bits = nullptr;
  int64_t tb_sb = 0, tb_sh = 0, tb_sq = 0;
  int tb_slots = 0;
  // Each table row's non-empty key tiles lie in [x, y) = tile_span[2 r], tile_span[2 r + 1],
  // row r = b * ts_sb + h * ts_sh + qt (classify_tiles_kernel; [0, 0) where none): where set, the
  // forward walks that range of a row, not every key tile (ATTNKIT_CUDA_FWD_ROW_SPAN=0: every
  // tile, for measurements).
  const int32_t* tile_span = nullptr;
  int64_t ts_sb = 0, ts_sh = 0;

  // Score mods (general kernel; on the fast kernel ALiBi or a bias, either with a softcap, or a
  // softcap alone: fast_alibi, fast_bias, cap_raw).
  bool has_mods = false;
  bool fast_alibi = false;
  // The fast kernel with a dense 16-bit bias of q's dtype: a bias tile rides in each stage
  // (TmaMaps::bias) and adds bias_raw * bias to the raw dot products (bias_raw = 1 / scale).
  bool fast_bias = false;
  float bias_raw = 0.f;
  float softcap = 0.f;
  // The fast forward with a softcap, in the raw dot products' units: cap_raw = softcap / scale,
  // inv_cap_raw = scale / softcap (0: none); only in instances where fast_softcap(d). The fast
  // backward's tabled instance takes it too.
  float cap_raw = 0.f, inv_cap_raw = 0.f;
  AlibiMode alibi = AlibiMode::kOff;
  const float* alibi_slopes = nullptr;  // null: the default slopes
  int64_t slopes_s = 0;
  const void* bias = nullptr;
  DType bias_dtype = DType::kF32;
  int64_t bias_sb = 0, bias_sh = 0, bias_si = 0, bias_sj = 0;  // 0 on broadcast dims
  RelativeBucketKind relative = RelativeBucketKind::kOff;
  bool bidirectional = true;
  int64_t num_buckets = 0, max_distance = 0, clip = 0;
  const float* table = nullptr;
  int64_t table_sh = 0;
  // The bucket of every relative position rel = j - i' at bucket_of[rel + bucket_origin] (built
  // on the device by relative_bucket_kernel).
  const int32_t* bucket_of = nullptr;
  int64_t bucket_origin = 0;
  // Forget gate: prefix sums c of log f over key positions, [B * Hq][forget_stride] (built on the
  // device by forget_prefix_kernel).
  const double* forget_c = nullptr;  // float64: c[i'] - c[j] of two large sums
  int64_t forget_stride = 0;
  const float* lowrank_u = nullptr;
  const float* lowrank_w = nullptr;
  int64_t rank = 0, u_sb = 0, u_sh = 0, u_sn = 0, w_sb = 0, w_sh = 0, w_sn = 0;

  // Normalizer.
  NormalizerKind norm = NormalizerKind::kSoftmax;
  const float* sinks = nullptr;
  int64_t sinks_s = 0;
  bool has_beta = false;
  float beta = 0.f;
  KernelFeature feature = KernelFeature::kSoftplus;
  float power = 1.f;
  bool length_scale = false;
  const float* gain = nullptr;
  int64_t gain_s = 0;
  float rela_eps = 1e-6f;

  // Output gate: elementwise (addressed like out) or per head (one element per row).
  GateKind gate = GateKind::kNone;
  const void* gate_ptr = nullptr;
  DType gate_dtype = DType::kF32;
  int64_t g_sb = 0, g_sh = 0, g_sn = 0;
};

}  // namespace attnkit::cuda
