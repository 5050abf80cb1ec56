// The general forward's run-time policies on the device: the mask tree's element hook and its
// per-(batch, head) data, the score mods of one (batch, head), and the pre-kernel that classifies
// every (query tile, key tile) of the block table.
#pragma once
#include <cuda_runtime.h>

#include "attnkit/variant/masks.h"
#include "attnkit/variant/score_mods.h"
#include "cuda/fwd_common.cuh"
#include "cuda/fwd_params.h"
#include "cuda/tile_bits.h"

namespace attnkit::cuda {

// The mask tree's element hook as an out-of-line call: inlining every leaf kind into the kernel
// at each use multiplied its code (ptxas ran for minutes); the call is not recursive, so the
// stack size stays static. Tiles are classified before the kernel (classify_tiles_kernel).
static __device__ __noinline__ bool mask_allowed(const MaskEval& m, int count, int64_t i, int64_t j) {
  return m.allowed_flat(count, i, j);
}

// The mask's data of one (batch, head): passed by address to the out-of-line mask hooks, so it
// lives in local memory; the score mods are resolved separately and stay in registers.
struct MaskState {
  MaskEval mask;
  SegmentIds segs[kMaxMaskSegments];
  BlockMapView maps[kMaxBlockMaps];
};

__device__ inline void resolve_mask(const FwdParams& p, int b, int h, int64_t offset,
                                    MaskState& g) {
  for (int s = 0; s < p.num_segments; ++s) {
    const SegmentTemplate& t = p.segments[s];
    g.segs[s].q = t.q + b * t.q_sb;
    g.segs[s].k = t.k + b * t.k_sb;
    g.segs[s].q_stride = t.q_s;
    g.segs[s].k_stride = t.k_s;
    g.segs[s].last = b < 8 ? t.last[b] : 0;
  }
  for (int m = 0; m < p.num_maps; ++m) {
    g.maps[m].data = p.maps[m].data + b * p.maps[m].sb + h * p.maps[m].sh;
    g.maps[m].sr = p.maps[m].sr;
    g.maps[m].sc = p.maps[m].sc;
  }
  g.mask.nodes = p.nodes;
  g.mask.globals = p.globals;
  g.mask.segments = g.segs;
  g.mask.maps = g.maps;
  g.mask.offset = offset;
}

__device__ inline ScoreModEval<float> resolve_mods(const FwdParams& p, int b, int h) {
  ScoreModEval<float> e;
  e.softcap = p.softcap;
  e.alibi = p.alibi;
  if (p.alibi != AlibiMode::kOff)
    e.slope = p.alibi_slopes ? p.alibi_slopes[h * p.slopes_s]
                             : static_cast<float>(alibi_default_slope(h, p.hq));
  if (p.bias) {
    e.bias = static_cast<const char*>(p.bias) +
             (b * p.bias_sb + h * p.bias_sh) * (p.bias_dtype == DType::kF32 ? 4 : 2);
    e.bias_dtype = p.bias_dtype;
    e.bias_si = p.bias_si;
    e.bias_sj = p.bias_sj;
  }
  e.relative = p.relative;
  if (p.relative != RelativeBucketKind::kOff) {
    e.table = p.table + h * p.table_sh;
    e.bidirectional = p.bidirectional;
    e.num_buckets = p.num_buckets;
    e.max_distance = p.max_distance;
    e.clip = p.clip;
    e.bucket_of = p.bucket_of;
    e.bucket_origin = p.bucket_origin;
  }
  if (p.forget_c) e.forget_c = p.forget_c + (static_cast<int64_t>(b) * p.hq + h) * p.forget_stride;
  if (p.lowrank_u) {
    e.u = p.lowrank_u + b * p.u_sb + h * p.u_sh;
    e.w = p.lowrank_w + b * p.w_sb + h * p.w_sh;
    e.rank = p.rank;
    e.u_stride = p.u_sn;
    e.w_stride = p.w_sn;
  }
  return e;
}

// Entries of the block table: TileClass values (empty 0, partial 1, full 2), and kTileBits + s
// for a partial tile whose element mask is precomputed in bit slot s of its query-tile row (the
// kernels then read bits instead of evaluating the mask tree per score).
inline constexpr uint8_t kTileBits = 3;
inline constexpr int kMaxBitSlots = 255 - kTileBits;  // bit slots per query-tile row at most
// The general kernels take bits for their first few partial tiles per query tile (the rest
// evaluate the mask tree); the fast ones run a non-band mask only when every partial tile has
// its bits (GeneralTables::covers).
inline constexpr int kGeneralBitSlots = 16;

// The element mask of a partial tile from its bit slot (entry >= kTileBits) for the forward's
// fragment: bit r * kN / 4 + 2 * c + e for row r of the thread's two (queries row_i), column
// c * 8 + col0 + e. `slots` points at the query tile's slots (whose first row is m0).
template <int kM, int kN>
__device__ __forceinline__ uint64_t fwd_tile_bits(const uint32_t* slots, uint8_t entry,
                                                  const int (&row_i)[2], int m0, int col0) {
  constexpr int kBitsPerRow = kN / 4, kWords = kN / 32;
  static_assert(kN % 32 == 0 && 2 * kBitsPerRow <= 64, "a tile's bits: whole words, 64 a thread");
  uint64_t allow = 0;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const uint32_t* w = slots + ((entry - kTileBits) * kM + row_i[r] - m0) * kWords;
#pragma unroll
    for (int x = 0; x < kWords; ++x)  // chunks c = 4 x .. 4 x + 3 of the row: word x
      allow |= static_cast<uint64_t>(quad_bits(w[x], col0)) << (r * kBitsPerRow + 8 * x);
  }
  return allow;
}

// The same for the backward's transposed fragment (keys as rows; consumer warpgroup cw owns keys
// cw * 64..): bit r * 16 + 2 * c8 + e for key row r of the thread's two, query column c8 * 8 +
// col0 + e. The thread's two keys are bits b0 and b0 + 8 of word (cw * 64 + warp * 16) / 32.
template <int kM, int kN>
__device__ __forceinline__ uint32_t bwd_tile_bits(const uint32_t* slots, uint8_t entry, int cw,
                                                  int warp, int lane) {
  static_assert(kM == 64, "32 scores per thread: 2 key rows x 16 query columns");
  const int col0 = 2 * (lane % 4);
  const uint32_t* w = slots + (entry - kTileBits) * kM * (kN / 32) + cw * 2 + warp / 2;
  const int b0 = (warp % 2) * 16 + lane / 4;
  uint32_t allow = 0;
#pragma unroll
  for (int c8 = 0; c8 < kM / 8; ++c8)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const uint32_t word = w[(c8 * 8 + col0 + e) * (kN / 32)];
#pragma unroll
      for (int r = 0; r < 2; ++r) allow |= ((word >> (b0 + 8 * r)) & 1u) << (r * 16 + 2 * c8 + e);
    }
  return allow;
}

// The block table and element-mask bits, in two passes of kClassifyThreads-thread blocks.
// classify_tiles_kernel: block (x, y, z) = (query tile, head, batch) of the table's extents
// classifies its query tile's row of key tiles (shared memory, p.tc_nkt bytes), numbers the
// first p.tb_slots partial tiles in key order, and writes the row, its slot list (count, then
// the slots' key tiles: slots[row * (p.tb_slots + 1)]) and its span (the first non-empty key
// tile and one past the last, or 0 and 0: span[2 row]). Key tiles past the sequence are empty; a
// full tile that the sequence ends in is partial (the kernels mask its tail).
inline constexpr int kClassifySplit = 8, kClassifyThreads = 256, kBitsRows = 32;
// Key tiles of a row at most: the classification keeps a byte each in shared memory (227 KB,
// less the span's two words).
inline constexpr int kMaxClassifyTiles = 227 * 1024 - 16;
// Where FwdParams::tc_seg_ranges: after the row's bytes (8-aligned), each segment tensor's
// lowest and highest id over the query tile (2 ints each), then over each key tile.
__host__ __device__ constexpr int64_t classify_seg_at(int64_t nkt) { return (nkt + 7) / 8 * 8; }
__host__ __device__ constexpr int64_t classify_smem(int64_t nkt, int num_segments) {
  return classify_seg_at(nkt) + 8 * static_cast<int64_t>(num_segments) * (1 + nkt);
}

// The segment id ranges of classify_tiles_kernel's tiles, gathered by the whole block (a warp's
// 32 keys lie in one key tile: a warp's minimum and maximum, then one shared atomic each):
// TileTokens::seg for MaskEval::seg_range, which otherwise reads a tile's ids in one thread (the
// query tile's and a key tile's, 256 loads: classify 17-19 us a pass of the per-call document
// case, run 118). Segment tensors no node reads (null) keep empty ranges.
template <int kM, int kN>
__device__ void gather_seg_ranges(const FwdParams& p, const MaskState& ms, const SeqExtent& s,
                                  int m0, int32_t* seg) {
  static_assert(kN % 32 == 0 && kClassifyThreads % 32 == 0);
  const int ns = p.num_segments, lane = threadIdx.x % 32;
  for (int x = threadIdx.x; x < 2 * ns * (1 + p.tc_nkt); x += blockDim.x)
    seg[x] = x % 2 ? INT32_MIN : INT32_MAX;
  __syncthreads();
  auto add = [&](int32_t* at, bool valid, int32_t id) {
    const int lo = __reduce_min_sync(0xffffffffu, valid ? id : INT32_MAX);
    const int hi = __reduce_max_sync(0xffffffffu, valid ? id : INT32_MIN);
    if (lane == 0 && lo <= hi) {
      atomicMin(at, lo);
      atomicMax(at + 1, hi);
    }
  };
  const int qn = min(kM, s.nq - m0);
  for (int g = 0; g < ns; ++g) {
    const SegmentIds& ids = ms.segs[g];
    if (!ids.q || !ids.k) continue;
    for (int x0 = threadIdx.x - lane; x0 < qn; x0 += blockDim.x) {
      const int x = x0 + lane;
      add(seg + 2 * g, x < qn, x < qn ? ids.q[(m0 + x) * ids.q_stride] : 0);
    }
#pragma unroll 4
    for (int j0 = threadIdx.x - lane; j0 < s.nk; j0 += blockDim.x) {
      const int j = j0 + lane;
      add(seg + 2 * (ns * (1 + j0 / kN) + g), j < s.nk, j < s.nk ? ids.k[j * ids.k_stride] : 0);
    }
  }
}
template <int kM, int kN>
__global__ void __launch_bounds__(kClassifyThreads)
    classify_tiles_kernel(const __grid_constant__ FwdParams p, uint8_t* table, int32_t* slots,
                          int32_t* span) {
  extern __shared__ uint8_t cls[];
  __shared__ int span_lo, span_hi;
  const int qtile = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const SeqExtent s = seq_extent(p, b);
  MaskState ms;
  resolve_mask(p, b, h, s.offset, ms);
  const int m0 = qtile * kM;
  if (threadIdx.x == 0) {
    span_lo = p.tc_nkt;
    span_hi = -1;
  }
  int32_t* seg = reinterpret_cast<int32_t*>(cls + classify_seg_at(p.tc_nkt));
  if (p.tc_seg_ranges) gather_seg_ranges<kM, kN>(p, ms, s, m0, seg);
  __syncthreads();
  int lo = p.tc_nkt, hi = -1;
  for (int kt = threadIdx.x; kt < p.tc_nkt; kt += blockDim.x) {
    const int n0 = kt * kN;
    TileClass c = TileClass::kEmpty;
    if (m0 < s.nq && n0 < s.nk) {
      TileTokens q, k;
      q.start = q.lo = m0;
      q.count = min(kM, s.nq - m0);
      q.hi = m0 + q.count - 1;
      k.start = k.lo = n0;
      k.count = min(kN, s.nk - n0);
      k.hi = n0 + k.count - 1;
      if (p.tc_seg_ranges) {
        q.seg = seg;
        k.seg = seg + 2 * p.num_segments * (1 + kt);
      }
      c = ms.mask.classify_flat(p.num_nodes, q, k);
      if (c == TileClass::kFull && k.count < kN) c = TileClass::kPartial;
    }
    cls[kt] = static_cast<uint8_t>(c);
    if (c != TileClass::kEmpty) {
      lo = min(lo, kt);
      hi = max(hi, kt);
    }
  }
  if (lo <= hi) {
    atomicMin(&span_lo, lo);
    atomicMax(&span_hi, hi);
  }
  __syncthreads();
  const int64_t row = (static_cast<int64_t>(b) * gridDim.y + h) * gridDim.x + qtile;
  int32_t* list = slots + row * (p.tb_slots + 1);
  if (threadIdx.x == 0) {
    const bool any = span_lo <= span_hi;
    span[2 * row] = any ? span_lo : 0;
    span[2 * row + 1] = any ? span_hi + 1 : 0;
    int n = 0;
    for (int kt = 0; kt < p.tc_nkt && n < p.tb_slots; ++kt)
      if (cls[kt] == static_cast<uint8_t>(TileClass::kPartial)) {
        list[1 + n] = kt;
        cls[kt] = static_cast<uint8_t>(kTileBits + n++);
      }
    list[0] = n;
  }
  __syncthreads();
  uint8_t* out = table + b * p.tc_sb + h * p.tc_sh + static_cast<int64_t>(qtile) * p.tc_nkt;
  for (int kt = threadIdx.x; kt < p.tc_nkt; kt += blockDim.x) out[kt] = cls[kt];
}

// tile_bits_kernel: block (x, y, z) = ((query tile * split + part) * kParts + rows, head,
// batch), split = min(p.tb_slots, kClassifySplit) and kParts = kM / kBitsRows, computes query
// rows [kBitsRows rows, kBitsRows (rows + 1)) of its row's slots part, part + split, ...: a lane
// per key of a 32-bit word, a warp per query row, each warp's kBitsRows / 8 rows tested before
// their ballots. A warp's tests are a chain of loads (document ids, the tree's data in local
// memory): with a slot's 128 rows in one block they chained 64 deep (run 119: the per-call
// document forward's bits 157 -> 66 us, the backward's 95 -> 66 us). A mask of one leaf of the
// common kinds has its element test inlined; other masks call the tree's out-of-line test (its
// data in local memory). (H200 run 32: neighborhood 1.245 -> 1.196 ms.)
template <int kM, int kN>
__global__ void __launch_bounds__(kClassifyThreads)
    tile_bits_kernel(const __grid_constant__ FwdParams p, const int32_t* slots, uint32_t* bits) {
  constexpr int kParts = kM / kBitsRows, kWords = kN / 32, kWarps = kClassifyThreads / 32;
  static_assert(kM % kBitsRows == 0 && kBitsRows % kWarps == 0);
  constexpr int kRows = kBitsRows / kWarps;  // a warp's rows of a word
  const int split = max(1, min(p.tb_slots, kClassifySplit));
  const int rows = blockIdx.x % kParts, x = blockIdx.x / kParts;
  const int qtile = x / split, part = x % split;
  const int h = blockIdx.y, b = blockIdx.z;
  const int64_t row =
      (static_cast<int64_t>(b) * gridDim.y + h) * (gridDim.x / (split * kParts)) + qtile;
  const int32_t* list = slots + row * (p.tb_slots + 1);
  const int num_slots = list[0];
  if (part >= num_slots) return;
  const SeqExtent s = seq_extent(p, b);
  MaskState ms;
  resolve_mask(p, b, h, s.offset, ms);
  const int m0 = qtile * kM, r0 = rows * kBitsRows + threadIdx.x / 32, lane = threadIdx.x % 32;
  uint32_t* out = bits + b * p.tb_sb + h * p.tb_sh + qtile * p.tb_sq;
  // test(row(i), key(j)): a row's half of the test once a block, a key's once a word.
  auto each_bit = [&](auto row, auto key, auto test) {
    decltype(row(0)) rs[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) rs[r] = row(m0 + r0 + r * kWarps);
    for (int slot = part; slot < num_slots; slot += split) {
      const int kt = list[1 + slot];
#pragma unroll 1
      for (int w = 0; w < kWords; ++w) {
        const int j = kt * kN + w * 32 + lane;
        const auto ks = key(j);
        bool ok[kRows];
#pragma unroll
        for (int r = 0; r < kRows; ++r)
          ok[r] = m0 + r0 + r * kWarps < s.nq && j < s.nk && test(rs[r], ks);
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          const uint32_t word = __ballot_sync(0xffffffffu, ok[r]);
          if (lane == 0)
            out[(static_cast<int64_t>(slot) * kM + r0 + r * kWarps) * kWords + w] = word;
        }
      }
    }
  };
  // The leaf (kernel parameter space): within each case the compiler folds allowed_leaf's
  // switch on its kind.
  const MaskNode& n = p.nodes[0];
  const MaskEval& m = ms.mask;
  auto index = [](int64_t x) { return x; };
  auto leaf = [&](int64_t i, int64_t j) { return m.allowed_leaf(n, i, j); };
  switch (p.num_nodes == 1 ? n.kind : MaskKind::kAnd) {
    case MaskKind::kDocument:
      each_bit(index, index, leaf);
      break;
    case MaskKind::kNeighborhood:  // the leaf's test in its query's and key's halves
      if (MaskEval::narrow_grid(n))  // (i and j are ints)
        each_bit([&](int64_t i) { return MaskEval::na_side<uint32_t>(n, i, true); },
                 [&](int64_t j) { return MaskEval::na_side<uint32_t>(n, j, false); },
                 [&](const auto& q, const auto& k) { return MaskEval::na_allowed(n, q, k); });
      else
        each_bit(index, index, leaf);
      break;
    case MaskKind::kBlockAttention:
      each_bit(index, index, leaf);
      break;
    default:
      each_bit(index, index,
               [&](int64_t i, int64_t j) { return mask_allowed(m, p.num_nodes, i, j); });
  }
}

// Applies f(x, r, j) to every score of a thread's accumulator fragment (row r of its two, key j).
template <int kN, class F>
__device__ __forceinline__ void each_score(float (&s)[kN / 2], int n0, int col0, F f) {
#pragma unroll
  for (int c = 0; c < kN / 8; ++c)
#pragma unroll
    for (int e = 0; e < 4; ++e) f(s[c * 4 + e], e / 2, n0 + c * 8 + col0 + (e & 1));
}

// A fragment's coordinates: the forward's rows are queries and its columns keys; the backward's
// transposed tiles (kT) have keys as rows and queries as columns. f(x, r, i, j) sees row r of the
// thread's two, query i and key j.
template <int kN, bool kT, class F>
__device__ __forceinline__ void each_score_ij(float (&s)[kN / 2], const int (&rows)[2], int n0,
                                              int col0, F f) {
  each_score<kN>(s, n0, col0, [&](float& x, int r, int col) {
    if constexpr (kT)
      f(x, r, col, rows[r]);
    else
      f(x, r, rows[r], col);
  });
}

// The additive score mods of ScoreModEval::additive on a tile fragment, one unrolled loop per
// term present (a loop of every term per score made the kernel's code too large to run from the
// instruction cache). `rows` are the thread's two row indices (queries, or keys when kT) and n0
// the tile's first column. Queries past nq and keys past nk are clamped for the reads; their
// scores are masked afterwards.
template <int kN, bool kT = false>
__device__ __forceinline__ void add_score_terms(float (&s)[kN / 2], const ScoreModEval<float>& m,
                                                const int (&rows)[2], int64_t offset, int n0,
                                                int col0, int nq, int nk) {
  auto query = [&](int i) { return min(i, nq - 1); };
  auto key = [&](int j) { return min(j, nk - 1); };
  auto each = [&](auto f) { each_score_ij<kN, kT>(s, rows, n0, col0, f); };
  if (m.bias) {
    const int64_t si = m.bias_si, sj = m.bias_sj;
    switch (m.bias_dtype) {
      case DType::kBF16: {
        const auto* bias = static_cast<const __nv_bfloat16*>(m.bias);
        each([&](float& x, int, int i, int j) {
          x += __bfloat162float(bias[query(i) * si + key(j) * sj]);
        });
        break;
      }
      case DType::kF16: {
        const auto* bias = static_cast<const __half*>(m.bias);
        each([&](float& x, int, int i, int j) {
          x += __half2float(bias[query(i) * si + key(j) * sj]);
        });
        break;
      }
      default: {
        const auto* bias = static_cast<const float*>(m.bias);
        each([&](float& x, int, int i, int j) { x += bias[query(i) * si + key(j) * sj]; });
      }
    }
  }
  if (m.u) {
    each([&](float& x, int, int i, int j) {
      const float* u = m.u + query(i) * m.u_stride;
      const float* w = m.w + key(j) * m.w_stride;
      float acc = 0.f;
#pragma unroll 1
      for (int64_t k = 0; k < m.rank; ++k) acc += u[k] * w[k];
      x += acc;
    });
  }
  const int off = static_cast<int>(offset);
  if (m.alibi == AlibiMode::kCausal)
    each([&](float& x, int, int i, int j) { x -= m.slope * static_cast<float>(i + off - j); });
  if (m.alibi == AlibiMode::kSymmetric)
    each([&](float& x, int, int i, int j) { x -= m.slope * static_cast<float>(abs(i + off - j)); });
  if (m.relative != RelativeBucketKind::kOff)
    each([&](float& x, int, int i, int j) {
      x += m.table[m.bucket_of[j - (i + off) + m.bucket_origin]];
    });
  if (m.forget_c)
    each([&](float& x, int, int i, int j) {
      x += static_cast<float>(m.forget_c[key(i + off)] - m.forget_c[key(j)]);
    });
}

}  // namespace attnkit::cuda
