// The CUDA forward kernel (sm_90a), in the FlashAttention-3 arrangement.
//
// A CTA of three warpgroups (four with 192 rows) computes a 128-row (or 192-row, kRows) query
// tile of one (batch, query head):
// - warpgroup 0 is the producer: one thread issues the bulk tensor copies (TMA) of Q and of the
//   K and V tiles (and, with kBias, a bias tile) into a ring of shared-memory stages; each copy
//   completes on its stage's "full" mbarrier, and a stage is refilled once every consumer warp
//   has arrived on its "empty" mbarrier. It gives most of its registers away (setmaxnreg).
// - warpgroups 1 and 2 (and 3, with 192-row tiles) are consumers of 64 rows each. Within a
//   warpgroup, S = Q K^T of tile j is issued together with O += P V of tile j - 1 (P from
//   registers, V read transposed from the 128B-swizzled tile), so the normalization of tile j
//   runs while the tensor cores work on P V. Between the consumer warpgroups, named barriers
//   take turns at issuing (ping-pong, a ring) so that one warpgroup's normalization overlaps the
//   others' matrix multiplies; the turns run on across items (FwdParams::turns_run_on), so one's
//   rows are stored while the other computes.
// No CTA-wide barrier is taken after the prologue. A CTA walks work items (FwdWork): one, or
// with FwdParams::persistent (one CTA a multiprocessor) as many as it takes from a counter, in
// pairs (a band's, pair_first) or round-robin (items of one length); the producer thread
// hands each to the consumer warps through two shared slots. The ring runs on
// across items, and the producer loads the next item's Q once both consumer warpgroups have
// their last S of the current one (empty_q). A consumer warpgroup of the fast flavor issues the
// next item's first S before it stores the current one's rows, so that the multiply runs under
// the store: a branch ptxas cannot predicate there serializes the multiplies, so store_rows has
// none; ptxas still waits for the multiply before the store reads O's registers (C7517), after
// the rows' factors. The general flavor stores at an item's end. Where a stage of O fits beside
// the ring (d_v = 64: FwdShape::kTmaOut), each consumer warpgroup writes its 64 rows of O there
// by stmatrix and one thread stores them by the copy engine (FwdParams::tma_out); else the
// threads store O (16 bytes a lane where out's rows allow: store_rows, FwdParams::out_rows16).
//
// Two flavors per (dtype, head dims):
// - kGeneral = false: plain softmax (or with a sink); the scale folds into the exponent. The
//   mask is a band (none, causal, sliding window), or any mask whose block table gives every
//   partial tile its element-mask bits (p.tile_class set): empty tiles are skipped, partial ones
//   masked by their bits. kBias (FwdParams::fast_bias): a dense 16-bit bias whose tiles ride
//   with K's, added to the raw dot products from shared memory.
// - kGeneral = true: the shared policies of include/attnkit/variant at run time: the key tiles
//   are the non-empty ones of the block table (classify_tiles_kernel), partial tiles are masked
//   per element by the mask tree, and every score mod, normalizer and output gate is chosen at
//   run time.
#pragma once
#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "cuda/fwd_common.cuh"
#include "cuda/fwd_mask.cuh"
#include "cuda/fwd_params.h"
#include "cuda/sm90_ops.cuh"

namespace attnkit::cuda {

template <int kD, int kDV, int kRows = 128, int kKeys = 0>
struct FwdShape : FwdTiles<kD, kDV, kRows, kKeys> {
  using Base = FwdTiles<kD, kDV, kRows, kKeys>;
  static constexpr int kConsumers = Base::kM / 64;  // consumer warpgroups, 64 rows each
  // (the registers below and the turns' ring are sized for these two)
  static_assert(kRows == 128 || kRows == 192, "query tiles of 128 or 192 rows");
  static constexpr int kThreads = 128 * (1 + kConsumers);  // and the producer's
  static constexpr int kBarBytes = 256;  // the mbarriers and the schedule's two slots
  static constexpr int kStageBytes = Base::kKBytes + Base::kVBytes;
  static constexpr int kStages =
      Base::kQBytes + 3 * kStageBytes + 1024 + kBarBytes <= 227 * 1024 ? 3 : 2;
  // With a bias tile (16-bit, kM x kN) in each stage (kBias).
  static constexpr int kBiasBytes = Base::kM * Base::kN * 2;
  static constexpr int kBiasStages =
      Base::kQBytes + 3 * (kStageBytes + kBiasBytes) + 1024 + kBarBytes <= 227 * 1024 ? 3 : 2;
  // O's rows staged for the copy engine (FwdParams::tma_out) where they fit beside three stages
  // (with bias tiles too): one 64-column panel, 64 rows a consumer warpgroup.
  // (192 rows have no bias instance: no room kept for its tiles.)
  static constexpr int kOStageBytes = Base::kM * 128;
  static constexpr int kBiasRoom = Base::kM == 128 ? kBiasBytes : 0;
  static constexpr bool kTmaOut =
      Base::kDVp == 64 &&
      Base::kQBytes + 3 * (kStageBytes + kBiasRoom) + kOStageBytes + 1024 + kBarBytes <=
          227 * 1024;
  static constexpr int kOBytes = kTmaOut ? kOStageBytes : 0;
  static constexpr int kSmemBytes =
      Base::kQBytes + kStages * kStageBytes + kOBytes + 1024 + kBarBytes;
  static constexpr int kBiasSmemBytes =
      Base::kQBytes + kBiasStages * (kStageBytes + kBiasBytes) + kOBytes + 1024 + kBarBytes;
  static_assert(kKeys != 0 || kBiasSmemBytes <= 227 * 1024, "two stages with bias tiles must fit");
  static_assert(kSmemBytes <= 227 * 1024, "the stages must fit");
  // The producer's release (168 - 24 a thread, the launch's cap) pays the consumers' rise (240 -
  // 168): setmaxnreg.inc waits for free registers, so a producer at 32 would hang (run 60).
  // Three consumer warpgroups: 128 at launch, 24 and 160.
  static constexpr int kProducerRegs = 24, kConsumerRegs = kConsumers == 2 ? 240 : 160;
  static constexpr int kLaunchRegs = 65536 / kThreads / 8 * 8;  // a thread's at launch: 168
  static_assert(128 * (kProducerRegs + kConsumers * kConsumerRegs) <= kThreads * kLaunchRegs,
                "setmaxnreg would wait forever");
};

// A work item of the forward: query tile `tile` of (b, h) from row m0 (below 0 for the first
// tile under FwdParams::align_end), and the key tiles it visits: those of [t_begin, t_end) that
// next() does not skip (the band's, or the non-empty ones of the block table, general or fast
// with a table). Items run x = num_q_tiles - 1 - tile fastest (long rows first, and the CTAs at
// work share their heads' K and V in L2), then h, then b.
template <int kM, int kN, bool kGrid = false>
struct FwdWork {
  int b = 0, h = 0, tile = 0, m0 = 0, rows = 0, t_begin = 0, t_end = 0;
  SeqExtent seq;
  bool tabled = false;
  const uint8_t* tclass = nullptr;
  const uint32_t* tbits = nullptr;
  // kGrid: the query patch's first grid row and column, and its key boxes (grid_keys: key tile
  // t is box (t / kcols, t % kcols) of key_h x key_w keys from grid row kr0, column kc0).
  int pr0 = 0, pc0 = 0, kr0 = 0, kc0 = 0, kcols = 1;
  float inv_kcols = 1.f;

  FwdWork() = default;  // no item (the walk's end): no key tile
  __device__ __forceinline__ FwdWork(const FwdParams& p, int item, bool general) {
    const int bh = item / p.num_q_tiles;
    tile = p.num_q_tiles - 1 - (item - bh * p.num_q_tiles);
    h = bh % p.hq;
    b = bh / p.hq;
    seq = seq_extent(p, b);
    m0 = tile * kM;
    if (p.align_end) m0 -= (kM - seq.nq % kM) % kM;  // (FwdParams::align_end)
    rows = min(kM, seq.nq - m0);
    if constexpr (kGrid) {  // every tile is a patch (those at the grid's edges partly past it)
      static_assert(kM == kGridRows * kGridCols && kN == kGridRows * kGridCols);
      rows = kM;
      const int patches_w = (p.grid.w + kGridCols - 1) / kGridCols;
      pr0 = tile / patches_w * kGridRows;
      pc0 = tile % patches_w * kGridCols;
      const GridKeys keys = grid_keys(p.grid, pr0, pc0);
      kr0 = keys.r0;
      kc0 = keys.c0;
      kcols = keys.cols;
      inv_kcols = 1.f / static_cast<float>(kcols);
      t_end = keys.rows * kcols;
      return;
    }
    if (m0 >= seq.nq) return;  // a tile past this sequence (varlen): nothing to do
    t_end = seq.nk > 0 ? (seq.nk + kN - 1) / kN : 0;
    tabled = general || p.tile_class != nullptr;  // the forward lost nothing by it
    if (tabled) {
      tclass = p.tile_class + b * p.tc_sb + h * p.tc_sh + static_cast<int64_t>(tile) * p.tc_nkt;
      tbits = p.tile_bits + b * p.tb_sb + h * p.tb_sh + tile * p.tb_sq;
      if (p.tile_span) {  // the row's first non-empty key tile and one past its last
        const int2 span = *reinterpret_cast<const int2*>(p.tile_span +
                                                         2 * (b * p.ts_sb + h * p.ts_sh + tile));
        t_begin = span.x;
        t_end = span.y;
      }
    } else {
      // (rows before 0, FwdParams::align_end's, are never stored: the keys of rows from 0 on)
      const int64_t lo = max(m0, 0) + seq.offset - p.band_left;
      const int64_t hi = m0 + rows - 1 + seq.offset + p.band_right;
      t_begin = static_cast<int>(imax(lo, 0) / kN);
      if (hi < 0) t_end = 0;
      else if (t_end > 0) t_end = static_cast<int>(imin(hi, seq.nk - 1) / kN) + 1;
    }
  }
  __device__ __forceinline__ bool live() const { return kGrid || m0 < seq.nq; }
  // kGrid: key tile t's box (grid row, grid column of its first token), t / kcols through
  // the reciprocal and one correction (an integer division a tile cost ~35 instructions).
  __device__ __forceinline__ int2 patch(int t, const GridShape& g) const {
    int r = static_cast<int>((static_cast<float>(t) + 0.5f) * inv_kcols), c = t - r * kcols;
    if (c < 0) --r, c += kcols;
    if (c >= kcols) ++r, c -= kcols;
    return make_int2(kr0 + r * g.key_h, kc0 + c * g.key_w);
  }
  __device__ __forceinline__ int next(int t) const {
    if (tabled)
      while (t < t_end && static_cast<TileClass>(tclass[t]) == TileClass::kEmpty) ++t;
    return t;
  }
};

template <class T, int kD, int kDV, bool kGeneral, bool kBias = false, bool kGrid = false,
          int kRows = 128, int kKeys = 0>
__global__ void __launch_bounds__(FwdShape<kD, kDV, kRows>::kThreads, 1)
    fwd_kernel(const __grid_constant__ FwdParams p, const __grid_constant__ TmaMaps maps) {
  using S = FwdShape<kD, kDV, kRows, kKeys>;
  static_assert(!kGrid || (!kGeneral && !kBias), "grid tiles: the plain fast flavor only");
  static_assert(kRows == 128 || (!kGeneral && !kBias && !kGrid), "192 rows: the plain fast one");
  static_assert(kKeys == 0 || (!kGeneral && !kBias && !kGrid && kRows == 128),
                "wide key tiles: the plain fast one");
  constexpr int kConsumers = S::kConsumers, kWarps = 4 * kConsumers;
  using Work = FwdWork<S::kM, S::kN, kGrid>;
  using Tag = typename ElemTraits<T>::Tag;
  constexpr int kM = S::kM, kN = S::kN, kDp = S::kDp, kDVp = S::kDVp;
  constexpr int kStages = kBias ? S::kBiasStages : S::kStages;
  constexpr int kStageBytes = S::kStageBytes + (kBias ? S::kBiasBytes : 0);
  constexpr int kSRegs = kN / 2, kORegs = kDVp / 2;
  constexpr float kNegInf = -INFINITY;

  extern __shared__ uint8_t smem_raw[];
  const uint32_t sQ = (smem_addr(smem_raw) + 1023) & ~1023u;
  auto sK = [&](int st) { return sQ + S::kQBytes + st * kStageBytes; };
  auto sV = [&](int st) { return sK(st) + S::kKBytes; };
  auto sB = [&](int st) { return sV(st) + S::kVBytes; };  // kBias
  const uint32_t sO = sQ + S::kQBytes + kStages * kStageBytes;  // S::kOBytes (1024-aligned)
  const uint32_t bars = sO + S::kOBytes;
  const uint32_t bar_q = bars;
  auto full_k = [&](int st) { return bars + 8 * (1 + st); };
  auto full_v = [&](int st) { return bars + 8 * (1 + kStages + st); };
  auto empty_k = [&](int st) { return bars + 8 * (1 + 2 * kStages + st); };
  auto empty_v = [&](int st) { return bars + 8 * (1 + 3 * kStages + st); };
  const uint32_t empty_q = bars + 8 * (1 + 4 * kStages);  // the consumers are done with Q
  // The schedule: the producer thread hands each item to the consumer warps through two slots.
  auto sched_full = [&](int y) { return bars + 8 * (2 + 4 * kStages + y); };
  auto sched_empty = [&](int y) { return bars + 8 * (4 + 4 * kStages + y); };
  const uint32_t sSched = bars + 8 * (6 + 4 * kStages);  // int[2]
  static_assert(8 * (6 + 4 * kStages) + 8 <= S::kBarBytes, "the barriers' bytes");
  // Stage and phase of the ring's it-th tile, counted over the CTA's items. Stage and phase
  // repeat every 2 kStages tiles, so both sides reduce their counts modulo that at each item: a
  // persistent CTA's count never wraps (2^31 tiles), whatever its items' number.
  auto phase_of = [](int it) { return static_cast<uint32_t>((it / kStages) & 1); };

  // The fast flavor's warpgroup through a broadcast from lane 0, which ptxas takes as
  // warp-uniform: the descriptors derived from it then live in uniform registers.
  const int tid = threadIdx.x, wg = kGeneral ? tid / 128 : __shfl_sync(0xffffffff, tid / 128, 0);
  if (tid == 0) {
    mbar_init(bar_q, 1);
    mbar_init(empty_q, kWarps);  // one arrival per consumer warp
    for (int y = 0; y < 2; ++y) {
      mbar_init(sched_full(y), 1);
      mbar_init(sched_empty(y), kWarps);
    }
#pragma unroll
    for (int st = 0; st < kStages; ++st) {
      mbar_init(full_k(st), 1);
      mbar_init(full_v(st), 1);
      mbar_init(empty_k(st), kWarps);  // one arrival per consumer warp
      mbar_init(empty_v(st), kWarps);
    }
    mbar_init_fence();
  }
  __syncthreads();

  if (wg == 0) {
    // Producer.
    regs_dec<S::kProducerRegs>();
    if (tid == 0) {
      tma_prefetch_map(&maps.q);
      tma_prefetch_map(&maps.k);
      tma_prefetch_map(&maps.v);
      int it = 0;  // the ring's tiles so far
      // Item j goes to slot j % 2 (-1 ends the walk). The first is blockIdx.x (or its first
      // pair's); the next come from the counter (persistent, unequal items), the CTA's pairs
      // (persistent under a band, p.pairs) or gridDim.x on (persistent with items of one
      // length; or one item a CTA), claimed once the last one's tiles are issued; tiles past
      // their sequence (varlen) are passed over here.
      auto claim = [&](int64_t item) -> int64_t {
        if (p.pairs) return pair_next(item, gridDim.x, p.num_q_tiles, p.batch * p.hq);
        return (p.sched ? atomicAdd(p.sched, 1) : item) + static_cast<int64_t>(gridDim.x);
      };
      int64_t item =
          p.pairs ? pair_first(blockIdx.x, p.num_q_tiles, p.batch * p.hq) : blockIdx.x;
      for (int j = 0;; ++j) {
        if (j > 0) item = claim(item);
        while (item < p.num_items && !Work(p, static_cast<int>(item), kGeneral).live())
          item = claim(item);
        const int y = j & 1;
        mbar_wait(sched_empty(y), ((j >> 1) & 1) ^ 1);
        const int given = item < p.num_items ? static_cast<int>(item) : -1;
        asm volatile("st.shared.s32 [%0], %1;\n" ::"r"(sSched + 4 * y), "r"(given) : "memory");
        mbar_arrive(sched_full(y));
        if (given < 0) break;
        const Work w(p, given, kGeneral);
        it %= 2 * kStages;
        // Q of every item, the j-th load on bar_q (one without a key tile reads rows nobody
        // uses: the count stays the items').
        const int b = w.b, h = w.h, m0 = w.m0;
        const int bb = p.cu_q ? 0 : b, hk = h / p.group;
        const int q_row = static_cast<int>(w.seq.q_start) + m0;
        // Q is read once, from memory: it is first prefetched into L2, since its load below waits
        // for the consumers' last S of the previous item (empty_q), which the ring's depth of
        // tiles later leaves little time before they need it.
        if (j > 0) {
#pragma unroll
          for (int c = 0; c < kDp / 64; ++c) {
            if constexpr (kGrid)
              tma_prefetch_l2_5d(&maps.q, c * 64, w.pc0, w.pr0, h * maps.q_hm, bb * maps.q_bm);
            else
              tma_prefetch_l2_4d(&maps.q, c * 64, q_row, h * maps.q_hm, bb * maps.q_bm);
          }
        }
        // A tile of `panels` 64-column panels of `box` rows: rows from `row` on, or (kGrid) the
        // patch or key box at grid row gr, column gc, its tokens in the order of a tile's rows.
        auto load_tile = [&](uint32_t dst, const CUtensorMap* map, uint32_t bar, int panels,
                             int box, int row, int gr, int gc, int hh, int bh) {
#pragma unroll
          for (int c = 0; c < panels; ++c) {
            if constexpr (kGrid)
              tma_load_5d(dst + c * box * 128, map, bar, c * 64, gc, gr, hh, bh);
            else
              tma_load_4d(dst + c * box * 128, map, bar, c * 64, row, hh, bh);
          }
        };
        mbar_wait(empty_q, (j & 1) ^ 1);
        mbar_expect_tx(bar_q, S::kQBytes);
        load_tile(sQ, &maps.q, bar_q, kDp / 64, kM, q_row, w.pr0, w.pc0, h * maps.q_hm,
                  bb * maps.q_bm);
        for (int t = w.next(w.t_begin); t < w.t_end; t = w.next(t + 1), ++it) {
          const int st = it % kStages;
          const int k_row = static_cast<int>(w.seq.k_start) + t * kN;
          // kGrid: the key box at grid row kr, column kc (unused otherwise)
          const int2 kp = w.patch(t, p.grid);
          const int kr = kp.x, kc = kp.y;
          mbar_wait(empty_k(st), phase_of(it) ^ 1);
          mbar_expect_tx(full_k(st), S::kKBytes + (kBias ? S::kBiasBytes : 0));
          load_tile(sK(st), &maps.k, full_k(st), kDp / 64, kN, k_row, kr, kc, hk * maps.k_hm,
                    bb * maps.k_bm);
          if constexpr (kBias)  // bias[b, h, m0 + 0..kM, t * kN + 0..kN] in 64-key boxes
#pragma unroll
            for (int c = 0; c < kN / 64; ++c)
              tma_load_4d(sB(st) + c * kM * 128, &maps.bias, full_k(st), t * kN + c * 64, m0,
                          h * maps.bias_hm, b * maps.bias_bm);
          mbar_wait(empty_v(st), phase_of(it) ^ 1);
          mbar_expect_tx(full_v(st), S::kVBytes);
          load_tile(sV(st), &maps.v, full_v(st), kDVp / 64, kN, k_row, kr, kc, hk * maps.v_hm,
                    bb * maps.v_bm);
        }
      }
    }
    return;
  }

  // Consumers.
  regs_inc<S::kConsumerRegs>();
  const int cw = wg - 1, lane = tid % 32, warp = (tid % 128) / 32;
  const int col0 = 2 * (lane % 4);
  const bool pingpong = p.pingpong;
  // Named barrier ids: the turns 1 .. kConsumers, then O's buffers.
  const int my_turn = 1 + cw, other_turn = 1 + (cw + 1) % kConsumers, o_bar = 1 + kConsumers + cw;
  const bool tma_out = S::kTmaOut && !kGeneral && !kGrid && p.tma_out;
  const bool o_leader = tid % 128 == 0;  // issues the warpgroup's tensor stores of O
  // The turns: warpgroup w issues its matrix multiplies once barrier my_turn completes (the
  // previous one's arrival) and then arrives on the next one's, other_turn (a ring of two or
  // three). The last lets 0 go first, once a CTA where the turns run on across items (each item
  // then balances its syncs and arrivals: the first S and every next tile's, the last P V
  // outside the turns), else once an item.
  const bool turns_run_on = pingpong && p.turns_run_on;
  if (turns_run_on && cw == kConsumers - 1) named_arrive(1, 256);
  int ring = 0;  // the ring's tiles consumed by earlier items
  auto release = [&](uint32_t bar) {
    if (lane == 0) mbar_arrive(bar);
  };
  // The rows of an item: O, and each row's max and sum.
  float o[kORegs], m[2], l[2];
  auto zero_o = [&] {
#pragma unroll
    for (int x = 0; x < kORegs; ++x) o[x] = 0.f;
  };
  // An item's rows are stored under the next item's first S (the walk's end stores the last):
  // what the store needs of the item it stores.
  struct Done {
    int b = 0, h = 0, m0 = 0, row_i[2] = {0, 0};
    SeqExtent seq;
  } done;
  bool pending = false;
  const NormalizerKind norm =
      kGeneral ? p.norm : (p.sinks ? NormalizerKind::kSoftmaxSink : NormalizerKind::kSoftmax);
  auto issue_s = [&](float (&s)[kSRegs], int st) {
    wgmma_fence();
    wgmma_ss_panels<kN, Tag, kDp, kM, kN>(s, smem_desc(sQ + cw * 64 * 128, 16, 1024),
                                          smem_desc(sK(st), 16, 1024));
    wgmma_commit();
  };
  auto store_done = [&] {
    if (!pending) return;
    pending = false;
    // (a tensor store at a row before the map's 0 is an illegal instruction, run 169: the
    // threads store the rows from 0 of a warpgroup starting before it, FwdParams::align_end's
    // first tile; no tensor store under varlen, encode_out)
    if (!tma_out || done.m0 + cw * 64 < 0) {
      store_rows<kGeneral, kDVp>(p, norm, done.b, done.h, done.seq, done.row_i, col0,
                                 lane % 4 == 0, o, m, l);
    } else {
      // O through shared memory: the warpgroup's 64 rows of 128 bytes, 16-byte chunks
      // swizzled by row % 8 (the tensor map's 128-byte swizzle), four 8 x 8 matrices an
      // stmatrix, then one tensor store (rows past the query count are clipped by the map's
      // extent).
      float mul[2];
      store_rows<kGeneral, kDVp>(p, norm, done.b, done.h, done.seq, done.row_i, col0,
                                 lane % 4 == 0, o, m, l, mul);
      const uint32_t buf = sO + cw * (64 * 128);
      if (o_leader) bulk_wait_read<0>();  // the last item's store has read the buffer
      named_sync(o_bar, 128);
      stage_rows<T, kDVp>(buf, o, mul, warp, lane);
      fence_proxy_async_smem();  // the copy engine reads what stmatrix wrote
      named_sync(o_bar, 128);
      if (o_leader) {
        tma_store_4d(&maps.o, buf, 0, static_cast<int>(done.seq.q_start) + done.m0 + cw * 64,
                     done.h * maps.o_hm, (p.cu_q ? 0 : done.b) * maps.o_bm);
        bulk_commit();
      }
    }
  };
  for (int j = 0;; ++j) {
    if constexpr (kGeneral) store_done();  // (at the item's end: its store branches)
    const int y = j & 1;
    mbar_wait(sched_full(y), (j >> 1) & 1);
    int item;
    asm volatile("ld.shared.s32 %0, [%1];\n" : "=r"(item) : "r"(sSched + 4 * y) : "memory");
    __syncwarp();
    if (lane == 0) mbar_arrive(sched_empty(y));
    const Work w = item >= 0 ? Work(p, item, kGeneral) : Work();
    ring %= 2 * kStages;
    // The item's first S, issued before the last item's rows are stored: its matrix multiply
    // runs under the store.
    float s[kSRegs];
    int t = w.next(w.t_begin);
    if (item >= 0) mbar_wait(bar_q, j & 1);
    const int st0 = ring % kStages;
    // The condition through lane 0, as the warpgroup index: a branch ptxas takes as
    // warp-uniform (the SASS has no serialization without it either; kept as measured, run 200).
    if (__shfl_sync(0xffffffff, t < w.t_end ? 1 : 0, 0)) {
      if (pingpong && !turns_run_on && cw == kConsumers - 1) named_arrive(1, 256);  // 0 first
      if (pingpong) named_sync(my_turn, 256);
      mbar_wait(full_k(st0), phase_of(ring));
      issue_s(s, st0);
      if (pingpong) named_arrive(other_turn, 256);
      if constexpr (!kGeneral) store_done();
      wgmma_wait<0>();  // (issued and waited for under one condition: else ptxas serializes)
      fence_regs(s);
    } else if (!kGeneral) {
      store_done();
    }
    if (item < 0) break;
    const int b = w.b, h = w.h, m0 = w.m0, rows = w.rows, t_begin = w.t_begin, t_end = w.t_end;
    const SeqExtent& seq = w.seq;
    const int nq = seq.nq, nk = seq.nk;
    const bool tabled = w.tabled;
    const uint8_t* const tclass = w.tclass;
    const uint32_t* const tbits = w.tbits;
    auto next_tile = [&](int t) { return w.next(t); };
    // The thread's two query rows (kGrid: tokens of the patch, row cw * 4 + warp of it, columns
    // lane / 4 and lane / 4 + 8; one past the grid stands for nq, a row nobody stores).
    int row_i[2];
    if constexpr (kGrid) {
      const int qr = w.pr0 + cw * 4 + warp, qc = w.pc0 + lane / 4;
      row_i[0] = grid_token(p.grid, qr, qc, seq.nq);
      row_i[1] = grid_token(p.grid, qr, qc + 8, seq.nq);
    } else {
      row_i[0] = m0 + cw * 64 + warp * 16 + lane / 4;
      row_i[1] = row_i[0] + 8;
    }

    // Normalizer state per row. The fast flavor keeps the running max of raw dot products (the
    // scale folds into the exponent), the general one of the modified scores.
    done.b = b, done.h = h, done.m0 = m0, done.seq = seq;
    done.row_i[0] = row_i[0], done.row_i[1] = row_i[1];
    pending = true;
    const bool softmax = norm == NormalizerKind::kSoftmax || norm == NormalizerKind::kSoftmaxSink;
    const float to2 = kGeneral ? static_cast<float>(kLog2e) : p.scale_log2;
    l[0] = l[1] = 0.f;
    {
      const float sink = p.sinks ? p.sinks[h * p.sinks_s] : kNegInf;
      // No sink: -inf as it is (-inf / scale took the division's slow path, a call an item).
      m[0] = m[1] = kGeneral || !p.sinks ? sink : sink / p.scale;
      if (p.sinks) l[0] = l[1] = 0.25f;  // exp(sink - sink), split over the quad's 4 partial sums
    }

    // The general flavor's run-time policies of this (b, h).
    MaskState ms;
    ScoreModEval<float> mods;
    bool additive = false, prescale = false;
    float cap = 0.f, inv_cap = 0.f, beta = 0.f;
    float lscale[2] = {1.f, 1.f};
    if constexpr (kGeneral) {
      resolve_mask(p, b, h, seq.offset, ms);
      mods = resolve_mods(p, b, h);
      additive = p.has_mods && mods.has_additive();
      cap = p.softcap;
      inv_cap = cap != 0.f ? 1.f / cap : 0.f;
      prescale = norm == NormalizerKind::kKernel && p.length_scale;
      beta = p.has_beta ? p.beta : -logf(static_cast<float>(nk));
      if (prescale) {  // the normalized kernel's length scale needs each row's allowed-key count
        int cnt[2] = {0, 0};
        for (int u = next_tile(t_begin); u < t_end; u = next_tile(u + 1)) {
          const bool full = static_cast<TileClass>(tclass[u]) == TileClass::kFull;
          for (int x = lane % 4; x < kN; x += 4) {
            const int j = u * kN + x;
            if (j >= nk) break;
#pragma unroll
            for (int r = 0; r < 2; ++r)
              cnt[r] += row_i[r] < nq && (full || mask_allowed(ms.mask, p.num_nodes, row_i[r], j));
          }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r)
          lscale[r] = length_scale<float>(static_cast<int>(quad_sum(static_cast<float>(cnt[r]))));
      }
    }

    // Fast flavor with ALiBi: the term -slope |i' - j| (or -slope (i' - j) causal) in units of
    // the raw dot products (divided by the scale, which the exponent applies), one FMA a score.
    const float alibi_raw = !kGeneral && p.fast_alibi ? alibi_slope_raw(p, h) : 0.f;
    const bool alibi_abs = p.alibi == AlibiMode::kSymmetric;

    // Scores of key tile t: the band mask or a partial tile's bits (fast), or the scale, the score
    // mods (additive terms, then the softcap) and the mask on partial tiles (general). Masked
    // scores become -inf.
    auto score = [&](float (&s)[kSRegs], int t, int st) {
      const int n0 = t * kN;
      if constexpr (kBias) {
        // The stage's bias tile: 64-key panels of kM rows of 128 bytes whose 16-byte chunks are
        // swizzled by row % 8 (= lane / 4: conflict-free); one 32-bit load per score pair.
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int row = row_i[r] - m0;
          const uint32_t line = sB(st) + row * 128 + col0 * 2;
#pragma unroll
          for (int c = 0; c < kN / 8; ++c) {
            uint32_t v;
            asm volatile("ld.shared.b32 %0, [%1];\n"
                         : "=r"(v)
                         : "r"(line + (c / 8) * (kM * 128) + (((c % 8) ^ (row % 8)) * 16)));
            const float lo = ElemTraits<T>::to_float(static_cast<unsigned short>(v & 0xffff));
            const float hi = ElemTraits<T>::to_float(static_cast<unsigned short>(v >> 16));
            s[c * 4 + 2 * r] = fmaf(lo, p.bias_raw, s[c * 4 + 2 * r]);
            s[c * 4 + 2 * r + 1] = fmaf(hi, p.bias_raw, s[c * 4 + 2 * r + 1]);
          }
        }
      }
      if constexpr (!kGeneral) {
        if (alibi_raw != 0.f) {
          const int base = static_cast<int>(seq.offset) - n0 - col0;  // i' - j = row + base - x
          const float d0[2] = {static_cast<float>(row_i[0] + base),
                               static_cast<float>(row_i[1] + base)};
#pragma unroll
          for (int c = 0; c < kN / 8; ++c)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const float dist = d0[e / 2] - static_cast<float>(c * 8 + (e & 1));
              s[c * 4 + e] = fmaf(-alibi_raw, alibi_abs ? fabsf(dist) : dist, s[c * 4 + e]);
            }
        }
        // The softcap, after the additive terms, before the mask; not in the d64 instances (the
        // branch alone cost their dense forward 3%, run 39: a softcap there runs the general one).
        if constexpr (fast_softcap(kD)) {
          if (p.cap_raw != 0.f) softcap_raw(s, p.cap_raw, p.inv_cap_raw);
        }
        if constexpr (kGrid) {
          const int2 kp = w.patch(t, p.grid);
          grid_mask<kN>(s, p, w.pr0 + cw * 4 + warp, w.pc0 + lane / 4, kp.x, kp.y, col0);
        } else if (tabled) {
          if constexpr (kKeys == 0) {  // (the wide key tiles run without a table: forward.cu)
            const uint8_t entry = tclass[t];
            if (entry >= kTileBits) {  // every partial tile has its bits here (see forward.cu)
              const uint64_t allow = fwd_tile_bits<kM, kN>(tbits, entry, row_i, m0, col0);
#pragma unroll
              for (int c = 0; c < kN / 8; ++c)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                  if (!((allow >> ((e / 2) * (kN / 4) + 2 * c + (e & 1))) & 1))
                    s[c * 4 + e] = kNegInf;
            }
          }
        } else {
          const TileClass c = MaskEval::band(max(m0, 0) + seq.offset, m0 + rows - 1 + seq.offset,
                                             n0, n0 + kN - 1, p.band_left, p.band_right);
          if (c != TileClass::kFull || n0 + kN > nk)
            band_mask<kN>(s, row_i, n0, col0, nk, seq.offset, p.band_left, p.band_right);
        }
      } else {
        // A partial tile's element mask, one bit per score of the thread (bit r * kN / 4 + 2 * c +
        // e for row r, chunk c, column e): from the precomputed bits of its slot, or else from
        // the mask tree at one call site in a rolled loop (the out-of-line call saves the live
        // registers around it; 64 unrolled sites would multiply that code).
        constexpr int kBitsPerRow = kN / 4;
        uint64_t allow = ~uint64_t{0};
        const uint8_t entry = tclass[t];
        if (entry >= kTileBits) {
          allow = fwd_tile_bits<kM, kN>(tbits, entry, row_i, m0, col0);
        } else if (static_cast<TileClass>(entry) != TileClass::kFull) {
          allow = 0;
#pragma unroll 1
          for (int x = 0; x < 2 * kBitsPerRow; ++x) {
            const int y = x % kBitsPerRow;
            const int j = n0 + (y / 2) * 8 + col0 + (y & 1);
            const int i = x < kBitsPerRow ? row_i[0] : row_i[1];
            if (i < nq && j < nk && mask_allowed(ms.mask, p.num_nodes, i, j))
              allow |= uint64_t{1} << x;
          }
        }
        // One unrolled loop per step present (a loop doing every step per score is too much
        // code for the instruction cache).
        const float scale = p.scale;
        each_score<kN>(s, n0, col0, [&](float& x, int, int) { x *= scale; });
        if (additive) add_score_terms<kN>(s, mods, row_i, seq.offset, n0, col0, nq, nk);
        if (cap != 0.f)
          each_score<kN>(s, n0, col0,
                         [&](float& x, int, int) { x = cap * fast_tanh(x * inv_cap); });
        if (prescale)
          each_score<kN>(s, n0, col0,
                         [&](float& x, int r, int) {
                           x = length_scaled(x, lscale[r]);
                         });
#pragma unroll
        for (int c = 0; c < kN / 8; ++c)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int r = e / 2, j = n0 + c * 8 + col0 + (e & 1);
            const bool ok = row_i[r] < nq && j < nk &&
                            ((allow >> (r * kBitsPerRow + 2 * c + (e & 1))) & 1);
            s[c * 4 + e] = ok ? s[c * 4 + e] : kNegInf;
          }
      }
    };
    // S -> P in place; alpha receives each row's rescale factor of O.
    auto normalize = [&](float (&s)[kSRegs], float (&alpha)[2]) {
      if constexpr (kGeneral)  // the normalized kernel: a softmax over its log weights
        if (norm == NormalizerKind::kKernel) {
          const KernelFeature feature = p.feature;
          const float power = p.power;
          each_score<kN>(s, 0, 0, [&](float& x, int, int) {
            x = x != kNegInf ? fast_kernel_log_weight(x, feature, power) : kNegInf;
          });
        }
      if (softmax || norm == NormalizerKind::kKernel) {
#pragma unroll
        for (int r = 0; r < 2; ++r)
          alpha[r] = softmax_row<kN, kGeneral || kBias>(s, r, to2, m[r], l[r]);
      } else if constexpr (kGeneral) {
        // Masked scores (-inf) weigh 0. Sigmoid's weights times kSigmoidWeightScale (store_rows
        // takes it back).
        if (norm == NormalizerKind::kSigmoid) {
          each_score<kN>(s, 0, 0, [&](float& x, int, int) {
            x = x != kNegInf ? fast_sigmoid(x + beta) * kSigmoidWeightScale : 0.f;
          });
        } else {  // ReLA
          each_score<kN>(s, 0, 0,
                         [&](float& x, int, int) { x = x != kNegInf ? fmaxf(x, 0.f) : 0.f; });
        }
        alpha[0] = alpha[1] = 1.f;
      }
    };
    auto issue_pv = [&](uint32_t (&a)[kN / 16][4], int st) {
      fence_regs(o);
      wgmma_fence();
      const uint64_t db0 = smem_desc(sV(st), kN * 128, 1024);
#pragma unroll
      for (int kk = 0; kk < kN / 16; ++kk)
        Wgmma<kDVp, Tag>::rs(o, a[kk], desc_add(db0, kk * 16 * 128), 1);
      wgmma_commit();
    };

    if (t < t_end) {
      uint32_t pa[kN / 16][4];
      float alpha[2];

      // The first tile: S alone, issued above (the loop below is not entered with a condition
      // on the first iteration: ptxas then serializes the asynchronous matrix multiplies).
      zero_o();  // (after the wait: an accumulator written under a wgmma serializes them)
      // Q's buffer is released once the item's last S is done, so that the next item's Q
      // loads while this one's last normalization and P V run.
      int t_next = next_tile(t + 1);
      if (t_next >= t_end) release(empty_q);
      if constexpr (!kBias) release(empty_k(st0));
      score(s, t, st0);
      if constexpr (kBias) release(empty_k(st0));  // score read the stage's bias tile
      normalize(s, alpha);
      alpha[0] = alpha[1] = 1.f;  // O is still 0
      pack_p<T, kN>(s, pa);

      // Each next tile (the ring's tile `ring`): its S, issued with P V of the tile before; it is
      // normalized while P V runs.
      for (t = t_next; t < t_end; t = t_next) {
        t_next = next_tile(t + 1);
        const int st = ++ring % kStages, prev = (ring - 1) % kStages;
        if (pingpong) named_sync(my_turn, 256);
        mbar_wait(full_k(st), phase_of(ring));
        issue_s(s, st);
#pragma unroll
        for (int r = 0; r < 2; ++r) scale_row<kDVp>(o, r, alpha[r]);
        mbar_wait(full_v(prev), phase_of(ring - 1));
        issue_pv(pa, prev);
        if (pingpong) named_arrive(other_turn, 256);
        wgmma_wait<1>();
        fence_regs(s);
        if (t_next >= t_end) release(empty_q);  // S of the item's last tile is done
        if constexpr (!kBias) release(empty_k(st));
        score(s, t, st);
        if constexpr (kBias) release(empty_k(st));
        normalize(s, alpha);
        wgmma_wait<0>();
        fence_regs(o);
        fence_regs_u(pa);
        release(empty_v(prev));
        pack_p<T, kN>(s, pa);
      }

      // P V of the last tile.
      const int last = ring % kStages;
      if (pingpong && !turns_run_on) named_sync(my_turn, 256);
#pragma unroll
      for (int r = 0; r < 2; ++r) scale_row<kDVp>(o, r, alpha[r]);
      mbar_wait(full_v(last), phase_of(ring));
      issue_pv(pa, last);
      // (the last warpgroup has no turn left in this item)
      if (pingpong && !turns_run_on && cw != kConsumers - 1) named_arrive(other_turn, 256);
      wgmma_wait<0>();
      fence_regs(o);
      fence_regs_u(pa);
      release(empty_v(last));
      ++ring;
    } else {
      zero_o();
      release(empty_q);
    }
  }
  if (tma_out && o_leader) bulk_wait<0>();  // the CTA's last stores are done
}

// Launches one flavor on `stream` (the general one reads the block table built by the caller;
// the fast one with fast_bias is its kBias instance).
template <class T, int kD, int kDV, bool kGeneral>
cudaError_t launch_fwd(const FwdParams& p, const TmaMaps& maps, cudaStream_t stream) {
  using S = FwdShape<kD, kDV>;
  const bool bias = !kGeneral && p.fast_bias;
  auto kernel = bias ? fwd_kernel<T, kD, kDV, kGeneral, !kGeneral> : fwd_kernel<T, kD, kDV, kGeneral>;
#ifdef ATTNKIT_CUDA_GRID_TILES
  if constexpr (!kGeneral && S::kN == kGridRows * kGridCols)
    if (p.grid.w > 0) kernel = fwd_kernel<T, kD, kDV, false, false, true>;
#endif
  int smem = bias ? S::kBiasSmemBytes : S::kSmemBytes, threads = S::kThreads;
  if constexpr (!kGeneral && kD == 64 && kDV == 64)
    if (p.rows192) {  // three consumer warpgroups (FwdParams::rows192)
      using S3 = FwdShape<kD, kDV, 192>;
      kernel = fwd_kernel<T, kD, kDV, false, false, false, 192>;
      smem = S3::kSmemBytes, threads = S3::kThreads;
    }
  if constexpr (!kGeneral && kD == 128 && kDV == 128)
    if (p.keys176) {  // key tiles of 176 (FwdParams::keys176), two stages
      if (bias || p.grid.w > 0 || p.tile_class) return cudaErrorInvalidValue;  // (not there)
      kernel = fwd_kernel<T, kD, kDV, false, false, false, 128, kWideKeys>;
      smem = FwdShape<kD, kDV, 128, kWideKeys>::kSmemBytes;
    }
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (e != cudaSuccess) return e;
  if (p.num_items == 0) return cudaSuccess;
  const dim3 grid(p.persistent > 0 ? std::min(p.persistent, p.num_items) : p.num_items);
  kernel<<<grid, threads, smem, stream>>>(p, maps);
  return cudaGetLastError();
}

}  // namespace attnkit::cuda
