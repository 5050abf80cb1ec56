// The CUDA forward kernel (sm_90a): FlashAttention-style tiled online softmax on warpgroup MMA.
//
// One CTA computes a 128-row query tile of one (batch, query head): two warpgroups of 64 rows
// each. K and V tiles stream through a two-stage cp.async pipeline into the 128B-swizzled shared
// layout; S = Q K^T is a shared x shared wgmma, and O += P V takes P straight from the S
// accumulators (registers) with V read transposed from shared memory.
//
// Two flavors per (dtype, head dim): kGeneral = false is the plain-softmax fast path (masks that
// are bands: none, causal, sliding window; softmax or softmax with sink; LSE). kGeneral = true
// evaluates the shared policies of include/attnkit/variant at run time: the mask tree (tile
// classification skips empty tiles, partial tiles are masked per element), every score mod
// (ScoreModEval), every normalizer, and the output gate.
#pragma once
#include <cuda_runtime.h>

#include <cmath>

#include "attnkit/variant/masks.h"
#include "attnkit/variant/normalizers.h"
#include "attnkit/variant/score_mods.h"
#include "cuda/fwd_params.h"
#include "cuda/sm90_ops.cuh"

namespace attnkit::cuda {

inline constexpr int kCtaThreads = 256;  // 2 warpgroups (and __launch_bounds__ below)

template <int kD, int kDV>
struct FwdShape {
  static constexpr int kM = 128;  // query rows per CTA: 2 warpgroups x 64
  static constexpr int kThreads = kCtaThreads;
  static constexpr int kDp = (kD + 63) / 64 * 64;  // head dims padded to whole 64-column panels
  static constexpr int kDVp = (kDV + 63) / 64 * 64;
  static constexpr int kN = (kDp <= 128 && kDVp <= 128) ? 128 : 64;  // keys per tile
  static constexpr int kQBytes = kM * kDp * 2;
  static constexpr int kKBytes = kN * kDp * 2;
  static constexpr int kVBytes = kN * kDVp * 2;
  // Three K/V stages where they fit (one barrier per tile: a stage is refilled two tiles after
  // its last read, and every thread has passed the barrier in between), else two.
  static constexpr int kStages = kQBytes + 3 * (kKBytes + kVBytes) + 1024 <= 227 * 1024 ? 3 : 2;
  static constexpr int kSmemBytes = kQBytes + kStages * (kKBytes + kVBytes) + 1024;
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

// 2^x on the special-function unit (2^-inf = 0); exp2f adds range handling the softmax does not
// need.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffff, x, 1);
  return x + __shfl_xor_sync(0xffffffff, x, 2);
}

// One row (r of the thread's two) of an online normalization: its running max m moves to
// m_new = max(m, the row's scores); each score x becomes weight(x, m_new); the row sum l and the
// row of O are rescaled by rescale(m, m_new). The softmax family and the normalized kernel share it.
template <int kN, int kDVp, class Weight, class Rescale>
__device__ __forceinline__ void online_row(float (&s)[kN / 2], float (&o)[kDVp / 2], int r,
                                           float lowest, float& m, float& l, Weight weight,
                                           Rescale rescale) {
  float mx = lowest;
#pragma unroll
  for (int c = 0; c < kN / 8; ++c) mx = fmaxf(mx, fmaxf(s[c * 4 + 2 * r], s[c * 4 + 2 * r + 1]));
  const float m_new = fmaxf(m, quad_max(mx));
  const float alpha = rescale(m, m_new);
  float sum = 0.f;
#pragma unroll
  for (int c = 0; c < kN / 8; ++c)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      float& x = s[c * 4 + 2 * r + e];
      x = weight(x, m_new);
      sum += x;
    }
  l = l * alpha + sum;
  m = m_new;
#pragma unroll
  for (int c = 0; c < kDVp / 8; ++c) {
    o[c * 4 + 2 * r] *= alpha;
    o[c * 4 + 2 * r + 1] *= alpha;
  }
}

__device__ __forceinline__ float load_any(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::kBF16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case DType::kF16:
      return __half2float(static_cast<const __half*>(p)[i]);
    default:
      return static_cast<const float*>(p)[i];
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

// Sequence extents of batch element b.
struct SeqExtent {
  int64_t q_start = 0, k_start = 0;
  int nq = 0, nk = 0;
  int64_t offset = 0;
};
__device__ __forceinline__ SeqExtent seq_extent(const FwdParams& p, int b) {
  SeqExtent e;
  e.nq = p.nq;
  e.nk = p.nk;
  if (p.cu_q) {
    e.q_start = p.cu_q[b];
    e.nq = p.cu_q[b + 1] - p.cu_q[b];
    e.k_start = p.cu_k[b];
    e.nk = p.cu_k[b + 1] - p.cu_k[b];
  }
  e.offset = p.bottom_right ? e.nk - e.nq : 0;
  return e;
}

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

template <class T, int kD, int kDV, bool kGeneral>
__global__ void __launch_bounds__(256, 1) fwd_kernel(const __grid_constant__ FwdParams p) {
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
  const int lr[2] = {wg * 64 + warp * 16 + lane / 4, wg * 64 + warp * 16 + lane / 4 + 8};
  const int row_i[2] = {m0 + lr[0], m0 + lr[1]};
  const int col0 = 2 * (lane % 4);
  const int rows = min(kM, nq - m0);

  // Key tiles to visit.
  const int num_k_tiles = (nk + kN - 1) / kN;
  int t_begin = 0, t_end = num_k_tiles;
  MaskState ms;
  ScoreModEval<float> mods;
  const uint8_t* tclass = nullptr;
  if constexpr (kGeneral) {
    resolve_mask(p, b, h, offset, ms);
    mods = resolve_mods(p, b, h);
    tclass = p.tile_class + b * p.tc_sb + h * p.tc_sh + static_cast<int64_t>(tile) * p.tc_nkt;
  } else {
    const int64_t lo = m0 + offset - p.band_left, hi = m0 + rows - 1 + offset + p.band_right;
    t_begin = static_cast<int>(imax(lo, 0) / kN);
    t_end = hi < 0 ? 0 : static_cast<int>(imin(hi, nk - 1) / kN) + 1;
  }
  TileTokens qt;
  qt.start = m0;
  qt.count = rows;
  qt.lo = m0;
  qt.hi = m0 + rows - 1;
  auto classify = [&](int t) -> TileClass {
    const int n0 = t * kN;
    if constexpr (kGeneral) {
      return static_cast<TileClass>(tclass[t]);
    } else {
      const TileClass c = MaskEval::band(qt.lo + offset, qt.hi + offset, n0, n0 + kN - 1,
                                         p.band_left, p.band_right);
      return (c == TileClass::kFull && n0 + kN > nk) ? TileClass::kPartial : c;
    }
  };
  auto next_tile = [&](int t, TileClass* cls) {
    for (; t < t_end; ++t) {
      *cls = classify(t);
      if (*cls != TileClass::kEmpty) return t;
    }
    return t_end;
  };

  // Normalizer state per row.
  const NormalizerKind norm = kGeneral ? p.norm : (p.sinks ? NormalizerKind::kSoftmaxSink
                                                           : NormalizerKind::kSoftmax);
  const bool softmax = norm == NormalizerKind::kSoftmax || norm == NormalizerKind::kSoftmaxSink;
  // Softmax rows keep the running max of the raw dot products (fast: the scale folds into the
  // exponent's FMA) or of the modified scores (general).
  float m[2], l[2] = {0.f, 0.f};
  {
    const float sink = p.sinks ? p.sinks[h * p.sinks_s] : kNegInf;
    m[0] = m[1] = kGeneral ? sink : sink / p.scale;
    if (p.sinks) l[0] = l[1] = 0.25f;  // exp(sink - sink), split over the quad's 4 partial sums
  }
  if (norm == NormalizerKind::kKernel) m[0] = m[1] = 0.f;  // the running max of the weights
  const bool additive = kGeneral && p.has_mods && mods.has_additive();
  const float cap = kGeneral ? p.softcap : 0.f, inv_cap = cap != 0.f ? 1.f / cap : 0.f;
  const bool prescale = kGeneral && norm == NormalizerKind::kKernel && p.length_scale;
  const float beta = p.has_beta ? p.beta : -logf(static_cast<float>(nk));
  float lscale[2] = {1.f, 1.f};

  // Prologue: Q, then the first K/V tile.
  load_tile<kM, kDp>(sQ, qp, p.q_sn, m0, nq, p.d);
  TileClass cls = TileClass::kEmpty;
  int t = next_tile(t_begin, &cls);
  if (t < t_end) {
    load_tile<kN, kDp>(sK(0), kp, p.k_sn, t * kN, nk, p.d);
    load_tile<kN, kDVp>(sV(0), vp, p.v_sn, t * kN, nk, p.dv);
  }
  cp_async_commit();

  if constexpr (kGeneral) {
    // The normalized kernel's length scale needs each row's allowed-key count first.
    if (norm == NormalizerKind::kKernel && p.length_scale) {
      int cnt[2] = {0, 0};
      for (int u = t; u < t_end; ++u) {
        const TileClass c = classify(u);
        if (c == TileClass::kEmpty) continue;
        for (int x = lane % 4; x < kN; x += 4) {
          const int j = u * kN + x;
          if (j >= nk) break;
#pragma unroll
          for (int r = 0; r < 2; ++r)
            cnt[r] += row_i[r] < nq && (c == TileClass::kFull || mask_allowed(ms.mask, p.num_nodes, row_i[r], j));
        }
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int n = static_cast<int>(quad_sum(static_cast<float>(cnt[r])));
        lscale[r] = length_scale<float>(n);
      }
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
        if constexpr (!kGeneral) {
          if (masked) {
            const int64_t ia = i + offset;
            const bool ok = j < nk && j >= ia - p.band_left && j <= ia + p.band_right;
            x = ok ? x : kNegInf;
          }
        } else {
          const bool ok =
              i < nq && j < nk && (!masked || mask_allowed(ms.mask, p.num_nodes, i, j));
          x *= p.scale;
          if (ok && additive) x = mods.additive(x, i, i + offset, j);
          if (cap != 0.f) x = cap * tanhf(x * inv_cap);
          if (prescale) x = lscale[r] == 0.f ? 0.f : x * lscale[r];
          x = ok ? x : kNegInf;
        }
      }
    }

    // Normalizer: S -> P in place; O rescaled for the softmax family.
    if (softmax) {
      const float to2 = kGeneral ? static_cast<float>(kLog2e) : p.scale_log2;
#pragma unroll
      for (int r = 0; r < 2; ++r)
        online_row<kN, kDVp>(
            s, o, r, kNegInf, m[r], l[r],
            [&](float x, float m_new) {
              const float m_use = m_new == kNegInf ? 0.f : m_new;
              return fast_exp2(fmaf(x, to2, -m_use * to2));
            },
            [&](float m_old, float m_new) {
              return fast_exp2((m_old - (m_new == kNegInf ? 0.f : m_new)) * to2);
            });
    } else if constexpr (kGeneral) {
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
          online_row<kN, kDVp>(
              s, o, r, 0.f, m[r], l[r],
              [&](float x, float m_new) { return m_new > 0.f ? x / m_new : 0.f; },
              [&](float m_old, float m_new) { return m_new > 0.f ? m_old / m_new : 1.f; });
      }
    }

    // O += P V: P from the S accumulators, 16 keys per step.
    uint32_t a[kN / 16][4];
#pragma unroll
    for (int kk = 0; kk < kN / 16; ++kk) {
      a[kk][0] = ElemTraits<T>::pack(s[8 * kk + 0], s[8 * kk + 1]);
      a[kk][1] = ElemTraits<T>::pack(s[8 * kk + 2], s[8 * kk + 3]);
      a[kk][2] = ElemTraits<T>::pack(s[8 * kk + 4], s[8 * kk + 5]);
      a[kk][3] = ElemTraits<T>::pack(s[8 * kk + 6], s[8 * kk + 7]);
    }
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

  // Epilogue: normalize, row statistic, gate, store.
  const int64_t out_es = p.out_dtype == DType::kF32 ? 4 : 2;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = row_i[r];
    const float lsum = quad_sum(l[r]);
    float stat = 0.f, mul = 1.f;
    if (softmax) {
      mul = lsum > 0.f ? 1.f / lsum : 0.f;
      const float mnat = kGeneral ? m[r] : m[r] * p.scale;
      stat = lsum > 0.f ? mnat + logf(lsum) : kNegInf;
    } else if (norm == NormalizerKind::kKernel) {
      mul = lsum > 0.f ? 1.f / lsum : 0.f;
      stat = lsum * m[r];  // the sum of the weights themselves
    } else if (norm == NormalizerKind::kReLA) {
      float ss = 0.f;
#pragma unroll
      for (int c = 0; c < kDVp / 8; ++c)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = c * 8 + col0 + e;
          const float x = o[c * 4 + 2 * r + e];
          ss += col < p.dv ? x * x : 0.f;
        }
      const float rms = sqrtf(quad_sum(ss) / p.dv + p.rela_eps);
      mul = 1.f / rms;
      stat = rms;
    }
    if (i >= nq) continue;
    const int64_t row = q_start + i;
    char* orow = static_cast<char*>(p.out) + (b * p.o_sb + h * p.o_sh + row * p.o_sn) * out_es;
    float gate_h = 1.f;
    if (kGeneral && p.gate == GateKind::kPerHead)
      gate_h = sigmoid(load_any(p.gate_ptr, p.gate_dtype, b * p.g_sb + h * p.g_sh + row * p.g_sn));
#pragma unroll
    for (int c = 0; c < kDVp / 8; ++c) {
      const int col = c * 8 + col0;
      if (col >= p.dv) continue;
      float x0 = o[c * 4 + 2 * r] * mul, x1 = o[c * 4 + 2 * r + 1] * mul;
      if constexpr (kGeneral) {
        if (norm == NormalizerKind::kReLA) {
          x0 *= p.gain[col * p.gain_s];
          x1 *= p.gain[(col + 1) * p.gain_s];
        }
        if (p.gate == GateKind::kElementwise) {
          const int64_t g = b * p.g_sb + h * p.g_sh + row * p.g_sn + col;
          x0 *= sigmoid(load_any(p.gate_ptr, p.gate_dtype, g));
          x1 *= sigmoid(load_any(p.gate_ptr, p.gate_dtype, g + 1));
        }
        x0 *= gate_h;
        x1 *= gate_h;
      }
      if (p.out_dtype == DType::kF32) {
        *reinterpret_cast<float2*>(orow + col * 4) = make_float2(x0, x1);
      } else {
        const uint32_t v = p.out_dtype == DType::kBF16 ? ElemTraits<__nv_bfloat16>::pack(x0, x1)
                                                       : ElemTraits<__half>::pack(x0, x1);
        *reinterpret_cast<uint32_t*>(orow + col * 2) = v;
      }
    }
    if (p.row_stat && (lane % 4) == 0)
      p.row_stat[b * p.st_sb + h * p.st_sh + row * p.st_sn] = stat;
  }
}

// Launches one flavor of the kernel on `stream`.
template <class T, int kD, int kDV, bool kGeneral>
cudaError_t launch_fwd(const FwdParams& p, cudaStream_t stream) {
  using S = FwdShape<kD, kDV>;
  auto kernel = fwd_kernel<T, kD, kDV, kGeneral>;
  cudaError_t e =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, S::kSmemBytes);
  if (e != cudaSuccess) return e;
  const dim3 grid(p.num_q_tiles, p.hq, p.batch);
  kernel<<<grid, S::kThreads, S::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace attnkit::cuda
