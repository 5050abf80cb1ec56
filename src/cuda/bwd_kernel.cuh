// The CUDA backward kernel (sm_90a): dK, dV and dQ of one key tile per CTA, FlashAttention-3's
// arrangement on the forward's building blocks.
//
// A CTA of three warpgroups owns 128 keys of one (batch, kv head) and walks every query tile of
// 64 rows that visits them, for each query head of the group:
// - warpgroup 0 is the producer: one thread copies K and V of the key tile once, then Q and dO of
//   each visiting query tile into a ring of kStages stages (TMA, full/empty mbarriers).
// - warpgroups 1 and 2 own 64 keys each and keep dK and dV of their keys in registers. Per query
//   tile they compute the transposed tiles S^T = K Q^T and dP^T = V dO^T (rows are keys), the
//   weights P^T and dS^T = P^T (dP^T - D) in registers, then dV += P^T dO and dK += dS^T Q with P^T
//   and dS^T as register operands. The fast flavor overlaps: P^T is computed while dP^T is still
//   multiplied, and dS^T while dV is. dS^T also goes to shared memory, where both warpgroups read
//   it for dQ = dS K (each computes half of dQ's columns); scale * dQ is then written in fp32
//   over the stage (both warpgroups done with its Q and dO; or into a buffer of its own where
//   shared memory has room, kDqOwn), and warp 1 of the producer warpgroup adds the whole tile
//   into dq's fp32 scratch (rows laid out as the tile's) with one reduce-add of the copy engine
//   before it hands the tile back.
// The scale multiplies dK once at the end and each tile's dQ (dS excludes it).
// Head dims above 128 (BwdShape::kSplit): the key tile is 64 keys, which both consumer
// warpgroups take (each computes S^T and dP^T); they split the 64-column panels of dK, dV and dQ
// (bwd_panel), warpgroup 0 alone writes dS^T and the general flavor's extras, and dQ is
// computed a panel at a time once dV and dK are done.
//
// Flavors per (dtype, head dims), as in the forward pass: kGeneral = false is softmax (or with a
// sink) under a band mask, or with kTabled under any mask whose block table (query tiles of 64
// rows) gives every partial tile its bits (its own instance: the table's code in the band's
// instance cost it 10% in registers); kGeneral = true runs every mask through the block table of
// classify_tiles_kernel, every score mod and normalizer.
#pragma once
#include <cuda.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "cuda/fwd_common.cuh"
#include "cuda/fwd_mask.cuh"
#include "cuda/fwd_params.h"
#include "cuda/sm90_ops.cuh"

namespace attnkit::cuda {

// The fp32 row stride of the shared dQ tile and of dq's scratch (H200 run 34: one bulk
// reduce-add per step beats a copy per row by 13-16% at d128 and the consumers' atomics at d64
// by 10-15%; docs/perf/gpu.md).
constexpr int bwd_dq_stride(int d) { return (d + 63) / 64 * 64 + 4; }

// The backward's arguments: the forward problem (its block table built for query tiles of kM
// rows) and the gradients' pointers: dq is an fp32 scratch with rows of bwd_dq_stride(d) floats
// (converted into the caller's dq by the kernel or after it), dk and dv fp32 or 16-bit; row
// (b, h, n) at ptr + b * sb + h * sh + n * sn.
struct BwdParams {
  FwdParams f;
  // Per (b * hq + h) row of stat_stride floats (query tiles padded): LSE * log2(e) (+inf where a
  // row has no weight) and D = dO . out (softmax family).
  const float* lse2 = nullptr;
  const float* dd = nullptr;
  // The normalized kernel's length scale per row (null without one), laid out as lse2: the
  // third row of a stage's stats.
  const float* lscale = nullptr;
  int64_t stat_stride = 0;
  float* dq = nullptr;
  // dq converted by the kernel (fused_dq, for short rows): each CTA of a (b, kv head) counts
  // itself in group_done[b * hk + kv head] (zeroed by the preparation) once its reduce-adds
  // have landed, and the last one converts the group's rows of the scratch into the caller's dq
  // (dq_vec4: 16-bit rows of 8-byte aligned quads). Otherwise a kernel converts them after.
  bool fused_dq = false;
  int* group_done = nullptr;
  void* dq_out = nullptr;
  DType dq_out_dtype = DType::kF32;
  int64_t dqo_sb = 0, dqo_sh = 0, dqo_sn = 0;
  bool dq_vec4 = false;
  void* dk = nullptr;
  void* dv = nullptr;
  DType dk_dtype = DType::kF32, dv_dtype = DType::kF32;
  int64_t dq_sb = 0, dq_sh = 0, dq_sn = 0, dk_sb = 0, dk_sh = 0, dk_sn = 0;
  int64_t dv_sb = 0, dv_sh = 0, dv_sn = 0;
  // Gradients of the score mods' tensors (general flavor), from g = dL/d(additive terms) per
  // allowed pair: dbias, and fp32 / fp64 scratch sums the host stores afterwards: dslopes [hq],
  // dtable [hq][kMaxBwdBuckets], dbeta [1], and the forget gate's dc [b * hq + h][dc_stride] (d
  // of its prefix sums). dbias is stored per pair in its dtype when no dims are broadcast
  // (dbias_direct: each element has one pair), else added in place in fp32 (stride 0 on the
  // broadcast dims).
  void* dbias = nullptr;
  DType dbias_dtype = DType::kF32;
  bool dbias_direct = false;
  int64_t db_sb = 0, db_sh = 0, db_si = 0, db_sj = 0;
  // The tabled fast flavor with fast_bias: dbias (16-bit, q's dtype, no broadcast dims) is stored
  // tile by tile through BwdMaps::dbias.
  bool dbias_tma = false;
  // dK and dV in 16 bits by the copy engine (BwdMaps::dk, dv; not kSplit): each warpgroup stages
  // its 64 keys' rows over K and V once the walk is done; else the threads store their pairs.
  bool tma_dkdv = false;
  // The tabled fast flavor walks each key tile's column from its first to its last non-empty
  // query tile (found by the CTA's threads at once), not from the first to the last tile.
  bool col_range = false;
  double* dslopes = nullptr;
  float* dtable = nullptr;
  int table_buckets = 0;  // the relative table's columns (T5: num_buckets; clipped: 2 clip + 1)
  double* dbeta = nullptr;
  float* dc = nullptr;
  int64_t dc_stride = 0;
  // Low-rank factors' gradients (fp32, added in place): dU [B, Hq, Nq, r], dW [B, Hq, Nk, r].
  float* du = nullptr;
  float* dw = nullptr;
  int64_t du_sb = 0, du_sh = 0, du_sn = 0, du_sr = 1, dw_sb = 0, dw_sh = 0, dw_sn = 0, dw_sr = 1;
  bool extras = false;  // any of the above (but dbeta, summed with the weights)
  int num_k_tiles = 0;  // of the longest key sequence
};

// Tensor maps of the backward: q, k, v as in the forward (boxes of 64 query rows and BwdShape::kN
// key rows) and dO (boxes of 64 rows).
// With the tabled fast flavor's bias (FwdParams::fast_bias), qkv.bias is the bias in boxes of 64
// keys x 64 queries and dbias the 16-bit dbias the same way (BwdParams::dbias_tma).
struct BwdMaps {
  TmaMaps qkv;
  CUtensorMap dout, dbias, dk, dv;  // dk, dv: BwdParams::tma_dkdv (boxes of 64 rows)
  int o_hm = 1, o_bm = 1, dbias_hm = 0, dbias_bm = 0, dk_hm = 0, dk_bm = 0, dv_hm = 0, dv_bm = 0;
};

inline constexpr int kMaxBwdBuckets = 256;  // relative buckets the CUDA backward differentiates

// Head dims above 128 (BwdShape::kSplit): the 64-column panel that slot `slot` of consumer
// warpgroup cw holds of a matrix of `panels` panels (dK, dV or dQ), or -1. Warpgroup `first`
// takes the first half (rounded up), the other the rest; dK and dQ start with warpgroup 0 and dV
// with warpgroup 1, so that at d 192 each holds three panels of dK and dV.
__host__ __device__ constexpr int bwd_panel(int panels, int slot, int cw, int first) {
  const int half = (panels + 1) / 2;
  return cw == first ? (slot < half ? slot : -1) : (half + slot < panels ? half + slot : -1);
}

template <int kD, int kDV, bool kGeneral, bool kBias = false>
struct BwdShape {
  static constexpr int kDp = (kD + 63) / 64 * 64;
  static constexpr int kDVp = (kDV + 63) / 64 * 64;
  static_assert(kDp <= 256 && kDVp <= 256, "head dims up to 256");
  // Head dims above 128: dK and dV of 64 keys do not fit one warpgroup's registers, so both
  // consumer warpgroups take the same 64 keys (each computes S^T and dP^T) and split the
  // 64-column panels of dK, dV and dQ between them (bwd_panel).
  static constexpr bool kSplit = kDp > 128 || kDVp > 128;
  static constexpr int kM = 64;                // query rows per step
  static constexpr int kN = kSplit ? 64 : 128;  // keys per CTA (64 per warpgroup unless kSplit)
  static constexpr int kKSlots = (kDp / 64 + 1) / 2, kVSlots = (kDVp / 64 + 1) / 2;  // kSplit
  static constexpr int kThreads = 384;
  static constexpr int kKBytes = kN * kDp * 2, kVBytes = kN * kDVp * 2;
  static constexpr int kQBytes = kM * kDp * 2, kOBytes = kM * kDVp * 2;
  // lse2, D and (the normalized kernel's length scale) ls of the query tile (3 * kM floats),
  // padded so that stages start on the 1024-byte boundaries of the swizzled layout.
  static constexpr int kStatBytes = 1024;
  static_assert(3 * kM * 4 <= kStatBytes);
  static constexpr int kDsBytes = kN * kM * 2;  // dS^T: kN key rows x 64 query columns
  // scale * dQ of the step, fp32 rows of kDqStride floats (16-byte aligned; 2-way bank conflicts
  // on the consumers' stores): in two buffers of its own where shared memory holds them beside
  // three stages (kDqOwn: d <= 64 with dv up to 192 or so, and d 128 x dv 64), else
  // written over the stage once both warpgroups are done with it (the stage then waits for the
  // copy engine's read before it is refilled).
  static constexpr int kDqStride = bwd_dq_stride(kD);
  static constexpr int kDqBytes = kM * kDqStride * 4;
  static constexpr int kDqAligned = (kDqBytes + 1023) / 1024 * 1024;
  static constexpr int kTableBytes = kGeneral ? kMaxBwdBuckets * 4 : 0;  // dtable of a head
  static constexpr int kFixed = kKBytes + kVBytes + 2 * kDsBytes + kTableBytes + 1024 + 128;
  // kBias: the step's bias tile (64 query rows x 128 keys in two 64-key panels) after Q, dO and
  // the stats; its dS tile replaces it (dbias's TMA store), whose read is waited for before dQ
  // is written over the stage.
  static constexpr int kBiasBytes = kBias ? kM * kN * 2 : 0;
  static constexpr int kPlainStage = kQBytes + kOBytes + kStatBytes + kBiasBytes;
  static constexpr int kMaxSmem = 227 * 1024;
  static constexpr bool kDqOwn = kFixed + 2 * kDqAligned + 3 * kPlainStage <= kMaxSmem;
  static constexpr int kDqRing = kDqOwn ? 2 * kDqAligned : 0;
  static constexpr int kBiasOffset = kQBytes + kOBytes + kStatBytes;
  static constexpr int kStageBytes =
      kDqOwn || kPlainStage >= kDqBytes ? kPlainStage : kDqAligned;
  static_assert(kBiasOffset % 1024 == 0, "the bias tile's swizzle needs 1024-byte alignment");
  static constexpr int kStages = kFixed + kDqRing + 3 * kStageBytes <= kMaxSmem ? 3 : 2;
  static constexpr int kSmemBytes = kFixed + kDqRing + kStages * kStageBytes;
  // What the producer warpgroup gives up (168 - 24 per thread, the launch's cap) is what the
  // consumers take (240 - 168): setmaxnreg.inc waits for free registers, so more would hang.
  static constexpr int kProducerRegs = 24, kConsumerRegs = 240;
  static constexpr int kLaunchRegs = 65536 / kThreads / 8 * 8;  // a thread's at launch: 168
  static_assert(128 * (kProducerRegs + 2 * kConsumerRegs) <= kThreads * kLaunchRegs,
                "setmaxnreg would wait forever");
};

// Element i of an fp32, bf16 or fp16 gradient row.
__device__ __forceinline__ void store_grad_elem(void* row, DType t, int i, float v) {
  switch (t) {
    case DType::kBF16:
      static_cast<__nv_bfloat16*>(row)[i] = __float2bfloat16(v);
      break;
    case DType::kF16:
      static_cast<__half*>(row)[i] = __float2half(v);
      break;
    default:
      static_cast<float*>(row)[i] = v;
  }
}

// Elements col and col + 1 (where below cols) of a gradient row: one store where they are
// aligned as a pair.
__device__ __forceinline__ void store_grad_pair(void* row, DType t, int col, int cols, float v0,
                                                float v1) {
  const int es = t == DType::kF32 ? 4 : 2;
  char* at = static_cast<char*>(row) + static_cast<int64_t>(col) * es;
  if (col + 1 < cols && reinterpret_cast<uintptr_t>(at) % (2 * es) == 0) {
    if (t == DType::kF32)
      *reinterpret_cast<float2*>(at) = make_float2(v0, v1);
    else if (t == DType::kBF16)
      *reinterpret_cast<__nv_bfloat162*>(at) = __floats2bfloat162_rn(v0, v1);
    else
      *reinterpret_cast<__half2*>(at) = __floats2half2_rn(v0, v1);
    return;
  }
  if (col < cols) store_grad_elem(row, t, col, v0);
  if (col + 1 < cols) store_grad_elem(row, t, col + 1, v1);
}

// Rows [0, rows) of dq's fp32 sums into dq rows of dtype dt from dst (row stride sn elements;
// vec4: 16-bit rows of 8-byte aligned quads), by thread t of kThreadsX: load(r, c, n) reads n =
// 4 (a quad, 16-byte aligned) or 1 floats of row r from column c.
template <int kThreadsX, class Load>
__device__ __forceinline__ void convert_dq_rows(char* dst, DType dt, int64_t sn, bool vec4,
                                                int rows, int d, int t, Load load) {
  if (vec4) {
    const int quads = d / 4;
    for (int x = t; x < rows * quads; x += kThreadsX) {
      const int r = x / quads, c = (x - r * quads) * 4;
      const float4 v = load(r, c, 4);
      const uint2 w = dt == DType::kBF16
                          ? make_uint2(ElemTraits<__nv_bfloat16>::pack(v.x, v.y),
                                       ElemTraits<__nv_bfloat16>::pack(v.z, v.w))
                          : make_uint2(ElemTraits<__half>::pack(v.x, v.y),
                                       ElemTraits<__half>::pack(v.z, v.w));
      *reinterpret_cast<uint2*>(dst + (r * sn + c) * 2) = w;
    }
    return;
  }
  const int es = dt == DType::kF32 ? 4 : 2;
  for (int x = t; x < rows * d; x += kThreadsX) {
    const int r = x / d, c = x - r * d;
    store_grad_elem(dst + r * sn * es, dt, c, load(r, c, 1).x);
  }
}
// The caller's dq (BwdParams::dq_out) from dst.
template <int kThreadsX, class Load>
__device__ __forceinline__ void convert_dq_rows(const BwdParams& bp, char* dst, int rows, int d,
                                                int t, Load load) {
  convert_dq_rows<kThreadsX>(dst, bp.dq_out_dtype, bp.dqo_sn, bp.dq_vec4, rows, d, t, load);
}
// convert_dq_rows' load from fp32 rows in global memory at src, row stride sn, through L2 (where
// other CTAs' reduce-adds landed).
__device__ __forceinline__ auto global_dq_rows(const float* src, int64_t sn) {
  return [=](int r, int c, int n) {
    const float* at = src + r * sn + c;
    return n == 4 ? __ldcg(reinterpret_cast<const float4*>(at))
                  : make_float4(__ldcg(at), 0.f, 0.f, 0.f);
  };
}

// The caller's dq row q0 of head h in batch b.
__device__ __forceinline__ char* dq_out_row(const BwdParams& bp, int b, int h, int64_t q0) {
  const int es = bp.dq_out_dtype == DType::kF32 ? 4 : 2;
  return static_cast<char*>(bp.dq_out) + (b * bp.dqo_sb + h * bp.dqo_sh + q0 * bp.dqo_sn) * es;
}

// fused_dq: counts this CTA in its group's group_done once its reduce-adds have landed (the
// caller's bulk_wait); whether it was the last.
__device__ __forceinline__ bool count_group_done(const BwdParams& bp, int b, int hk) {
  fence_proxy_async_global();
  __threadfence();
  const int old = atomicAdd(bp.group_done + b * bp.f.hk + hk, 1);
  __threadfence();
  return old == bp.num_k_tiles - 1;
}

template <class T, int kD, int kDV, bool kGeneral, bool kTabled, bool kBias = false>
__global__ void __launch_bounds__(384, 1)
    bwd_kernel(const __grid_constant__ BwdParams bp, const __grid_constant__ BwdMaps maps) {
  static_assert(!kBias || (kTabled && !kGeneral), "the bias rides on the tabled fast flavor");
  using S = BwdShape<kD, kDV, kGeneral, kBias>;
  static_assert(!kBias || !S::kSplit, "head dims above 128 take a bias through the general flavor");
  using Tag = typename ElemTraits<T>::Tag;
  constexpr int kM = S::kM, kN = S::kN, kDp = S::kDp, kDVp = S::kDVp, kStages = S::kStages;
  constexpr int kSRegs = kM / 2;  // S^T, dP^T: 64 keys x 64 queries per warpgroup
  constexpr int kDqN = kDp / 2;   // dQ columns per warpgroup
  const FwdParams& p = bp.f;

  extern __shared__ uint8_t smem_raw[];
  const uint32_t sK = (smem_addr(smem_raw) + 1023) & ~1023u;
  const uint32_t sV = sK + S::kKBytes;
  const uint32_t sDS0 = sV + S::kVBytes;
  auto sDS = [&](int x) { return sDS0 + x * S::kDsBytes; };
  const uint32_t sTable = sDS0 + 2 * S::kDsBytes;  // fp32 [kMaxBwdBuckets] (general)
  auto sDQ = [&](int y) { return sTable + S::kTableBytes + y * S::kDqAligned; };  // kDqOwn
  auto sQ = [&](int st) { return sTable + S::kTableBytes + S::kDqRing + st * S::kStageBytes; };
  auto sO = [&](int st) { return sQ(st) + S::kQBytes; };
  auto sStat = [&](int st) { return sO(st) + S::kOBytes; };  // lse2[kM], D[kM] (, ls[kM])
  auto sBias = [&](int st) { return sQ(st) + S::kBiasOffset; };  // kBias
  const uint32_t bars = sQ(kStages);
  const uint32_t bar_kv = bars;
  auto full = [&](int st) { return bars + 8 * (1 + st); };
  auto empty = [&](int st) { return bars + 8 * (1 + kStages + st); };
  auto phase_of = [](int it) { return static_cast<uint32_t>((it / kStages) & 1); };
  // The dQ hand-off of step it: its tile (a buffer of its own, or the stage), the barrier the
  // consumer warps arrive on once it is written, and that barrier's phase; dq_empty(y) hands an
  // own buffer back.
  auto dq_tile = [&](int it) { return S::kDqOwn ? sDQ(it & 1) : sQ(it % kStages); };
  auto dq_full = [&](int it) {
    return bars + 8 * (1 + 2 * kStages + (S::kDqOwn ? it & 1 : it % kStages));
  };
  auto dq_phase = [&](int it) {
    return S::kDqOwn ? static_cast<uint32_t>((it >> 1) & 1) : phase_of(it);
  };
  auto dq_empty = [&](int y) { return bars + 8 * (1 + 3 * kStages + y); };
  // fused_dq: the dq warp's word (whether this CTA is its group's last) and the barriers of the
  // conversion's two staging buffers.
  const uint32_t last_word = bars + 8 * (3 + 3 * kStages);
  auto conv_ld = [&](int y) { return bars + 8 * (4 + 3 * kStages + y); };
  // The tabled fast flavor: the first and last query tiles of the key tile's column that are
  // not empty.
  const uint32_t range_words = bars + 8 * (6 + 3 * kStages);
  static_assert(8 * (6 + 3 * kStages) + 8 <= 128, "the barriers' bytes");

  const int kt = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const SeqExtent seq = seq_extent(p, b);
  const int nq = seq.nq, nk = seq.nk;
  const int n0 = kt * kN;
  if (n0 >= nk) {  // no keys here; with fused_dq, still counted (and perhaps the group's last)
    if (bp.fused_dq) {
      volatile int* last = reinterpret_cast<volatile int*>(smem_raw);
      if (threadIdx.x == 0) *last = count_group_done(bp, b, hk);
      __syncthreads();
      if (*last)
        for (int h = hk * p.group; h < (hk + 1) * p.group; ++h) {
          const float* src = bp.dq + b * bp.dq_sb + h * bp.dq_sh + seq.q_start * bp.dq_sn;
          convert_dq_rows<S::kThreads>(bp, dq_out_row(bp, b, h, seq.q_start), nq, p.d, threadIdx.x,
                                       global_dq_rows(src, bp.dq_sn));
        }
    }
    return;
  }

  // Query tiles that visit this key tile: the band's, or the non-empty ones of the block table's
  // column kt (general, or fast with a table), for each query head of the group.
  int qt_begin = 0, qt_end = nq > 0 ? (nq + kM - 1) / kM : 0;
  constexpr bool tabled = kGeneral || kTabled;
  if constexpr (!tabled) {
    const int64_t lo = n0 - p.band_right - seq.offset;
    const int64_t hi = static_cast<int64_t>(min(n0 + kN, nk)) - 1 + p.band_left - seq.offset;
    qt_begin = static_cast<int>(imax(lo, 0) / kM);
    if (hi < 0) qt_end = 0;
    else if (qt_end > 0) qt_end = static_cast<int>(imin(hi, nq - 1) / kM) + 1;
  }
  // Untabled: the query tiles [qf_begin, qf_end) see the key tile whole (no key past nk, and
  // every key in the band of all kM rows: MaskEval::band's kFull with whole tiles, so a short
  // last tile may take the band's bits needlessly); the others take the band's bits. Found
  // once a CTA, not classified each step.
  int qf_begin = 0, qf_end = 0;
  if constexpr (!tabled) {
    if (n0 + kN <= nk) {
      // The transposed band: the tiles are the query rows (qt kM + offset), left and right
      // swapped.
      MaskEval::band_full_tiles(n0, n0 + kN - 1, p.band_right, p.band_left, seq.offset, kM,
                                qt_end, &qf_begin, &qf_end);
    }
  }
  auto entry_of = [&](int h, int qt) -> uint8_t {
    return p.tile_class[b * p.tc_sb + h * p.tc_sh + static_cast<int64_t>(qt) * p.tc_nkt + kt];
  };
  // The walk visits query tiles qt_begin.. qt_end - 1 but those skip() finds empty (table).
  auto skip = [&](int h, int qt) {
    if constexpr (tabled) return static_cast<TileClass>(entry_of(h, qt)) == TileClass::kEmpty;
    return false;
  };
  const int h_begin = hk * p.group, h_end = h_begin + p.group;

  const int tid = threadIdx.x, wg = tid / 128;
  // Named barriers of fused_dq: the consumers and the dq warp at the end, the consumers around
  // each staged buffer of the conversion.
  constexpr int kEndSync = 7, kConvSync = 8;
  if (tid == 0) {
    mbar_init(bar_kv, 1);
#pragma unroll
    for (int st = 0; st < kStages; ++st) {
      mbar_init(full(st), 1);
      // The consumer warps' (one each), or with dQ over the stage the dq warp's once the copy
      // engine has read it.
      mbar_init(empty(st), S::kDqOwn ? 8 : 1);
      mbar_init(bars + 8 * (1 + 2 * kStages + st), 8);  // dq_full: one per consumer warp
    }
#pragma unroll
    for (int y = 0; y < 2; ++y) {
      mbar_init(dq_empty(y), 1);  // the dq warp's
      mbar_init(conv_ld(y), 1);  // fused_dq: a consumer thread's, with the copy's bytes
    }
    mbar_init_fence();
    if constexpr (kTabled && !kGeneral) {
      asm volatile("st.shared.v2.s32 [%0], {%1, %2};\n" ::"r"(range_words), "r"(qt_end), "r"(-1)
                   : "memory");
    }
  }
  __syncthreads();
  if (kTabled && !kGeneral && bp.col_range) {
    // The walk's range narrowed to the column's first and last non-empty query tiles (over the
    // group's heads), found by every thread at once: under a causal or document mask most of a
    // column is empty, and skip() took one dependent load a tile, up to n0 / kM of them before
    // the first step, in the producer and the consumers alike. (Not yet in the general flavor:
    // behind this switch ptxas spills 504 bytes there instead of 484 at d128, 56 instead of 32
    // at d64; always on, 1044 at d128.)
    const int heads = p.tc_sh == 0 ? 1 : p.group;  // a table shared by the heads: one column
    int lo = qt_end, hi = -1;
    for (int64_t x = tid; x < int64_t{heads} * qt_end; x += S::kThreads) {
      const int qt = static_cast<int>(x % qt_end);
      if (!skip(h_begin + static_cast<int>(x / qt_end), qt)) {
        lo = min(lo, qt);
        hi = max(hi, qt);
      }
    }
    lo = __reduce_min_sync(0xffffffffu, lo);
    hi = __reduce_max_sync(0xffffffffu, hi);
    if (tid % 32 == 0) {
      asm volatile("red.shared.min.s32 [%0], %1;\n" ::"r"(range_words), "r"(lo) : "memory");
      asm volatile("red.shared.max.s32 [%0], %1;\n" ::"r"(range_words + 4), "r"(hi) : "memory");
    }
    __syncthreads();
    asm volatile("ld.shared.v2.s32 {%0, %1}, [%2];\n"
                 : "=r"(lo), "=r"(hi)
                 : "r"(range_words)
                 : "memory");
    qt_begin = lo;
    qt_end = max(lo, hi + 1);
  }

  if (wg == 0) {
    // Producer.
    regs_dec<S::kProducerRegs>();
    if (tid == 0) {
      tma_prefetch_map(&maps.qkv.q);
      tma_prefetch_map(&maps.dout);
      const int bb = p.cu_q ? 0 : b;
      const int k_row = static_cast<int>(seq.k_start) + n0;
      mbar_expect_tx(bar_kv, S::kKBytes + S::kVBytes);
#pragma unroll
      for (int c = 0; c < kDp / 64; ++c)
        tma_load_4d(sK + c * kN * 128, &maps.qkv.k, bar_kv, c * 64, k_row, hk * maps.qkv.k_hm,
                    bb * maps.qkv.k_bm);
#pragma unroll
      for (int c = 0; c < kDVp / 64; ++c)
        tma_load_4d(sV + c * kN * 128, &maps.qkv.v, bar_kv, c * 64, k_row, hk * maps.qkv.v_hm,
                    bb * maps.qkv.v_bm);
      int it = 0;
      for (int h = h_begin; h < h_end; ++h)
        for (int qt = qt_begin; qt < qt_end; ++qt) {
          if (skip(h, qt)) continue;
          const int st = it++ % kStages;
          const uint32_t parity = phase_of(it - 1);
          const int q_row = static_cast<int>(seq.q_start) + qt * kM;
          mbar_wait(empty(st), parity ^ 1);
          mbar_expect_tx(full(st), S::kQBytes + S::kOBytes + (bp.lscale ? 3 : 2) * kM * 4 +
                                       S::kBiasBytes);
          const int64_t stat_row = (static_cast<int64_t>(b) * p.hq + h) * bp.stat_stride + qt * kM;
          bulk_load(sStat(st), bp.lse2 + stat_row, kM * 4, full(st));
          bulk_load(sStat(st) + kM * 4, bp.dd + stat_row, kM * 4, full(st));
          if (bp.lscale) bulk_load(sStat(st) + 2 * kM * 4, bp.lscale + stat_row, kM * 4, full(st));
#pragma unroll
          for (int c = 0; c < kDp / 64; ++c)
            tma_load_4d(sQ(st) + c * kM * 128, &maps.qkv.q, full(st), c * 64, q_row,
                        h * maps.qkv.q_hm, bb * maps.qkv.q_bm);
#pragma unroll
          for (int c = 0; c < kDVp / 64; ++c)
            tma_load_4d(sO(st) + c * kM * 128, &maps.dout, full(st), c * 64, q_row,
                        h * maps.o_hm, bb * maps.o_bm);
          if constexpr (kBias)  // bias[b, h, qt * kM + 0..kM, n0 + 0..kN] in 64-key panels
#pragma unroll
            for (int c = 0; c < kN / 64; ++c)
              tma_load_4d(sBias(st) + c * kM * 128, &maps.qkv.bias, full(st), n0 + c * 64,
                          qt * kM, h * maps.qkv.bias_hm, b * maps.qkv.bias_bm);
        }
    } else if (tid / 32 == 1) {
      // The dq warp: dq's scratch += the step's scale * dQ tile, one fp32 reduce-add of the copy
      // engine (the scratch's rows are the tile's; rows past nq add zeros, to another sequence's
      // rows or the scratch's spare tile); then the tile goes back (the stage to the producer, an
      // own buffer to the consumers) once the copy engine has read it.
      const int lane = tid - 32;
      int it = 0;
      for (int h = h_begin; h < h_end; ++h)
        for (int qt = qt_begin; qt < qt_end; ++qt) {
          if (skip(h, qt)) continue;
          const int st = it % kStages, step = it++;
          float* dq_h = bp.dq + b * bp.dq_sb + h * bp.dq_sh + (seq.q_start + qt * kM) * bp.dq_sn;
          mbar_wait(dq_full(step), dq_phase(step));
          if (lane == 0) {
            bulk_reduce_add_f32(dq_h, dq_tile(step), S::kDqBytes);
            bulk_commit();
            bulk_wait_read<0>();
            mbar_arrive(S::kDqOwn ? dq_empty(step & 1) : empty(st));
          }
          __syncwarp();
        }
      if (lane == 0) bulk_wait<0>();
      if (bp.fused_dq) {  // the group's count, then the word for the consumers (kEndSync)
        if (lane == 0)
          asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(last_word),
                       "r"(static_cast<uint32_t>(count_group_done(bp, b, hk)))
                       : "memory");
        __syncwarp();
        named_sync(kEndSync, 256 + 32);
      }
    }
    return;
  }

  // Consumers: warpgroup cw owns keys n0 + cw * 64 + [0, 64) (kSplit: both take keys
  // n0 + [0, 64), kw = 0, and split the panels of dK, dV and dQ).
  regs_inc<S::kConsumerRegs>();
  const int cw = wg - 1, lane = tid % 32, warp = (tid % 128) / 32;
  const int kw = S::kSplit ? 0 : cw;
  // kSplit: the scores' side products (dS^T's tile, the extras, dbeta) are warpgroup 0's.
  const bool scores_own = !S::kSplit || cw == 0;
  const int key_r[2] = {n0 + kw * 64 + warp * 16 + lane / 4, n0 + kw * 64 + warp * 16 + lane / 4 + 8};
  const int col0 = 2 * (lane % 4);
  // kBias: this lane's row of 8 x 8 block lane / 8 of group j in the warpgroup's 64-key panel of
  // the stage's bias tile (rows are queries, 16-byte chunks of 8 keys swizzled by query % 8);
  // block m of group j holds queries (2 j + m / 2) * 8 + [0, 8) and the warp's key chunk
  // warp * 2 + m % 2 (the accumulator's key rows r = m % 2).
  auto bias_block = [&](int st, int j) {
    const int m = lane / 8, i = lane % 8, kc = warp * 2 + m % 2;
    return sBias(st) + cw * (kM * 128) + ((2 * j + m / 2) * 8 + i) * 128 + ((kc ^ i) * 16);
  };
  // dK and dV of the warpgroup's keys: every column, or (kSplit) 32 registers a panel slot.
  constexpr int kDkRegs = S::kSplit ? S::kKSlots * 32 : kDp / 2;
  constexpr int kDvRegs = S::kSplit ? S::kVSlots * 32 : kDVp / 2;
  float dk[kDkRegs], dv[kDvRegs];
#pragma unroll
  for (int x = 0; x < kDkRegs; ++x) dk[x] = 0.f;
#pragma unroll
  for (int x = 0; x < kDvRegs; ++x) dv[x] = 0.f;
  // kSplit: the `slots` panel slots of acc += A (registers: 64 keys x 64 queries) times this
  // warpgroup's 64-column panels of a stage tile of kM rows (Q for dK, dO for dV). A slot without
  // a panel repeats the last one, not stored: no matrix multiply in a divergent branch (ptxas
  // serialized them).
  auto issue_panels = [&](float* acc, int slots, const uint32_t (&a)[kM / 16][4], uint32_t tile,
                          int panels, int first) {
#pragma unroll
    for (int sl = 0; sl < slots; ++sl) {
      const int own = bwd_panel(panels, sl, cw, first);
      const uint64_t base =
          smem_desc(tile + (own >= 0 ? own : panels - 1) * (kM * 128), kM * 128, 1024);
#pragma unroll
      for (int kk = 0; kk < kM / 16; ++kk)
        Wgmma<64, Tag>::rs(*reinterpret_cast<float(*)[32]>(acc + sl * 32), a[kk],
                           desc_add(base, kk * 16 * 128), 1);
    }
  };

  const NormalizerKind norm =
      kGeneral ? p.norm : (p.sinks ? NormalizerKind::kSoftmaxSink : NormalizerKind::kSoftmax);
  const bool sigmoid = norm == NormalizerKind::kSigmoid;
  // The normalized kernel: P = exp(power log f(s) - log L), a softmax over the log weights; the
  // stat rows hold log L in base 2 as the softmax's LSE.
  // ReLA: P = relu(s) unnormalized; dO is already through the RMS (the preparation's dO1).
  const bool rela = kGeneral && norm == NormalizerKind::kReLA;
  const KernelFeature feature = p.feature;
  const float power = p.power;
  const float to2 = kGeneral ? static_cast<float>(kLog2e) : p.scale_log2;
  const float beta = p.has_beta ? p.beta : -logf(static_cast<float>(nk));
  const float cap = kGeneral ? p.softcap : 0.f;
  const float inv_cap = cap != 0.f ? 1.f / cap : 0.f;

  auto issue_sdp = [&](float (&s)[kSRegs], float (&dp)[kSRegs], int st) {
    wgmma_fence();
    wgmma_ss_panels<kM, Tag, kDp, kN, kM>(s, smem_desc(sK + kw * 64 * 128, 16, 1024),
                                          smem_desc(sQ(st), 16, 1024));
    wgmma_commit();  // S^T, then dP^T: the fast flavor computes P^T while dP^T runs
    wgmma_ss_panels<kM, Tag, kDVp, kN, kM>(dp, smem_desc(sV + kw * 64 * 128, 16, 1024),
                                           smem_desc(sO(st), 16, 1024));
    wgmma_commit();
  };

  mbar_wait(bar_kv, 0);
  int it = 0;
  // The extras' per-thread sums: dslopes and the forget gate's column sums per head, dbeta.
  const bool want_table = kGeneral && bp.dtable;
  float beta_acc = 0.f;
  constexpr int kTableSync = 6;  // named barrier of the consumers around the dtable tile
  for (int h = h_begin; h < h_end; ++h) {
    float slope_acc = 0.f, col_acc[2] = {0.f, 0.f};
    if (want_table) {
      for (int x = tid - 128; x < kMaxBwdBuckets; x += 256)
        asm volatile("st.shared.f32 [%0], %1;\n" ::"r"(sTable + x * 4), "f"(0.f) : "memory");
      named_sync(kTableSync, 256);
    }
    MaskState ms;
    ScoreModEval<float> mods;
    bool additive = false;
    const uint32_t* tbits = nullptr;
    if constexpr (kGeneral) {
      resolve_mask(p, b, h, seq.offset, ms);
      mods = resolve_mods(p, b, h);
      additive = p.has_mods && mods.has_additive();
      tbits = p.tile_bits + b * p.tb_sb + h * p.tb_sh;
    } else if constexpr (kTabled) {
      tbits = p.tile_bits + b * p.tb_sb + h * p.tb_sh;
    }
    // The fast flavor with ALiBi (as the forward's): the term in raw dot-product units.
    const float alibi_raw = !kGeneral && p.fast_alibi ? alibi_slope_raw(p, h) : 0.f;
    for (int qt = qt_begin; qt < qt_end; ++qt) {
      if (skip(h, qt)) continue;
      const int st = it % kStages, m0 = qt * kM;
      float s[kSRegs], dp[kSRegs];
      mbar_wait(full(st), phase_of(it));
      issue_sdp(s, dp, st);
      if constexpr (kGeneral) {
        wgmma_wait<0>();
        fence_regs(dp);
      } else {
        wgmma_wait<1>();
      }
      fence_regs(s);

      // Which scores are allowed: bit r * 16 + 2 * c + e for key row r, query column c * 8 +
      // col0 + e. Keys past nk are masked here; queries past nq have lse2 = +inf (weight 0).
      uint32_t allow = 0xffffffffu;
      bool masked = false;
      if constexpr (!kGeneral) {
        if (alibi_raw != 0.f) {  // s[c8 * 4 + e]: key key_r[e / 2], query m0 + c8 * 8 + col0 + e % 2
          const bool sym = p.alibi == AlibiMode::kSymmetric;
          const int base = m0 + col0 + static_cast<int>(seq.offset);
          const float d0[2] = {static_cast<float>(base - key_r[0]),
                               static_cast<float>(base - key_r[1])};
#pragma unroll
          for (int c8 = 0; c8 < kM / 8; ++c8)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const float dist = d0[e / 2] + static_cast<float>(c8 * 8 + (e & 1));
              s[c8 * 4 + e] = fmaf(-alibi_raw, sym ? fabsf(dist) : dist, s[c8 * 4 + e]);
            }
        }
      }
      if constexpr (!kGeneral && kTabled) {  // every partial tile has its bits (backward.cu)
        const uint8_t entry = entry_of(h, qt);
        masked = static_cast<TileClass>(entry) != TileClass::kFull;
        if (masked)
          allow = bwd_tile_bits<kM, kN>(tbits + qt * p.tb_sq, entry, kw, warp, lane);
        if constexpr (kBias) {
          // bias^T from the stage's tile, 8 x 8 blocks transposed by ldmatrix into the
          // accumulator's layout: register m of group j is the pair s[c8 * 4 + 2 * r + (0, 1)]
          // with c8 = 2 * j + m / 2, r = m % 2.
#pragma unroll
          for (int j = 0; j < kM / 16; ++j) {
            uint32_t v[4];
            asm volatile(
                "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                : "=r"(v[0]), "=r"(v[1]), "=r"(v[2]), "=r"(v[3])
                : "r"(bias_block(st, j))
                : "memory");
#pragma unroll
            for (int m = 0; m < 4; ++m) {
              const int x = (2 * j + m / 2) * 4 + 2 * (m % 2);
              s[x] = fmaf(ElemTraits<T>::to_float(static_cast<unsigned short>(v[m] & 0xffff)),
                          p.bias_raw, s[x]);
              s[x + 1] = fmaf(ElemTraits<T>::to_float(static_cast<unsigned short>(v[m] >> 16)),
                              p.bias_raw, s[x + 1]);
            }
          }
        }
        // The softcap after the additive terms, as in the forward.
        if (p.cap_raw != 0.f) softcap_raw(s, p.cap_raw, p.inv_cap_raw);
      } else if constexpr (!kGeneral) {
        masked = qt < qf_begin || qt >= qf_end;
        if (masked) {
          // Each key row's allowed queries i' = i + offset in [j - right, j + left], relative
          // to the thread's first query column (tile_bound, as the forward's band_mask).
          int lo[2], hi[2];
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int j = key_r[r];
            const int64_t i0 = m0 + col0 + seq.offset;
            const int64_t a = j - p.band_right - i0, z = j + p.band_left - i0;
            lo[r] = tile_bound(a, kM);
            hi[r] = j < nk ? tile_bound(z, kM) : -1;
          }
          static_assert(kM / 4 == 16, "bit r * 16 + 2 * c8 + (e & 1)");
          allow = band_run_bits<kM>(lo[0], hi[0]) | band_run_bits<kM>(lo[1], hi[1]) << 16;
        }
      } else {
        const uint8_t entry = entry_of(h, qt);
        masked = static_cast<TileClass>(entry) != TileClass::kFull;
        if (entry >= kTileBits) {
          allow = bwd_tile_bits<kM, kN>(tbits + qt * p.tb_sq, entry, kw, warp, lane);
        } else if (masked) {
          allow = 0;
#pragma unroll 1
          for (int x = 0; x < 32; ++x) {
            const int r = x / 16, y = x % 16;
            const int i = m0 + (y / 2) * 8 + col0 + (y & 1), j = key_r[r];
            if (i < nq && j < nk && mask_allowed(ms.mask, p.num_nodes, i, j)) allow |= 1u << x;
          }
        }
        const float scale = p.scale;
        each_score<kM>(s, 0, 0, [&](float& x, int, int) { x *= scale; });
        if (additive) add_score_terms<kM, true>(s, mods, key_r, seq.offset, m0, col0, nq, nk);
        if (cap != 0.f)
          each_score<kM>(s, 0, 0, [&](float& x, int, int) { x = cap * fast_tanh(x * inv_cap); });
      }

      // The stat pair of this thread's query columns c8 * 8 + col0 + (0, 1): lse2 (stat 0), D
      // (stat 1) or the length scale (stat 2), and whether score x = c8 * 4 + e is allowed.
      auto stat_pair = [&](int c8, int stat) {
        float2 v;
        asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n"
                     : "=f"(v.x), "=f"(v.y)
                     : "r"(sStat(st) + (stat * kM + c8 * 8 + col0) * 4));
        return v;
      };
      // The mask's bits and the sequence's end in one word, tested once a score.
      const uint32_t ok_bits = (masked ? allow : 0xFFFFFFFFu) & query_bits(nq - m0 - col0);
      auto allowed = [&](int c8, int e) {
        return ((ok_bits >> ((e / 2) * 16 + 2 * c8 + (e & 1))) & 1u) != 0u;
      };
      uint32_t pa[kM / 16][4], da[kM / 16][4];
      // dV += P^T dO (query rows are the k dimension: the B operand is read transposed).
      auto issue_dv = [&] {
        fence_regs(dv);
        wgmma_fence();
        if constexpr (S::kSplit) {
          issue_panels(dv, S::kVSlots, pa, sO(st), kDVp / 64, 1);
        } else {
          const uint64_t b0 = smem_desc(sO(st), kM * 128, 1024);
#pragma unroll
          for (int kk = 0; kk < kM / 16; ++kk)
            Wgmma<kDVp, Tag>::rs(dv, pa[kk], desc_add(b0, kk * 16 * 128), 1);
        }
      };
      if constexpr (!kGeneral) {
        // Softmax: P^T while dP^T is multiplied, then dS^T = P^T (dP^T - D) while dV is.
        // P^T is packed as it is computed; with a softcap (tabled instance) s keeps P^T (1 - t^2),
        // the cap's derivative with t = s / cap_raw read off the capped score it overwrites.
        const bool capped = kTabled && p.cap_raw != 0.f;
#pragma unroll
        for (int c8 = 0; c8 < kM / 8; ++c8) {
          const float2 l2 = stat_pair(c8, 0);
          float pw[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int x = c8 * 4 + e;
            // Computed for every score, then selected: under the predicate, ptxas loaded the
            // scale from the constant bank once a score and zeroed the result first.
            const float w = fast_exp2(fmaf(s[x], to2, (e & 1) ? -l2.y : -l2.x));
            pw[e] = allowed(c8, e) ? w : 0.f;
            if (capped) {
              const float t = s[x] * p.inv_cap_raw;
              s[x] = pw[e] * (1.f - t * t);
            } else {
              s[x] = pw[e];
            }
          }
          pa[c8 / 2][(c8 % 2) * 2] = ElemTraits<T>::pack(pw[0], pw[1]);  // pack_p's layout
          pa[c8 / 2][(c8 % 2) * 2 + 1] = ElemTraits<T>::pack(pw[2], pw[3]);
        }
        issue_dv();
        wgmma_commit();
        wgmma_wait<1>();  // dP^T
        fence_regs(dp);
#pragma unroll
        for (int c8 = 0; c8 < kM / 8; ++c8) {
          const float2 d2 = stat_pair(c8, 1);
#pragma unroll
          for (int e = 0; e < 4; ++e)
            dp[c8 * 4 + e] = s[c8 * 4 + e] * (dp[c8 * 4 + e] - ((e & 1) ? d2.y : d2.x));
        }
        pack_p<T, kM>(dp, da);
      }

      // The general flavor: P^T and dS^T in place of S^T and dP^T, one unrolled loop per
      // normalizer (a branch per score kept every normalizer's values live at once: spills).
      // rule(s, dp, ok, l, dd, pw, ds) gets the score, dO . v_j, whether the pair is allowed, the
      // row's stat (LSE in base 2; the normalized kernel's log row sum likewise) and D.
      // With `scaled` (the normalized kernel's length scale, its own unrolled copy), the row's ls
      // (stat 2) multiplies the (capped) score before the rule, as in the forward, and so dS
      // after it.
      auto weights = [&](auto rule, auto scaled) {
        constexpr bool lscaled = decltype(scaled)::value;
#pragma unroll
        for (int c8 = 0; c8 < kM / 8; ++c8) {
          const float2 l2 = stat_pair(c8, 0), d2 = stat_pair(c8, 1);
          const float2 ls2 = lscaled ? stat_pair(c8, 2) : make_float2(1.f, 1.f);
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int x = c8 * 4 + e;
            const bool ok = allowed(c8, e);
            const float ls = (e & 1) ? ls2.y : ls2.x;
            const float sx = !lscaled ? s[x] : length_scaled(s[x], ls);
            float pw, ds;
            rule(sx, dp[x], ok, (e & 1) ? l2.y : l2.x, (e & 1) ? d2.y : d2.x, pw, ds);
            if (lscaled) ds *= ls;
            if (kGeneral && sigmoid && scores_own) beta_acc += ds;  // added after the softcap
            if (kGeneral && cap != 0.f) {
              const float t = s[x] * inv_cap;
              ds *= 1.f - t * t;
            }
            s[x] = pw;
            dp[x] = ds;
          }
        }
      };
      auto softmax_rule = [&](float sx, float dpx, bool ok, float l, float dd, float& pw,
                              float& ds) {
        const float w = fast_exp2(fmaf(sx, to2, -l));  // then selected, as the fast flavor's
        pw = ok ? w : 0.f;
        ds = pw * (dpx - dd);
      };
      if constexpr (kGeneral) {
        if (norm == NormalizerKind::kSoftmax || norm == NormalizerKind::kSoftmaxSink) {
          weights(softmax_rule, std::false_type{});
        } else if (sigmoid) {
          weights([&](float sx, float dpx, bool ok, float, float, float& pw, float& ds) {
            float sg, sgc;  // sigmoid(z), sigmoid(-z): P (1 - P) without cancellation
            fast_sigmoid_pair(sx + beta, &sg, &sgc);
            pw = ok ? sg * kSigmoidWeightScale : 0.f;  // as the forward's (dV taken back)
            ds = ok ? dpx * sg * sgc : 0.f;
          }, std::false_type{});
        } else if (rela) {  // P = relu(s), unnormalized; dO is already dO1
          weights([&](float sx, float dpx, bool ok, float, float, float& pw, float& ds) {
            pw = ok ? fmaxf(sx, 0.f) : 0.f;
            ds = pw > 0.f ? dpx : 0.f;
          }, std::false_type{});
        } else {  // the normalized kernel: dS = P (dO . v_j - D) p (log f)'(s)
          auto kernel_rule = [&](float sx, float dpx, bool ok, float l, float dd, float& pw,
                                 float& ds) {
            const float t = fast_kernel_log_weight(sx, feature, power);
            pw = ok ? fast_exp2(fmaf(t, to2, -l)) : 0.f;  // l is +inf on padded rows
            ds = pw > 0.f ? pw * (dpx - dd) * power * fast_dlog_kernel_feature(sx, feature) : 0.f;
          };
          if (bp.lscale)
            weights(kernel_rule, std::true_type{});
          else
            weights(kernel_rule, std::false_type{});
        }
        pack_p<T, kM>(s, pa);
        pack_p<T, kM>(dp, da);
      }

      // dS^T to shared memory (one 128B-swizzled panel: key row, 16-byte chunk c8 of queries).
      const int x = it & 1;
      if (scores_own) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int kr = kw * 64 + warp * 16 + lane / 4 + 8 * r;
#pragma unroll
          for (int c8 = 0; c8 < kM / 8; ++c8) {
            const uint32_t addr = sDS(x) + kr * 128 + ((c8 ^ (kr % 8)) * 16) + col0 * 2;
            asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(da[c8 / 2][(c8 % 2) * 2 + r])
                         : "memory");
          }
        }
      }
      // kBias with dbias: dS (= dbias: the bias enters the scores unscaled) over the stage's
      // bias tile in its layout (this thread rewrites the elements it read), stored by TMA.
      const bool dbias_tma = kBias && bp.dbias_tma;
      if (dbias_tma) {  // da[j][m] is group j's block m (as the bias's load above)
#pragma unroll
        for (int j = 0; j < kM / 16; ++j)
          asm volatile(
              "stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(
                  bias_block(st, j)),
              "r"(da[j][0]), "r"(da[j][1]), "r"(da[j][2]), "r"(da[j][3])
              : "memory");
      }
      fence_proxy_async_smem();
      if (dbias_tma) {
        named_sync(4 + cw, 128);  // the warpgroup's panel is written
        if (warp == 0 && lane == 0) {
          tma_store_4d(&maps.dbias, sBias(st) + cw * (kM * 128), n0 + cw * 64, m0,
                       h * maps.dbias_hm, b * maps.dbias_bm);
          bulk_commit();
        }
      }
      if (kGeneral && bp.extras && scores_own) {
        // The score mods' tensors' gradients from g = dS^T (0 on pairs not allowed), reading
        // this thread's g back from the dS^T tile in one rolled loop (unrolled loops per score
        // spilled the accumulators): dbias stored (or added by atomics when broadcast), the
        // low-rank factors by atomics (r per pair: correct, not fast), dslopes and the forget
        // gate's column sums in registers,
        // the relative table in a shared tile, the forget gate's row sums by atomics.
        const int off = static_cast<int>(seq.offset);
        const int64_t db_base = b * bp.db_sb + h * bp.db_sh;
        if (bp.dbias_direct) {
          // One element per pair (zeros included): stored in dbias's dtype, 16 bits at a time
          // when it is the kernel's (the dS^T tile's bits as they are).
          constexpr DType kOwn = std::is_same_v<T, __nv_bfloat16> ? DType::kBF16 : DType::kF16;
          const int mode = bp.dbias_dtype == DType::kF32 ? 0 : bp.dbias_dtype == kOwn ? 1 : 2;
#pragma unroll 1
          for (int y = 0; y < 32; ++y) {
            const int r = y / 16, c8 = (y % 16) / 2, e = y % 2;
            const int kr = kw * 64 + warp * 16 + lane / 4 + 8 * r;
            const int i = m0 + c8 * 8 + col0 + e, j = key_r[0] + 8 * r;
            if (i >= nq || j >= nk) continue;
            const uint32_t addr = sDS(x) + kr * 128 + ((c8 ^ (kr % 8)) * 16) + (col0 + e) * 2;
            unsigned short bits;
            asm volatile("ld.shared.u16 %0, [%1];\n" : "=h"(bits) : "r"(addr) : "memory");
            const int64_t o = db_base + i * bp.db_si + j * bp.db_sj;
            const float g = ElemTraits<T>::to_float(bits);
            if (mode == 0)
              static_cast<float*>(bp.dbias)[o] = g;
            else if (mode == 1)
              static_cast<unsigned short*>(bp.dbias)[o] = bits;
            else if (bp.dbias_dtype == DType::kBF16)
              static_cast<__nv_bfloat16*>(bp.dbias)[o] = __float2bfloat16(g);
            else
              static_cast<__half*>(bp.dbias)[o] = __float2half(g);
          }
        }
        const float* u = p.lowrank_u + b * p.u_sb + h * p.u_sh;
        const float* w = p.lowrank_w + b * p.w_sb + h * p.w_sh;
        float* du = bp.du ? bp.du + b * bp.du_sb + h * bp.du_sh : nullptr;
        float* dw = bp.dw ? bp.dw + b * bp.dw_sb + h * bp.dw_sh : nullptr;
        float* dc = bp.dc ? bp.dc + (static_cast<int64_t>(b) * p.hq + h) * bp.dc_stride : nullptr;
        const bool causal_alibi = mods.alibi == AlibiMode::kCausal;
        static_assert(kM == 64, "32 scores per thread: 2 key rows x 16 query columns");
#pragma unroll 1
        for (int y = 0; y < 32; ++y) {
          const int r = y / 16, c8 = (y % 16) / 2, e = y % 2;
          const int kr = kw * 64 + warp * 16 + lane / 4 + 8 * r;
          const uint32_t addr = sDS(x) + kr * 128 + ((c8 ^ (kr % 8)) * 16) + (col0 + e) * 2;
          unsigned short bits;
          asm volatile("ld.shared.u16 %0, [%1];\n" : "=h"(bits) : "r"(addr) : "memory");
          const float g = ElemTraits<T>::to_float(bits);  // dS^T as the products use it
          const int i = m0 + c8 * 8 + col0 + e, j = key_r[0] + 8 * r;
          if (g == 0.f || i >= nq || j >= nk) continue;
          if (bp.dbias && !bp.dbias_direct)
            atomicAdd(static_cast<float*>(bp.dbias) + db_base + i * bp.db_si + j * bp.db_sj, g);
          if (bp.dslopes) {
            const int dist = i + off - j;
            slope_acc -= g * static_cast<float>(causal_alibi ? dist : abs(dist));
          }
          if (want_table)
            asm volatile("red.shared.add.f32 [%0], %1;\n" ::"r"(
                             sTable + 4 * mods.bucket_of[j - (i + off) + mods.bucket_origin]),
                         "f"(g)
                         : "memory");
          if (dc) {
            atomicAdd(dc + min(i + off, nk - 1), g);  // + c[i'] ...
            (r == 0 ? col_acc[0] : col_acc[1]) += g;  // ... - c[j]
          }
#pragma unroll 1
          for (int64_t k = 0; (du || dw) && k < p.rank; ++k) {
            if (du) atomicAdd(du + i * bp.du_sn + k * bp.du_sr, g * w[j * p.w_sn + k]);
            if (dw) atomicAdd(dw + j * bp.dw_sn + k * bp.dw_sr, g * u[i * p.u_sn + k]);
          }
        }
      }
      // dK += dS^T Q (and the general flavor's dV += P^T dO now).
      if constexpr (kGeneral) issue_dv();
      fence_regs(dk);
      wgmma_fence();
      if constexpr (S::kSplit) {
        issue_panels(dk, S::kKSlots, da, sQ(st), kDp / 64, 0);
      } else {
        const uint64_t b0 = smem_desc(sQ(st), kM * 128, 1024);
#pragma unroll
        for (int kk = 0; kk < kM / 16; ++kk)
          Wgmma<kDp, Tag>::rs(dk, da[kk], desc_add(b0, kk * 16 * 128), 1);
      }
      wgmma_commit();

      // scale * dQ's columns col_base + [0, cols) of this thread's rows into the step's dq tile.
      auto store_dq = [&](const float* dq, int cols, int col_base, uint32_t tile) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int row = warp * 16 + lane / 4 + 8 * r;
#pragma unroll
          for (int c8 = 0; c8 < cols / 8; ++c8) {
            const int col = col_base + c8 * 8 + col0;
            asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(
                             tile + (row * S::kDqStride + col) * 4),
                         "f"(dq[c8 * 4 + 2 * r] * p.scale), "f"(dq[c8 * 4 + 2 * r + 1] * p.scale)
                         : "memory");
          }
        }
        fence_proxy_async_smem();  // the copy engine reads what these stores wrote
      };
      if constexpr (S::kSplit) {
        // dQ's panels one at a time (32 registers each), once dV and dK are done: P^T and dS^T
        // are then dead and both warpgroups done with the stage's Q and dO, over which (or into
        // a buffer of its own) the panels go.
        wgmma_wait<0>();
        fence_regs(dv);
        fence_regs(dk);
        fence_regs_u(pa);
        fence_regs_u(da);
        named_sync(3, 256);  // and warpgroup 0's dS^T is in shared memory
        if constexpr (S::kDqOwn) {
          if (lane == 0) mbar_arrive(empty(st));
          mbar_wait(dq_empty(it & 1), dq_phase(it) ^ 1);
        }
        const uint32_t tile = dq_tile(it);
#pragma unroll
        for (int sl = 0; sl < (kDp / 64 + 1) / 2; ++sl) {
          const int panel = bwd_panel(kDp / 64, sl, cw, 0);  // -1: computed, not stored
          float dq[32];
          wgmma_fence();
#pragma unroll
          for (int kk = 0; kk < kN / 16; ++kk)
            Wgmma<64, Tag>::tt(dq, smem_desc(sDS(x) + kk * 16 * 128, kN * 128, 1024),
                               smem_desc(sK + (panel >= 0 ? panel : kDp / 64 - 1) * (kN * 128) +
                                             kk * 16 * 128,
                                         kN * 128, 1024),
                               kk > 0);
          wgmma_commit();
          wgmma_wait<0>();
          fence_regs(dq);
          if (panel >= 0) store_dq(dq, 64, panel * 64, tile);
        }
      } else {
        // dQ[:, cw half] = dS K: A = dS (queries x keys) and B = K (keys x head dims), both read
        // transposed from their tiles.
        float dq[kDqN / 2];
        named_sync(3, 256);
        wgmma_fence();
        const uint64_t a0 = smem_desc(sDS(x), kN * 128, 1024);
        const uint64_t b0 = smem_desc(
            sK + ((cw * kDqN) / 64) * (kN * 128) + ((cw * kDqN) % 64) * 2, kN * 128, 1024);
#pragma unroll
        for (int kk = 0; kk < kN / 16; ++kk)
          Wgmma<kDqN, Tag>::tt(dq, desc_add(a0, kk * 16 * 128), desc_add(b0, kk * 16 * 128),
                               kk > 0);
        wgmma_commit();
        wgmma_wait<0>();
        fence_regs(dq);
        fence_regs(dv);
        fence_regs(dk);
        fence_regs_u(pa);
        fence_regs_u(da);

        // scale * dQ for the dq warp: into its own buffer once the dq warp has handed it back (the
        // stage goes back to the producer now), or over the stage once both warpgroups are done
        // reading it.
        // With dbias, its store's read of the stage is waited for first (by the storing thread,
        // before the stage goes back or dQ is written over it).
        if (dbias_tma && warp == 0 && lane == 0) bulk_wait_read<0>();
        if constexpr (S::kDqOwn) {
          if (lane == 0) mbar_arrive(empty(st));
          mbar_wait(dq_empty(it & 1), dq_phase(it) ^ 1);
        } else {
          named_sync(3, 256);
        }
        store_dq(dq, kDqN, cw * kDqN, dq_tile(it));
      }
      __syncwarp();
      if (lane == 0) mbar_arrive(dq_full(it));  // the dq warp's to add
      ++it;
    }
    if constexpr (kGeneral) {  // this head's sums
      if (bp.dslopes) {
#pragma unroll
        for (int x = 16; x > 0; x /= 2) slope_acc += __shfl_xor_sync(0xffffffff, slope_acc, x);
        if (lane == 0) atomicAdd(bp.dslopes + h, static_cast<double>(slope_acc));
      }
      if (bp.dc) {
        float* dc = bp.dc + (static_cast<int64_t>(b) * p.hq + h) * bp.dc_stride;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const float sum = quad_sum(col_acc[r]);
          if (lane % 4 == 0 && key_r[r] < nk && sum != 0.f) atomicAdd(dc + key_r[r], -sum);
        }
      }
      if (want_table) {
        named_sync(kTableSync, 256);
        for (int x = tid - 128; x < bp.table_buckets; x += 256) {
          float v;
          asm volatile("ld.shared.f32 %0, [%1];\n" : "=f"(v) : "r"(sTable + x * 4) : "memory");
          if (v != 0.f) atomicAdd(bp.dtable + h * kMaxBwdBuckets + x, v);
        }
        named_sync(kTableSync, 256);
      }
    }
  }
  if (kBias && bp.dbias_tma && warp == 0 && lane == 0) bulk_wait<0>();  // dbias's last store
  if (kGeneral && bp.dbeta) {
#pragma unroll
    for (int x = 16; x > 0; x /= 2) beta_acc += __shfl_xor_sync(0xffffffff, beta_acc, x);
    if (lane == 0) atomicAdd(bp.dbeta, static_cast<double>(beta_acc));
  }

  // dk = scale * dK, dv = dV (rows past nk are another sequence's or padding; sigmoid's dV by
  // its weights' scale).
  const float dv_mul = kGeneral && sigmoid ? 1.f / kSigmoidWeightScale : 1.f;
  bool stored = false;
  if constexpr (!S::kSplit) {
    if (bp.tma_dkdv) {
      // By the copy engine: the warpgroup's rows into panels over K and V (kKBytes and kVBytes
      // hold both warpgroups' panels), then one thread's tensor stores (rows past nk clipped
      // by the maps' extents). Its wait keeps them clear of the fused conversion's loads.
      named_sync(3, 256);  // both warpgroups' last products have read K and V
      const uint32_t kbuf = sK + cw * (kDp / 64) * 8192, vbuf = sV + cw * (kDVp / 64) * 8192;
      const float kmul[2] = {p.scale, p.scale}, vmul[2] = {dv_mul, dv_mul};
      stage_rows<T, kDp>(kbuf, dk, kmul, warp, lane);
      stage_rows<T, kDVp>(vbuf, dv, vmul, warp, lane);
      fence_proxy_async_smem();  // the copy engine reads what stmatrix wrote
      named_sync(4 + cw, 128);
      if (tid % 128 == 0) {
        const int row = n0 + kw * 64;  // not varlen: the sequence starts at row 0
#pragma unroll
        for (int pn = 0; pn < kDp / 64; ++pn)
          tma_store_4d(&maps.dk, kbuf + pn * 8192, pn * 64, row, hk * maps.dk_hm, b * maps.dk_bm);
#pragma unroll
        for (int pn = 0; pn < kDVp / 64; ++pn)
          tma_store_4d(&maps.dv, vbuf + pn * 8192, pn * 64, row, hk * maps.dv_hm, b * maps.dv_bm);
        bulk_commit();
        bulk_wait<0>();
      }
      stored = true;
    }
  }
  const int64_t k_es = bp.dk_dtype == DType::kF32 ? 4 : 2, v_es = bp.dv_dtype == DType::kF32 ? 4 : 2;
#pragma unroll
  for (int r = 0; r < 2 && !stored; ++r) {
    const int j = key_r[r];
    if (j >= nk) continue;
    void* krow = static_cast<char*>(bp.dk) +
                 (b * bp.dk_sb + hk * bp.dk_sh + (seq.k_start + j) * bp.dk_sn) * k_es;
    void* vrow = static_cast<char*>(bp.dv) +
                 (b * bp.dv_sb + hk * bp.dv_sh + (seq.k_start + j) * bp.dv_sn) * v_es;
    if constexpr (S::kSplit) {  // the warpgroup's panels
#pragma unroll
      for (int sl = 0; sl < S::kKSlots; ++sl) {
        const int panel = bwd_panel(kDp / 64, sl, cw, 0);
        if (panel < 0) continue;
#pragma unroll
        for (int c8 = 0; c8 < 8; ++c8)
          store_grad_pair(krow, bp.dk_dtype, panel * 64 + c8 * 8 + col0, p.d,
                          dk[sl * 32 + c8 * 4 + 2 * r] * p.scale,
                          dk[sl * 32 + c8 * 4 + 2 * r + 1] * p.scale);
      }
#pragma unroll
      for (int sl = 0; sl < S::kVSlots; ++sl) {
        const int panel = bwd_panel(kDVp / 64, sl, cw, 1);
        if (panel < 0) continue;
#pragma unroll
        for (int c8 = 0; c8 < 8; ++c8)
          store_grad_pair(vrow, bp.dv_dtype, panel * 64 + c8 * 8 + col0, p.dv,
                          dv[sl * 32 + c8 * 4 + 2 * r] * dv_mul,
                          dv[sl * 32 + c8 * 4 + 2 * r + 1] * dv_mul);
      }
    } else {
#pragma unroll
      for (int c8 = 0; c8 < kDp / 8; ++c8)
        store_grad_pair(krow, bp.dk_dtype, c8 * 8 + col0, p.d, dk[c8 * 4 + 2 * r] * p.scale,
                        dk[c8 * 4 + 2 * r + 1] * p.scale);
#pragma unroll
      for (int c8 = 0; c8 < kDVp / 8; ++c8)
        store_grad_pair(vrow, bp.dv_dtype, c8 * 8 + col0, p.dv, dv[c8 * 4 + 2 * r] * dv_mul,
                        dv[c8 * 4 + 2 * r + 1] * dv_mul);
    }
  }

  // fused_dq: the group's last CTA converts the group's rows of the scratch, staged in chunks of
  // kChunkRows rows by the copy engine into two buffers over what the walk used (K, V, dS, the
  // stages: every warp is done with them once the dq warp's reduce-adds have been read).
  if (!bp.fused_dq) return;
  named_sync(kEndSync, 256 + 32);
  uint32_t last;
  asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(last) : "r"(last_word) : "memory");
  if (!last) return;
  constexpr int kRowBytes = S::kDqStride * 4;
  constexpr int kSpan = S::kKBytes + S::kVBytes + 2 * S::kDsBytes + S::kTableBytes + S::kDqRing +
                        kStages * S::kStageBytes;  // sK up to the barriers
  constexpr int kChunkRows = kSpan / 2 / kRowBytes < 128 ? kSpan / 2 / kRowBytes : 128;
  static_assert(kChunkRows >= 1, "the conversion's staging buffers");
  const int t = tid - 128, per_head = (nq + kChunkRows - 1) / kChunkRows;
  const int chunks = p.group * per_head;
  auto buf = [&](int c) { return sK + (c & 1) * kChunkRows * kRowBytes; };
  auto chunk_rows = [&](int c) { return min(kChunkRows, nq - (c % per_head) * kChunkRows); };
  auto chunk_q0 = [&](int c) {
    return seq.q_start + static_cast<int64_t>(c % per_head) * kChunkRows;
  };
  auto issue = [&](int c) {  // consumer thread 0 (tid 128): chunk c into its buffer
    const int h = h_begin + c / per_head;
    const uint32_t bytes = chunk_rows(c) * kRowBytes;
    mbar_expect_tx(conv_ld(c & 1), bytes);
    bulk_load(buf(c), bp.dq + b * bp.dq_sb + h * bp.dq_sh + chunk_q0(c) * bp.dq_sn, bytes,
              conv_ld(c & 1));
  };
  // The other CTAs' sums (acquired by the dq warp) and this CTA's reads of the region (the
  // generic proxy) before the copy engine's loads.
  fence_proxy_async_smem();
  named_sync(kConvSync, 256);
  if (t == 0) {
    fence_proxy_async_global();
    for (int c = 0; c < min(2, chunks); ++c) issue(c);
  }
  for (int c = 0; c < chunks; ++c) {
    mbar_wait(conv_ld(c & 1), (c >> 1) & 1);
    const uint32_t src = buf(c);
    convert_dq_rows<256>(bp, dq_out_row(bp, b, h_begin + c / per_head, chunk_q0(c)), chunk_rows(c),
                         p.d, t, [&](int r, int col, int n) {
                           float4 v;
                           const uint32_t at = src + (r * S::kDqStride + col) * 4;
                           if (n == 4)
                             asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];\n"
                                          : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                                          : "r"(at));
                           else
                             asm volatile("ld.shared.f32 %0, [%1];\n" : "=f"(v.x) : "r"(at));
                           return v;
                         });
    fence_proxy_async_smem();
    named_sync(kConvSync, 256);  // the buffer is read: the next chunk may overwrite it
    if (t == 0 && c + 2 < chunks) issue(c + 2);
  }
}

// Launches one flavor on `stream` (the general one reads the block table built by the caller).
template <class T, int kD, int kDV, bool kGeneral, bool kTabled>
cudaError_t launch_bwd(const BwdParams& p, const BwdMaps& maps, cudaStream_t stream) {
  // The tabled fast flavor with fast_bias is its kBias instance.
  constexpr bool kCanBias = kTabled && !kGeneral && !BwdShape<kD, kDV, kGeneral>::kSplit;
  const bool bias = kCanBias && p.f.fast_bias;
  auto kernel = bias ? bwd_kernel<T, kD, kDV, kGeneral, kTabled, kCanBias>
                     : bwd_kernel<T, kD, kDV, kGeneral, kTabled>;
  const int smem = bias ? BwdShape<kD, kDV, kGeneral, kCanBias>::kSmemBytes
                        : BwdShape<kD, kDV, kGeneral>::kSmemBytes;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (e != cudaSuccess) return e;
  const dim3 grid(p.num_k_tiles, p.f.hk, p.f.batch);
  kernel<<<grid, BwdShape<kD, kDV, kGeneral>::kThreads, smem, stream>>>(p, maps);
  return cudaGetLastError();
}

}  // namespace attnkit::cuda
