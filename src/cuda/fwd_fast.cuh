// The fast CUDA forward kernel (sm_90a): plain softmax (with or without a sink) under a band mask
// (none, causal, sliding window), with its LSE, in the FlashAttention-3 arrangement.
//
// A CTA of three warpgroups computes a 128-row query tile of one (batch, query head):
// - warpgroup 0 is the producer: one thread issues the bulk tensor copies (TMA) of Q and of the
//   K and V tiles into a ring of kStages shared-memory stages; each copy completes on its stage's
//   "full" mbarrier, and a stage is refilled once every consumer warp has arrived on its "empty"
//   mbarrier. It gives most of its registers away (setmaxnreg).
// - warpgroups 1 and 2 are consumers of 64 rows each. Within a warpgroup, S = Q K^T of tile j is
//   issued together with O += P V of tile j - 1, so the softmax of tile j runs while the tensor
//   cores work on P V. Between the two warpgroups, named barriers take turns at issuing (ping-pong)
//   so that one warpgroup's softmax overlaps the other's matrix multiplies.
// No CTA-wide barrier is taken after the prologue.
#pragma once
#include <cuda.h>
#include <cuda_runtime.h>

#include "cuda/fwd_common.cuh"
#include "cuda/fwd_params.h"
#include "cuda/sm90_ops.cuh"

namespace attnkit::cuda {

// Tensor maps of q, k, v as 4-D tensors (column, row, head, batch) of 64-column boxes with the
// 128-byte swizzle; rows of a varlen batch are the packed rows (batch extent 1).
struct TmaMaps {
  CUtensorMap q, k, v;
};

template <int kD, int kDV>
struct FastShape : FwdTiles<kD, kDV> {
  using Base = FwdTiles<kD, kDV>;
  static constexpr int kThreads = 384;  // producer + 2 consumer warpgroups
  static constexpr int kBarBytes = 128;
  static constexpr int kStageBytes = Base::kKBytes + Base::kVBytes;
  static constexpr int kStages =
      Base::kQBytes + 3 * kStageBytes + 1024 + kBarBytes <= 227 * 1024 ? 3 : 2;
  static constexpr int kSmemBytes = Base::kQBytes + kStages * kStageBytes + 1024 + kBarBytes;
  static constexpr int kProducerRegs = 24, kConsumerRegs = 240;
};

template <int kRegs>
__device__ __forceinline__ void fence_regs_u(uint32_t (&r)[kRegs][4]) {
#pragma unroll
  for (int i = 0; i < kRegs; ++i)
#pragma unroll
    for (int x = 0; x < 4; ++x) asm volatile("" : "+r"(r[i][x])::"memory");
}

template <class T, int kD, int kDV>
__global__ void __launch_bounds__(384, 1)
    fwd_fast_kernel(const __grid_constant__ FwdParams p, const __grid_constant__ TmaMaps maps) {
  using S = FastShape<kD, kDV>;
  using Tag = typename ElemTraits<T>::Tag;
  constexpr int kM = S::kM, kN = S::kN, kDp = S::kDp, kDVp = S::kDVp, kStages = S::kStages;
  constexpr int kSRegs = kN / 2, kORegs = kDVp / 2;

  extern __shared__ uint8_t smem_raw[];
  const uint32_t sQ = (smem_addr(smem_raw) + 1023) & ~1023u;
  auto sK = [&](int st) { return sQ + S::kQBytes + st * S::kStageBytes; };
  auto sV = [&](int st) { return sK(st) + S::kKBytes; };
  const uint32_t bars = sQ + S::kQBytes + kStages * S::kStageBytes;
  const uint32_t bar_q = bars;
  auto full_k = [&](int st) { return bars + 8 * (1 + st); };
  auto full_v = [&](int st) { return bars + 8 * (1 + kStages + st); };
  auto empty_k = [&](int st) { return bars + 8 * (1 + 2 * kStages + st); };
  auto empty_v = [&](int st) { return bars + 8 * (1 + 3 * kStages + st); };

  const int b = blockIdx.z, h = blockIdx.y;
  const int tile = p.num_q_tiles - 1 - static_cast<int>(blockIdx.x);  // long rows first
  const SeqExtent seq = seq_extent(p, b);
  const int nq = seq.nq, nk = seq.nk;
  const int m0 = tile * kM;
  if (m0 >= nq) return;
  // The key tiles that meet the band of rows [m0, m0 + rows).
  const int rows = min(kM, nq - m0);
  const int64_t lo = m0 + seq.offset - p.band_left, hi = m0 + rows - 1 + seq.offset + p.band_right;
  const int t_begin = static_cast<int>(imax(lo, 0) / kN);
  const int t_end = (hi < 0 || nk <= 0) ? 0 : static_cast<int>(imin(hi, nk - 1) / kN) + 1;
  const int n_tiles = max(t_end - t_begin, 0);

  const int tid = threadIdx.x, wg = tid / 128;
  if (tid == 0) {
    mbar_init(bar_q, 1);
#pragma unroll
    for (int st = 0; st < kStages; ++st) {
      mbar_init(full_k(st), 1);
      mbar_init(full_v(st), 1);
      mbar_init(empty_k(st), 8);  // one arrival per consumer warp
      mbar_init(empty_v(st), 8);
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
      const int bq = p.cu_q ? 0 : b, hk = h / p.group;
      const int q_row = static_cast<int>(seq.q_start) + m0;
      mbar_expect_tx(bar_q, S::kQBytes);
#pragma unroll
      for (int c = 0; c < kDp / 64; ++c) tma_load_4d(sQ + c * kM * 128, &maps.q, bar_q, c * 64, q_row, h, bq);
      for (int it = 0; it < n_tiles; ++it) {
        const int st = it % kStages;
        const uint32_t phase = (it / kStages) & 1;
        const int k_row = static_cast<int>(seq.k_start) + (t_begin + it) * kN;
        mbar_wait(empty_k(st), phase ^ 1);
        mbar_expect_tx(full_k(st), S::kKBytes);
#pragma unroll
        for (int c = 0; c < kDp / 64; ++c)
          tma_load_4d(sK(st) + c * kN * 128, &maps.k, full_k(st), c * 64, k_row, hk, bq);
        mbar_wait(empty_v(st), phase ^ 1);
        mbar_expect_tx(full_v(st), S::kVBytes);
#pragma unroll
        for (int c = 0; c < kDVp / 64; ++c)
          tma_load_4d(sV(st) + c * kN * 128, &maps.v, full_v(st), c * 64, k_row, hk, bq);
      }
    }
    return;
  }

  // Consumers.
  regs_inc<S::kConsumerRegs>();
  const int cw = wg - 1, lane = tid % 32, warp = (tid % 128) / 32;
  const int row_i[2] = {m0 + cw * 64 + warp * 16 + lane / 4, m0 + cw * 64 + warp * 16 + lane / 4 + 8};
  const int col0 = 2 * (lane % 4);
  const bool pingpong = p.pingpong;
  const int my_turn = 1 + cw, other_turn = 2 - cw;  // named barrier ids

  // Softmax rows keep the running max of raw dot products: the scale folds into the exponent.
  float m[2], l[2] = {0.f, 0.f};
  m[0] = m[1] = p.sinks ? p.sinks[h * p.sinks_s] / p.scale : -INFINITY;
  if (p.sinks) l[0] = l[1] = 0.25f;  // exp(sink - sink), split over the quad's 4 partial sums
  float o[kORegs];
#pragma unroll
  for (int x = 0; x < kORegs; ++x) o[x] = 0.f;
  const float to2 = p.scale_log2;

  // Tiles the band (or the end of the keys) cuts need the element mask.
  auto mask = [&](float (&s)[kSRegs], int t) {
    const int n0 = t * kN;
    const TileClass c = MaskEval::band(m0 + seq.offset, m0 + rows - 1 + seq.offset, n0,
                                       n0 + kN - 1, p.band_left, p.band_right);
    if (c != TileClass::kFull || n0 + kN > nk)
      band_mask<kN>(s, row_i, n0, col0, nk, seq.offset, p.band_left, p.band_right);
  };
  auto issue_s = [&](float (&s)[kSRegs], int st) {
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kDp / 16; ++kk) {
      const uint64_t da =
          smem_desc(sQ + (kk / 4) * (kM * 128) + cw * 64 * 128 + (kk % 4) * 32, 16, 1024);
      const uint64_t db = smem_desc(sK(st) + (kk / 4) * (kN * 128) + (kk % 4) * 32, 16, 1024);
      Wgmma<kN, Tag>::ss(s, da, db, kk > 0);
    }
    wgmma_commit();
  };
  auto issue_pv = [&](uint32_t (&a)[kN / 16][4], int st) {
    fence_regs(o);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kN / 16; ++kk) {
      const uint64_t db = smem_desc(sV(st) + kk * 16 * 128, kN * 128, 1024);
      Wgmma<kDVp, Tag>::rs(o, a[kk], db, 1);
    }
    wgmma_commit();
  };
  auto release = [&](uint32_t bar) {
    if (lane == 0) mbar_arrive(bar);
  };
  auto phase_of = [](int it) { return static_cast<uint32_t>((it / kStages) & 1); };

  if (n_tiles > 0) {
    if (pingpong && cw == 1) named_arrive(1, 256);  // warpgroup 1 lets warpgroup 0 go first
    mbar_wait(bar_q, 0);
    float s[kSRegs];
    uint32_t pa[kN / 16][4];
    float alpha[2] = {1.f, 1.f};

    if (pingpong) named_sync(my_turn, 256);
    mbar_wait(full_k(0), 0);
    issue_s(s, 0);
    if (pingpong) named_arrive(other_turn, 256);
    wgmma_wait<0>();
    fence_regs(s);
    release(empty_k(0));
    mask(s, t_begin);
#pragma unroll
    for (int r = 0; r < 2; ++r) softmax_row<kN>(s, r, to2, m[r], l[r]);
    pack_p<T, kN>(s, pa);

    for (int it = 1; it < n_tiles; ++it) {
      const int st = it % kStages, prev = (it - 1) % kStages;
      if (pingpong) named_sync(my_turn, 256);
      mbar_wait(full_k(st), phase_of(it));
      issue_s(s, st);
#pragma unroll
      for (int r = 0; r < 2; ++r) scale_row<kDVp>(o, r, alpha[r]);
      mbar_wait(full_v(prev), phase_of(it - 1));
      issue_pv(pa, prev);
      if (pingpong) named_arrive(other_turn, 256);
      wgmma_wait<1>();
      fence_regs(s);
      release(empty_k(st));
      mask(s, t_begin + it);
#pragma unroll
      for (int r = 0; r < 2; ++r) alpha[r] = softmax_row<kN>(s, r, to2, m[r], l[r]);
      wgmma_wait<0>();
      fence_regs(o);
      fence_regs_u(pa);
      release(empty_v(prev));
      pack_p<T, kN>(s, pa);
    }

    const int last = (n_tiles - 1) % kStages;
    if (pingpong) named_sync(my_turn, 256);
#pragma unroll
    for (int r = 0; r < 2; ++r) scale_row<kDVp>(o, r, alpha[r]);
    mbar_wait(full_v(last), phase_of(n_tiles - 1));
    issue_pv(pa, last);
    if (pingpong && cw == 0) named_arrive(other_turn, 256);  // warpgroup 1 has no turn left
    wgmma_wait<0>();
    fence_regs(o);
    fence_regs_u(pa);
    release(empty_v(last));
  }

  store_rows<false, kDVp>(p, p.sinks ? NormalizerKind::kSoftmaxSink : NormalizerKind::kSoftmax, b,
                          h, seq, row_i, col0, lane % 4 == 0, o, m, l);
}

// Launches the fast kernel on `stream`.
template <class T, int kD, int kDV>
cudaError_t launch_fwd_fast(const FwdParams& p, const TmaMaps& maps, cudaStream_t stream) {
  using S = FastShape<kD, kDV>;
  auto kernel = fwd_fast_kernel<T, kD, kDV>;
  cudaError_t e =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, S::kSmemBytes);
  if (e != cudaSuccess) return e;
  const dim3 grid(p.num_q_tiles, p.hq, p.batch);
  kernel<<<grid, S::kThreads, S::kSmemBytes, stream>>>(p, maps);
  return cudaGetLastError();
}

}  // namespace attnkit::cuda
