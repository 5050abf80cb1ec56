// Attention statistics on CUDA (MECHANISMS.md 1.4): each row's max score and entropy, and each
// key's column mass over a range of query rows (its weights from the forward's LSE). The scores
// are computed again in fp32 on the CUDA cores with the same policies as the general kernel
// (mask tree, score mods, softcap): one warp a query row, its lanes over the keys. A pass of
// O(Nq Nk d) multiply-adds, for analyses (SnapKV's observation window, sink detection, head
// importance), not a training step's hot path.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda/fwd_common.cuh"
#include "cuda/fwd_mask.cuh"
#include "cuda/setup.h"

namespace attnkit::cuda {
namespace {

struct StatsParams {
  const float* lse = nullptr;  // the forward's row statistic (natural log)
  int64_t lse_sb = 0, lse_sh = 0, lse_sn = 0;
  core::StatOperand row_max, entropy;
  // The column mass summed in float64 (dense [B, heads, Nk]; fp32 atomics lost ~1% over 2^20
  // rows), then converted into the caller's fp32 view. The scratch (8 bytes a column, 512 MiB
  // for 64 heads of 2^20 keys) is allocated on the stream for the call.
  double* mass = nullptr;
  int64_t mass_sb = 0, mass_sh = 0;
  int64_t col_q_begin = 0, col_q_end = 0;
  bool col_group_sum = false;
};

constexpr int kRowsPerBlock = 4;  // one warp a row

template <class T>
__global__ void stats_kernel(const __grid_constant__ FwdParams p,
                             const __grid_constant__ StatsParams sp) {
  const int b = blockIdx.z, h = blockIdx.y;
  const int lane = threadIdx.x % 32;
  const int i = blockIdx.x * kRowsPerBlock + threadIdx.x / 32;
  const SeqExtent seq = seq_extent(p, b);
  if (i >= seq.nq) return;
  MaskState ms;
  resolve_mask(p, b, h, seq.offset, ms);
  const ScoreModEval<float> mods = resolve_mods(p, b, h);
  const int64_t row = seq.q_start + i;
  const float lse = sp.lse[b * sp.lse_sb + h * sp.lse_sh + row * sp.lse_sn];
  const bool weighted = isfinite(lse);
  const int hk = h / p.group;
  const T* q = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh + row * p.q_sn;
  const bool mass = sp.mass && i >= sp.col_q_begin && i < sp.col_q_end;
  double* col =
      mass ? sp.mass + b * sp.mass_sb + (sp.col_group_sum ? hk : h) * sp.mass_sh : nullptr;
  // Each lane keeps its keys' softmax as (m, l, t): m the running max, l = sum exp(s - m),
  // t = sum exp(s - m) (s - m). The entropy is then log l - t / l, free of the cancellation
  // of LSE - sum p s (both near the max score) that would scale the forward LSE's rounding by
  // the scores' size.
  float rmax = -INFINITY, l = 0.f, t = 0.f;
  auto add = [&](float s) {
    if (s > rmax) {
      if (l > 0.f) {
        const float a = expf(rmax - s);
        t = a > 0.f ? a * (t + l * (rmax - s)) : 0.f;  // l (rmax - s) may overflow where a is 0
        l *= a;
      }
      rmax = s;
    }
    const float e = expf(s - rmax);
    l += e;
    t = fmaf(e, s - rmax, t);
  };
  for (int j = lane; j < seq.nk; j += 32) {
    if (!mask_allowed(ms.mask, p.num_nodes, i, j)) continue;
    const T* k = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh + (seq.k_start + j) * p.k_sn;
    float dot = 0.f;
    for (int x = 0; x < p.d; ++x) dot = fmaf(static_cast<float>(q[x]), static_cast<float>(k[x]), dot);
    const float s = mods.score(dot * p.scale, i, i + seq.offset, j);
    if (s == -INFINITY) continue;
    add(s);
    if (col && weighted) atomicAdd(col + j, static_cast<double>(expf(s - lse)));
  }
#pragma unroll
  for (int x = 16; x > 0; x /= 2) {
    const float m2 = __shfl_xor_sync(0xffffffff, rmax, x);
    const float l2 = __shfl_xor_sync(0xffffffff, l, x);
    const float t2 = __shfl_xor_sync(0xffffffff, t, x);
    const float m = fmaxf(rmax, m2);
    const float a1 = l > 0.f ? expf(rmax - m) : 0.f, a2 = l2 > 0.f ? expf(m2 - m) : 0.f;
    t = (a1 > 0.f ? a1 * (t + l * (rmax - m)) : 0.f) + (a2 > 0.f ? a2 * (t2 + l2 * (m2 - m)) : 0.f);
    l = a1 * l + a2 * l2;
    rmax = m;
  }
  if (lane != 0) return;
  auto at = [&](const core::StatOperand& o) -> float& {
    return o.data[b * o.sb + h * o.sh + row * o.sn];
  };
  if (sp.row_max.data) at(sp.row_max) = rmax;
  if (sp.entropy.data) {
    // With sinks the sink is one more outcome of the softmax.
    const float sink = p.sinks ? p.sinks[h * p.sinks_s] : -INFINITY;
    if (isfinite(sink)) add(sink);
    at(sp.entropy) = l > 0.f ? logf(l) - t / l : 0.f;  // a row with nothing to attend: 0
  }
}

// The float64 column mass into the caller's fp32 view: one thread an element.
__global__ void mass_to_f32_kernel(const double* mass, core::StatOperand out, int64_t heads,
                                   int64_t nk, int64_t count) {
  const int64_t x = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (x >= count) return;
  const int64_t j = x % nk, h = x / nk % heads, b = x / (nk * heads);
  out.data[b * out.sb + h * out.sh + j * out.sn] = static_cast<float>(mass[x]);
}

}  // namespace

cudaError_t launch_stats(const core::Problem& p, const FwdParams& f, const float* lse,
                         int64_t lse_sb, int64_t lse_sh, int64_t lse_sn, cudaStream_t stream) {
  StatsParams sp;
  sp.lse = lse;
  sp.lse_sb = lse_sb, sp.lse_sh = lse_sh, sp.lse_sn = lse_sn;
  sp.row_max = p.row_max;
  sp.entropy = p.entropy;
  sp.col_q_begin = p.col_q_begin;
  sp.col_q_end = p.col_q_end;
  sp.col_group_sum = p.col_group_sum;
  const int64_t heads = p.col_group_sum ? p.hk : p.hq, count = p.batch * heads * p.max_nk;
  if (p.col_mass.defined() && count > 0) {  // zeroed before the rows add to it
    cudaError_t e = cudaMallocAsync(reinterpret_cast<void**>(&sp.mass), count * 8, stream);
    if (e == cudaSuccess) e = cudaMemsetAsync(sp.mass, 0, count * 8, stream);
    if (e != cudaSuccess) {
      if (sp.mass) (void)cudaFreeAsync(sp.mass, stream);
      return e;
    }
    sp.mass_sb = heads * p.max_nk, sp.mass_sh = p.max_nk;
  }
  const dim3 grid(static_cast<unsigned>((p.max_nq + kRowsPerBlock - 1) / kRowsPerBlock),
                  static_cast<unsigned>(p.hq), static_cast<unsigned>(p.batch));
  if (grid.x != 0) {  // (no query row anywhere: the column mass is 0)
    if (p.q.dtype == DType::kBF16)
      stats_kernel<__nv_bfloat16><<<grid, 32 * kRowsPerBlock, 0, stream>>>(f, sp);
    else
      stats_kernel<__half><<<grid, 32 * kRowsPerBlock, 0, stream>>>(f, sp);
  }
  if (sp.mass) {
    mass_to_f32_kernel<<<static_cast<unsigned>((count + 255) / 256), 256, 0, stream>>>(
        sp.mass, p.col_mass, heads, p.max_nk, count);
    const cudaError_t e = cudaFreeAsync(sp.mass, stream);
    if (e != cudaSuccess) return e;
  }
  return cudaGetLastError();
}

}  // namespace attnkit::cuda
