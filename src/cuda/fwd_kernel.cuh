// The general CUDA forward kernel (sm_90a): the shared policies of include/attnkit/variant
// evaluated at run time on a FlashAttention-style tiled online normalization.
//
// One CTA computes a 128-row query tile of one (batch, query head): two warpgroups of 64 rows
// each. K and V tiles stream through a cp.async pipeline into the 128B-swizzled shared layout;
// S = Q K^T is a shared x shared wgmma, and O += P V takes P straight from the S accumulators
// (registers) with V read transposed from shared memory. The mask tree is classified per tile
// before the kernel (empty tiles are skipped, partial tiles masked per element); every score mod
// (ScoreModEval), every normalizer and the output gate are chosen at run time. The plain-softmax
// band masks run on the warp-specialized kernel of fwd_fast.cuh instead.
#pragma once
#include <cuda_runtime.h>

#include <cmath>

#include "attnkit/variant/masks.h"
#include "attnkit/variant/normalizers.h"
#include "attnkit/variant/score_mods.h"
#include "cuda/fwd_common.cuh"
#include "cuda/fwd_params.h"
#include "cuda/sm90_ops.cuh"

namespace attnkit::cuda {

inline constexpr int kCtaThreads = 256;  // 2 warpgroups (and __launch_bounds__ below)

template <int kD, int kDV>
struct FwdShape : FwdTiles<kD, kDV> {
  using Base = FwdTiles<kD, kDV>;
  static constexpr int kThreads = kCtaThreads;
  // Three K/V stages where they fit (one barrier per tile: a stage is refilled two tiles after
  // its last read, and every thread has passed the barrier in between), else two.
  static constexpr int kStages =
      Base::kQBytes + 3 * (Base::kKBytes + Base::kVBytes) + 1024 <= 227 * 1024 ? 3 : 2;
  static constexpr int kSmemBytes = Base::kQBytes + kStages * (Base::kKBytes + Base::kVBytes) + 1024;
};

// Loads rows [row0, row0 + R) x columns [0, Cp) of a row-major operand into a swizzled tile;
// rows at or past `nrows` and columns at or past `ncols` are zero-filled.
// Every thread of the CTA takes part.
template <int R, int Cp, class T>
__device__ __forceinline__ void load_tile(uint32_t dst, const T* base, int64_t row_stride,
                                          int row0, int nrows, int ncols) {
  constexpr int kChunksPerRow = Cp / 8, kChunks = R * kChunksPerRow;
#pragma unroll 4
  for (int x = threadIdx.x; x < kChunks; x += kCtaThreads) {
    const int r = x / kChunksPerRow, ch = x % kChunksPerRow;
    const bool ok = row0 + r < nrows && ch * 8 < ncols;
    const T* src = ok ? base + static_cast<int64_t>(row0 + r) * row_stride + ch * 8 : base;
    const uint32_t off = (ch >> 3) * R * 128 + r * 128 + (((ch & 7) ^ (r & 7)) << 4);
    cp_async16(dst + off, src, ok);
  }
}

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

// The general kernel's block table: one thread per (query tile, key tile) of one (b, h) (blockIdx
// y, z), classified by the mask policy. Key tiles past the sequence are empty; a full tile that
// the sequence ends in is partial (the kernel masks its tail).
template <int kM, int kN>
__global__ void classify_tiles_kernel(const __grid_constant__ FwdParams p, uint8_t* table) {
  const int qtile = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const SeqExtent s = seq_extent(p, b);
  MaskState ms;
  resolve_mask(p, b, h, s.offset, ms);
  uint8_t* row = table + b * p.tc_sb + h * p.tc_sh + static_cast<int64_t>(qtile) * p.tc_nkt;
  const int m0 = qtile * kM;
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
      c = ms.mask.classify_flat(p.num_nodes, q, k);
      if (c == TileClass::kFull && k.count < kN) c = TileClass::kPartial;
    }
    row[kt] = static_cast<uint8_t>(c);
  }
}

template <class T, int kD, int kDV>
__global__ void __launch_bounds__(256, 1) fwd_general_kernel(const __grid_constant__ FwdParams p) {
  using S = FwdShape<kD, kDV>;
  using Tag = typename ElemTraits<T>::Tag;
  constexpr int kM = S::kM, kN = S::kN, kDp = S::kDp, kDVp = S::kDVp;
  constexpr int kSRegs = kN / 2, kORegs = kDVp / 2;
  constexpr float kNegInf = -INFINITY;

  extern __shared__ uint8_t smem_raw[];
  const uint32_t smem0 = (smem_addr(smem_raw) + 1023) & ~1023u;
  const uint32_t sQ = smem0;
  constexpr int kStages = S::kStages;
  auto sK = [&](int st) { return sQ + S::kQBytes + st * (S::kKBytes + S::kVBytes); };
  auto sV = [&](int st) { return sK(st) + S::kKBytes; };

  const int b = blockIdx.z, h = blockIdx.y;
  const int tile = p.num_q_tiles - 1 - static_cast<int>(blockIdx.x);  // long rows first
  const SeqExtent seq = seq_extent(p, b);
  const int64_t q_start = seq.q_start, k_start = seq.k_start, offset = seq.offset;
  const int nq = seq.nq, nk = seq.nk;
  const int m0 = tile * kM;
  if (m0 >= nq) return;
  const int hk = h / p.group;
  const T* qp = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh + q_start * p.q_sn;
  const T* kp = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh + k_start * p.k_sn;
  const T* vp = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh + k_start * p.v_sn;

  const int tid = threadIdx.x, wg = tid / 128, lane = tid % 32, warp = (tid % 128) / 32;
  // This thread's two rows (within the CTA tile) and its column pairs within each 8-column chunk.
  const int row_i[2] = {m0 + wg * 64 + warp * 16 + lane / 4, m0 + wg * 64 + warp * 16 + lane / 4 + 8};
  const int col0 = 2 * (lane % 4);

  // Key tiles to visit: the non-empty ones of the block table.
  const int t_end = (nk + kN - 1) / kN;
  MaskState ms;
  resolve_mask(p, b, h, offset, ms);
  const ScoreModEval<float> mods = resolve_mods(p, b, h);
  const uint8_t* tclass =
      p.tile_class + b * p.tc_sb + h * p.tc_sh + static_cast<int64_t>(tile) * p.tc_nkt;
  auto next_tile = [&](int t, TileClass* cls) {
    for (; t < t_end; ++t) {
      *cls = static_cast<TileClass>(tclass[t]);
      if (*cls != TileClass::kEmpty) return t;
    }
    return t_end;
  };

  // Normalizer state per row; the softmax family keeps the running max of the modified scores.
  const NormalizerKind norm = p.norm;
  const bool softmax = norm == NormalizerKind::kSoftmax || norm == NormalizerKind::kSoftmaxSink;
  float m[2], l[2] = {0.f, 0.f};
  m[0] = m[1] = p.sinks ? p.sinks[h * p.sinks_s] : kNegInf;
  if (p.sinks) l[0] = l[1] = 0.25f;  // exp(sink - sink), split over the quad's 4 partial sums
  if (norm == NormalizerKind::kKernel) m[0] = m[1] = 0.f;  // the running max of the weights
  const bool additive = p.has_mods && mods.has_additive();
  const float cap = p.softcap, inv_cap = cap != 0.f ? 1.f / cap : 0.f;
  const bool prescale = norm == NormalizerKind::kKernel && p.length_scale;
  const float beta = p.has_beta ? p.beta : -logf(static_cast<float>(nk));
  float lscale[2] = {1.f, 1.f};

  // Prologue: Q, then the first K/V tile.
  load_tile<kM, kDp>(sQ, qp, p.q_sn, m0, nq, p.d);
  TileClass cls = TileClass::kEmpty;
  int t = next_tile(0, &cls);
  if (t < t_end) {
    load_tile<kN, kDp>(sK(0), kp, p.k_sn, t * kN, nk, p.d);
    load_tile<kN, kDVp>(sV(0), vp, p.v_sn, t * kN, nk, p.dv);
  }
  cp_async_commit();

  // The normalized kernel's length scale needs each row's allowed-key count first.
  if (prescale) {
    int cnt[2] = {0, 0};
    for (int u = t; u < t_end; ++u) {
      const TileClass c = static_cast<TileClass>(tclass[u]);
      if (c == TileClass::kEmpty) continue;
      for (int x = lane % 4; x < kN; x += 4) {
        const int j = u * kN + x;
        if (j >= nk) break;
#pragma unroll
        for (int r = 0; r < 2; ++r)
          cnt[r] += row_i[r] < nq &&
                    (c == TileClass::kFull || mask_allowed(ms.mask, p.num_nodes, row_i[r], j));
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int n = static_cast<int>(quad_sum(static_cast<float>(cnt[r])));
      lscale[r] = length_scale<float>(n);
    }
  }

  float o[kORegs];
#pragma unroll
  for (int x = 0; x < kORegs; ++x) o[x] = 0.f;

  int stage = 0;
  while (t < t_end) {
    TileClass cls_next = TileClass::kEmpty;
    const int tn = next_tile(t + 1, &cls_next);
    const int next_stage = stage + 1 == kStages ? 0 : stage + 1;
    if (tn < t_end) {
      load_tile<kN, kDp>(sK(next_stage), kp, p.k_sn, tn * kN, nk, p.d);
      load_tile<kN, kDVp>(sV(next_stage), vp, p.v_sn, tn * kN, nk, p.dv);
    }
    cp_async_commit();
    cp_async_wait<1>();
    fence_proxy_async();
    __syncthreads();

    // S = Q K^T for this warpgroup's 64 rows.
    float s[kSRegs];
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kDp / 16; ++kk) {
      const uint64_t da =
          smem_desc(sQ + (kk / 4) * (kM * 128) + wg * 64 * 128 + (kk % 4) * 32, 16, 1024);
      const uint64_t db = smem_desc(sK(stage) + (kk / 4) * (kN * 128) + (kk % 4) * 32, 16, 1024);
      Wgmma<kN, Tag>::ss(s, da, db, kk > 0);
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(s);

    // Scores: scale, score mods (additive terms, then the softcap), mask.
    const int n0 = t * kN;
    const bool masked = cls != TileClass::kFull;
#pragma unroll
    for (int c = 0; c < kN / 8; ++c) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e / 2, j = n0 + c * 8 + col0 + (e & 1), i = row_i[r];
        float& x = s[c * 4 + e];
        const bool ok = i < nq && j < nk && (!masked || mask_allowed(ms.mask, p.num_nodes, i, j));
        x *= p.scale;
        if (ok && additive) x = mods.additive(x, i, i + offset, j);
        if (cap != 0.f) x = cap * tanhf(x * inv_cap);
        if (prescale) x = lscale[r] == 0.f ? 0.f : x * lscale[r];
        x = ok ? x : kNegInf;
      }
    }

    // Normalizer: S -> P in place; O rescaled as the running maxima move.
    if (softmax) {
#pragma unroll
      for (int r = 0; r < 2; ++r)
        scale_row<kDVp>(o, r, softmax_row<kN>(s, r, static_cast<float>(kLog2e), m[r], l[r]));
    } else {
#pragma unroll
      for (int c = 0; c < kN / 8; ++c)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float& x = s[c * 4 + e];
          const bool live = x != kNegInf;
          float w;
          if (norm == NormalizerKind::kSigmoid) {
            w = sigmoid(x + beta);
          } else if (norm == NormalizerKind::kKernel) {
            w = kernel_weight(x, p.feature, p.power);
          } else {
            w = fmaxf(x, 0.f);  // ReLA
          }
          x = live ? w : 0.f;
        }
      if (norm == NormalizerKind::kKernel) {
        // Weights are unbounded (f(s)^p): P is kept relative to the row's running max so that
        // it fits the 16-bit type of P V; O and the sum are rescaled as the max moves.
#pragma unroll
        for (int r = 0; r < 2; ++r)
          scale_row<kDVp>(
              o, r,
              online_row<kN>(
                  s, r, 0.f, m[r], l[r],
                  [&](float x, float m_new) { return m_new > 0.f ? x / m_new : 0.f; },
                  [&](float m_old, float m_new) { return m_new > 0.f ? m_old / m_new : 1.f; }));
      }
    }

    // O += P V: P from the S accumulators, 16 keys per step.
    uint32_t a[kN / 16][4];
    pack_p<T, kN>(s, a);
    fence_regs(o);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kN / 16; ++kk) {
      const uint64_t db = smem_desc(sV(stage) + kk * 16 * 128, kN * 128, 1024);
      Wgmma<kDVp, Tag>::rs(o, a[kk], db, 1);
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(o);
    // Two stages: every warpgroup is done with this one before the next tile refills it.
    if constexpr (kStages == 2) __syncthreads();

    t = tn;
    cls = cls_next;
    stage = next_stage;
  }
  cp_async_wait<0>();

  store_rows<true, kDVp>(p, norm, b, h, seq, row_i, col0, lane % 4 == 0, o, m, l);
}

// Launches the general kernel on `stream` (the block table is built by the caller).
template <class T, int kD, int kDV>
cudaError_t launch_fwd_general(const FwdParams& p, cudaStream_t stream) {
  using S = FwdShape<kD, kDV>;
  auto kernel = fwd_general_kernel<T, kD, kDV>;
  cudaError_t e =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, S::kSmemBytes);
  if (e != cudaSuccess) return e;
  const dim3 grid(p.num_q_tiles, p.hq, p.batch);
  kernel<<<grid, S::kThreads, S::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace attnkit::cuda
