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
  core::StatOperand row_max, entropy, col_mass;
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
  const bool mass = sp.col_mass.data && i >= sp.col_q_begin && i < sp.col_q_end;
  float* col = mass ? sp.col_mass.data + b * sp.col_mass.sb +
                          (sp.col_group_sum ? hk : h) * sp.col_mass.sh
                    : nullptr;
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
    if (col && weighted) atomicAdd(col + j * sp.col_mass.sn, expf(s - lse));
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

}  // namespace

cudaError_t launch_stats(const core::Problem& p, const FwdParams& f, const float* lse,
                         int64_t lse_sb, int64_t lse_sh, int64_t lse_sn, cudaStream_t stream) {
  StatsParams sp;
  sp.lse = lse;
  sp.lse_sb = lse_sb, sp.lse_sh = lse_sh, sp.lse_sn = lse_sn;
  sp.row_max = p.row_max;
  sp.entropy = p.entropy;
  sp.col_mass = p.col_mass;
  sp.col_q_begin = p.col_q_begin;
  sp.col_q_end = p.col_q_end;
  sp.col_group_sum = p.col_group_sum;
  if (p.col_mass.defined()) {  // zeroed before the rows add to it: [B, heads, Nk]
    const core::StatOperand& c = p.col_mass;
    const cudaError_t e = fill_4d(c.data, DType::kF32, nullptr,
                                  {1, p.batch, p.col_group_sum ? p.hk : p.hq, p.max_nk},
                                  {0, c.sb, c.sh, c.sn}, stream);
    if (e != cudaSuccess) return e;
  }
  const dim3 grid(static_cast<unsigned>((p.max_nq + kRowsPerBlock - 1) / kRowsPerBlock),
                  static_cast<unsigned>(p.hq), static_cast<unsigned>(p.batch));
  if (grid.x == 0) return cudaSuccess;  // no query row anywhere (col_mass is zeroed above)
  if (p.q.dtype == DType::kBF16)
    stats_kernel<__nv_bfloat16><<<grid, 32 * kRowsPerBlock, 0, stream>>>(f, sp);
  else
    stats_kernel<__half><<<grid, 32 * kRowsPerBlock, 0, stream>>>(f, sp);
  return cudaGetLastError();
}

}  // namespace attnkit::cuda
