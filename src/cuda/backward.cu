// The CUDA backward pass: checks what the kernels differentiate, runs the per-row preparation
// (D = dO . out, LSE in base 2, the gate's backward, dq zeroed, dsinks), then the kernel of
// cuda/bwd_kernel.cuh for (dtype, head_dim, head_dim_v).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>

#include "cuda/backward.h"
#include "cuda/bwd_kernel.cuh"
#include "cuda/forward.h"
#include "cuda/setup.h"

namespace attnkit::cuda {

// The kernels are instantiated in the generated bwd_*.cu files, not here.
#define ATK_BWD(T, DT, D, DV)                                                                 \
  extern template cudaError_t launch_bwd<T, D, DV, false, false>(const BwdParams&,              \
                                                                 const BwdMaps&, cudaStream_t); \
  extern template cudaError_t launch_bwd<T, D, DV, false, true>(const BwdParams&,               \
                                                                const BwdMaps&, cudaStream_t);  \
  extern template cudaError_t launch_bwd<T, D, DV, true, false>(const BwdParams&,               \
                                                                const BwdMaps&, cudaStream_t);
#include "bwd_table.inc"
#undef ATK_BWD

namespace {

// Rows a block of dq's conversion (blocks of 8 rows left half the lanes idle at d64).
constexpr int kConvertRows = 32;

// fused_dq where a group's query rows (max_nq * group) are at most this many: the last CTA
// converts them alone, which at 1024 rows takes a few microseconds.
constexpr int64_t kFusedDqRows = 2048;

using LaunchFn = cudaError_t (*)(const BwdParams&, const BwdMaps&, cudaStream_t);
struct Instance {
  DType dtype;
  int d, dv;
  LaunchFn fast, tabled, general;
};

#define ATK_BWD(T, DT, D, DV)                                                                \
  {DT, D, DV, &launch_bwd<T, D, DV, false, false>, &launch_bwd<T, D, DV, false, true>,       \
   &launch_bwd<T, D, DV, true, false>},
constexpr Instance kInstances[] = {
#include "bwd_table.inc"
    {DType::kF32, 0, 0, nullptr, nullptr, nullptr},  // the end (the table may be empty otherwise)
};
#undef ATK_BWD

const Instance* find_instance(DType t, int64_t d, int64_t dv) {
  for (const Instance& x : kInstances)
    if (x.fast && x.dtype == t && x.d == d && x.dv == dv) return &x;
  return nullptr;
}

// The per-row preparation's arguments (rows addressed as in FwdParams).
struct PrepParams {
  const void* dout = nullptr;
  DType do_dtype = DType::kF32;
  int64_t do_sb = 0, do_sh = 0, do_sn = 0;
  const void* out = nullptr;
  DType out_dtype = DType::kF32;
  int64_t o_sb = 0, o_sh = 0, o_sn = 0;
  const float* row_stat = nullptr;  // null: sigmoid (no LSE, no D)
  // ReLA: O1 (the forward's O before the RMS, gain and gate) and what its backward needs; the
  // copy of dO receives dO1 = d(out) / dO1.
  const float* raw_o = nullptr;
  int64_t r_sb = 0, r_sh = 0, r_sn = 0;
  const float* gain = nullptr;
  int64_t gain_s = 0;
  float eps = 0.f;
  float* dgain = nullptr;  // fp32 drela_gain, added into (zeroed before)
  int64_t dgain_s = 0;
  int64_t st_sb = 0, st_sh = 0, st_sn = 0;
  GateKind gate = GateKind::kNone;
  const void* gate_ptr = nullptr;
  DType gate_dtype = DType::kF32;
  int64_t g_sb = 0, g_sh = 0, g_sn = 0;
  void* dgate = nullptr;  // fp32 or fp64, addressed like the gate
  DType dgate_dtype = DType::kF32;
  int64_t dg_sb = 0, dg_sh = 0, dg_sn = 0;
  void* dout_copy = nullptr;  // dO (gated) in the kernels' dtype, when grad_out cannot be read
  bool copy_bf16 = true;
  int64_t c_sb = 0, c_sh = 0, c_sn = 0;
  float* dq = nullptr;
  int64_t dq_sb = 0, dq_sh = 0, dq_sn = 0;
  int* group_done = nullptr;  // BwdParams::group_done (fused_dq), zeroed here
  int group = 1;
  float* lse2 = nullptr;
  float* dd = nullptr;
  int64_t stat_stride = 0;
  const float* sinks = nullptr;
  int64_t sinks_s = 0;
  double* dsinks = nullptr;  // [hq] sums
  int hq = 0, d = 0, dv = 0, nq = 0, nk = 0;
  const int32_t* cu_q = nullptr;
  const int32_t* cu_k = nullptr;
};

__device__ __forceinline__ void store_grad(void* p, DType t, int64_t i, double v) {
  if (t == DType::kF64)
    static_cast<double*>(p)[i] = v;
  else
    static_cast<float*>(p)[i] = static_cast<float>(v);
}

// Row i of (b, h) in the preparation: its stat slots and its index in the tensors, or -1 for a
// row past the sequence (up to the padded stat_stride), whose slots the `first` thread fills
// with lse2 = +inf (no weight) and D = 0. The first thread of a group's row 0 zeroes the group's
// count of CTAs (BwdParams::group_done).
struct PrepRow {
  float* lse2;
  float* dd;
  int64_t row;
};

__device__ __forceinline__ PrepRow prep_row(const PrepParams& p, int i, int h, int b, bool first) {
  if (p.group_done && first && i == 0 && h % p.group == 0)
    p.group_done[b * (p.hq / p.group) + h / p.group] = 0;
  int nq = p.nq;
  int64_t q_start = 0;
  if (p.cu_q) {
    q_start = p.cu_q[b];
    nq = p.cu_q[b + 1] - p.cu_q[b];
  }
  const int64_t slot = (static_cast<int64_t>(b) * p.hq + h) * p.stat_stride + i;
  PrepRow r{p.lse2 + slot, p.dd + slot, q_start + i};
  if (i >= nq) {
    if (first) {
      *r.lse2 = INFINITY;
      *r.dd = 0.f;
    }
    r.row = -1;
  }
  return r;
}

// A softmax row's statistics: LSE * log2(e), D, and its share of dsinks (-exp(sink - LSE) D).
__device__ __forceinline__ void store_softmax_stats(const PrepParams& p, const PrepRow& r, int h,
                                                    int b, float dot) {
  const float lse = p.row_stat[b * p.st_sb + h * p.st_sh + r.row * p.st_sn];
  // No weight where LSE is -inf, or so low that LSE * log2(e) is (below -FLT_MAX / log2 e: the
  // forward counts such rows as masked; P = exp2(s log2 e - lse2) would be NaN).
  const float l2 = lse * static_cast<float>(kLog2e);
  *r.lse2 = l2 == -INFINITY ? INFINITY : l2;
  *r.dd = dot;
  if (p.dsinks && l2 != -INFINITY)
    atomicAdd(p.dsinks + h, -exp(static_cast<double>(p.sinks[h * p.sinks_s]) - lse) * dot);
}

// One warp per query row (blockIdx = (row / 8, head, batch)): D = dO . out, LSE * log2(e), the
// gate's backward (dO <- dO sigmoid(G); dG = dO out sigmoid(-G)), the row of dq zeroed,
// and the row's share of dsinks (-exp(sink - LSE) D). Rows past the sequence (up to the padded
// stat_stride) get lse2 = +inf (no weight) and D = 0.
__global__ void bwd_prep_kernel(const __grid_constant__ PrepParams p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int i = blockIdx.x * 8 + warp, h = blockIdx.y, b = blockIdx.z;
  if (i >= p.stat_stride) return;
  const PrepRow r = prep_row(p, i, h, b, lane == 0);
  if (r.row < 0) return;
  const int64_t row = r.row;
  float *const lse2 = r.lse2, *const dd = r.dd;
  const int64_t o_off = b * p.o_sb + h * p.o_sh + row * p.o_sn;
  const int64_t do_off = b * p.do_sb + h * p.do_sh + row * p.do_sn;
  const int64_t g_row = b * p.g_sb + h * p.g_sh + row * p.g_sn;
  const int64_t dg_row = b * p.dg_sb + h * p.dg_sh + row * p.dg_sn;
  float gate_h = 1.f, gate_hc = 0.f;  // sigmoid(G) and sigmoid(-G) = 1 - sigmoid(G)
  if (p.gate == GateKind::kPerHead)
    fast_sigmoid_pair(load_any(p.gate_ptr, p.gate_dtype, g_row), &gate_h, &gate_hc);
  float dot = 0.f;
  for (int c = lane; c < p.dv; c += 32) {
    const float g = load_any(p.dout, p.do_dtype, do_off + c);
    const float o = load_any(p.out, p.out_dtype, o_off + c);
    dot += g * o;
    float gd = g * gate_h;
    if (p.gate == GateKind::kElementwise) {
      float sg, sgc;
      fast_sigmoid_pair(load_any(p.gate_ptr, p.gate_dtype, g_row + c), &sg, &sgc);
      gd = g * sg;
      if (p.dgate) store_grad(p.dgate, p.dgate_dtype, dg_row + c, g * o * sgc);
    }
    if (p.dout_copy && !p.raw_o) {
      const int64_t off = b * p.c_sb + h * p.c_sh + row * p.c_sn + c;
      if (p.copy_bf16)
        static_cast<__nv_bfloat16*>(p.dout_copy)[off] = __float2bfloat16(gd);
      else
        static_cast<__half*>(p.dout_copy)[off] = __float2half(gd);
    }
  }
  if (p.raw_o) {
    // ReLA: out = gain O1 / rms (then the gate); with dY = dO gated,
    // dO1 = gain dY / rms - O1 (sum_c dY_c gain_c O1_c) / (dv rms^3), dgain += dY O1 / rms.
    const float* o1 = p.raw_o + b * p.r_sb + h * p.r_sh + row * p.r_sn;
    auto gated = [&](int c) {
      const float g = load_any(p.dout, p.do_dtype, do_off + c) * gate_h;
      return p.gate == GateKind::kElementwise
                 ? g * fast_sigmoid(load_any(p.gate_ptr, p.gate_dtype, g_row + c))
                 : g;
    };
    float ss = 0.f, sdot = 0.f;
    for (int c = lane; c < p.dv; c += 32) {
      ss += o1[c] * o1[c];
      sdot += gated(c) * p.gain[c * p.gain_s] * o1[c];
    }
#pragma unroll
    for (int x = 16; x > 0; x /= 2) {
      ss += __shfl_xor_sync(0xffffffff, ss, x);
      sdot += __shfl_xor_sync(0xffffffff, sdot, x);
    }
    const float rms = sqrtf(ss / p.dv + p.eps);
    const float k3 = sdot / (p.dv * rms * rms * rms);
    for (int c = lane; c < p.dv; c += 32) {
      const float dy = gated(c);
      const float d1 = p.gain[c * p.gain_s] * dy / rms - o1[c] * k3;
      const int64_t off = b * p.c_sb + h * p.c_sh + row * p.c_sn + c;
      if (p.copy_bf16)
        static_cast<__nv_bfloat16*>(p.dout_copy)[off] = __float2bfloat16(d1);
      else
        static_cast<__half*>(p.dout_copy)[off] = __float2half(d1);
      if (p.dgain) atomicAdd(p.dgain + c * p.dgain_s, dy * o1[c] / rms);
    }
  }
  if (p.dq)  // else zeroed by a memset before (ATTNKIT_CUDA_BWD_MEMSET)
    for (int c = lane; c < p.d; c += 32) p.dq[b * p.dq_sb + h * p.dq_sh + row * p.dq_sn + c] = 0.f;
#pragma unroll
  for (int x = 16; x > 0; x /= 2) dot += __shfl_xor_sync(0xffffffff, dot, x);
  if (lane != 0) return;
  if (p.gate == GateKind::kPerHead && p.dgate)
    store_grad(p.dgate, p.dgate_dtype, dg_row, dot * gate_hc);
  if (!p.row_stat) {  // sigmoid, ReLA
    *lse2 = 0.f;
    *dd = 0.f;
    return;
  }
  store_softmax_stats(p, r, h, b, dot);
}

// Eight 16-bit values (one 16-byte load) to floats, their dot product with another eight.
template <typename T>
__device__ __forceinline__ float dot8(const uint4& a, const uint4& b) {
  const uint32_t x[4] = {a.x, a.y, a.z, a.w}, y[4] = {b.x, b.y, b.z, b.w};
  float s = 0.f;
  const auto f = [](uint32_t w, int hi) {
    return ElemTraits<T>::to_float(static_cast<unsigned short>(w >> (16 * hi)));
  };
#pragma unroll
  for (int k = 0; k < 4; ++k) s += f(x[k], 0) * f(y[k], 0) + f(x[k], 1) * f(y[k], 1);
  return s;
}

// The preparation of a softmax (or normalized kernel) row (no gate, no ReLA, dO read in place,
// 16-bit O and dO, dv / 8 a power of two up to 32, rows aligned to 16 bytes): a group of dv / 8
// threads a row, each with one 16-byte load of dO and of O, and float4 stores of the zeroed dq.
// The general kernel's loads of 2 bytes a lane ran at about a third of the memory's rate (run
// 40).
template <typename T>
__global__ void bwd_prep_vec_kernel(const __grid_constant__ PrepParams p, int group_log2) {
  const int g = 1 << group_log2, j = threadIdx.x & (g - 1), lane = threadIdx.x % 32;
  const int i = blockIdx.x * (256 >> group_log2) + (threadIdx.x >> group_log2);
  const int h = blockIdx.y, b = blockIdx.z;
  if (i >= p.stat_stride) return;  // the whole group leaves together
  const PrepRow r = prep_row(p, i, h, b, j == 0);
  if (r.row < 0) return;
  const int64_t row = r.row;
  const T* o = static_cast<const T*>(p.out) + b * p.o_sb + h * p.o_sh + row * p.o_sn;
  const T* go = static_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh + row * p.do_sn;
  float dot = dot8<T>(*reinterpret_cast<const uint4*>(go + 8 * j),
                      *reinterpret_cast<const uint4*>(o + 8 * j));
  if (p.dq) {  // else zeroed by a memset before (ATTNKIT_CUDA_BWD_MEMSET)
    float* dq = p.dq + b * p.dq_sb + h * p.dq_sh + row * p.dq_sn;
    for (int c = 4 * j; c < p.d; c += 4 * g)
      *reinterpret_cast<float4*>(dq + c) = make_float4(0.f, 0.f, 0.f, 0.f);
  }
  const unsigned mask = g == 32 ? 0xffffffffu : ((1u << g) - 1) << (lane & ~(g - 1));
  for (int x = g / 2; x > 0; x /= 2) dot += __shfl_xor_sync(mask, dot, x);
  if (j != 0) return;
  store_softmax_stats(p, r, h, b, dot);
}

// Whether bwd_prep_vec_kernel serves these rows: the group's log2 size, or -1.
int prep_vec_group(const PrepParams& p) {
  if (p.gate != GateKind::kNone || p.raw_o || p.dout_copy || !p.row_stat)
    return -1;
  if (p.out_dtype != p.do_dtype || (p.out_dtype != DType::kBF16 && p.out_dtype != DType::kF16))
    return -1;
  if (p.dv % 8 != 0 || p.dv > 256 || (p.dv / 8 & (p.dv / 8 - 1)) != 0 || p.d % 4 != 0) return -1;
  const auto aligned = [](const void* ptr, int64_t sb, int64_t sh, int64_t sn) {
    return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && sb % 8 == 0 && sh % 8 == 0 && sn % 8 == 0;
  };
  if (!aligned(p.out, p.o_sb, p.o_sh, p.o_sn) || !aligned(p.dout, p.do_sb, p.do_sh, p.do_sn))
    return -1;
  int lg = 0;
  while ((8 << lg) < p.dv) ++lg;
  return lg;
}

// dq in its dtype from the fp32 sums: kConvertRows rows a block of 256 threads (blockIdx = (rows
// / kConvertRows, head, batch)); 16-bit dq with rows of 8-byte aligned quads (vec4) a quad a
// thread (a float4 in, 8 bytes out) over the block's rows, else an element a thread.
__global__ void convert_dq_kernel(const float* acc, int64_t a_sb, int64_t a_sh, int64_t a_sn,
                                  void* dq, DType t, int64_t sb, int64_t sh, int64_t sn, int d,
                                  int nq, const int32_t* cu_q, int64_t rows, bool vec4) {
  const int h = blockIdx.y, b = blockIdx.z;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kConvertRows;
  int64_t q_start = 0;
  if (cu_q) {
    q_start = cu_q[b];
    nq = cu_q[b + 1] - cu_q[b];
  }
  const int n = static_cast<int>(min(min(rows, static_cast<int64_t>(nq)) - i0,
                                     static_cast<int64_t>(kConvertRows)));
  if (n <= 0) return;
  const float* src = acc + b * a_sb + h * a_sh + (q_start + i0) * a_sn;
  const int es = t == DType::kF32 ? 4 : 2;
  char* dst = static_cast<char*>(dq) + (b * sb + h * sh + (q_start + i0) * sn) * es;
  convert_dq_rows<256>(dst, t, sn, vec4, n, d, threadIdx.x, global_dq_rows(src, a_sn));
}

// out[x * s] = sums[x] for x < n (dsinks, dslopes, dbeta).
__global__ void store_sums_kernel(const double* sums, int n, void* out, DType t, int64_t s) {
  for (int x = threadIdx.x; x < n; x += blockDim.x) store_grad(out, t, x * s, sums[x]);
}

// dtable[h][x] from the kernel's [hq][kMaxBwdBuckets] sums.
__global__ void store_table_kernel(const float* sums, int hq, int buckets, void* out, DType t,
                                   int64_t s0, int64_t s1) {
  for (int x = threadIdx.x; x < hq * buckets; x += blockDim.x) {
    const int h = x / buckets, k = x % buckets;
    store_grad(out, t, h * s0 + k * s1, sums[h * kMaxBwdBuckets + k]);
  }
}

// The forget gate: d log f_m = sum_{n >= m} dc_n (c is the prefix sum of log f over keys), one
// thread per (b, h) in float64.
__global__ void forget_suffix_kernel(const float* dc, int64_t dc_stride, int batch, int hq,
                                     int nk, const int32_t* cu_k, void* out, DType t, int64_t sb,
                                     int64_t sh, int64_t sn) {
  const int x = blockIdx.x * blockDim.x + threadIdx.x;
  if (x >= batch * hq) return;
  const int b = x / hq, h = x % hq;
  const int n = cu_k ? cu_k[b + 1] - cu_k[b] : nk;
  const float* row = dc + static_cast<int64_t>(x) * dc_stride;
  double acc = 0;
  for (int m = n - 1; m >= 0; --m) {
    acc += row[m];
    store_grad(out, t, b * sb + h * sh + m * sn, acc);
  }
}

// The normalized kernel's length scale of each query row (log of its allowed keys, 0 below two:
// normalizers.h) in the stat rows' layout, one warp a row (blockIdx = (row / 8, head, batch)).
__global__ void row_length_scale_kernel(const __grid_constant__ FwdParams p, float* out,
                                        int64_t stat_stride) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * 8 + warp;
  const int h = blockIdx.y, b = blockIdx.z;
  if (i >= stat_stride) return;
  const SeqExtent seq = seq_extent(p, b);
  int cnt = 0;
  if (i < seq.nq) {
    MaskState ms;
    resolve_mask(p, b, h, seq.offset, ms);
    for (int64_t j = lane; j < seq.nk; j += 32) cnt += mask_allowed(ms.mask, p.num_nodes, i, j);
  }
#pragma unroll
  for (int x = 16; x > 0; x /= 2) cnt += __shfl_xor_sync(0xffffffff, cnt, x);
  if (lane == 0)
    out[(static_cast<int64_t>(b) * p.hq + h) * stat_stride + i] = length_scale<float>(cnt);
}

// fill_4d over a view of up to 4 dims, right-aligned (the view's own data and dtype unless
// given): the gradients added in place are zeroed first, a 16-bit dbias summed over broadcast
// dims is converted from its fp32 scratch, and gradients no pair reaches are zeroed.
cudaError_t fill_view(const TensorView& v, const float* src, cudaStream_t stream,
                      void* data = nullptr, DType t = DType::kF32, const int64_t* strides = nullptr) {
  const int64_t* s = strides ? strides : v.strides;
  int64_t n[4] = {1, 1, 1, 1}, st[4] = {0, 0, 0, 0};
  for (int i = 0; i < v.ndim; ++i) {
    n[4 - v.ndim + i] = v.shape[i];
    st[4 - v.ndim + i] = s[i];
  }
  return fill_4d(data ? data : v.data, data ? t : v.dtype, src, n, st, stream);
}

// No query row or no key anywhere (packed sequences all empty on one side; cu_seqlens need
// only be non-decreasing): no pair exists, so every gradient asked for is zero. (The kernels'
// grids would be empty, which CUDA refuses to launch.)
Status zero_grads(const core::Problem& p, const AttentionGrads& grads) {
  DeviceScope device(p.device_index);
  const cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  cudaError_t e = cudaSuccess;
  for (const TensorView* t :
       {&grads.dq, &grads.dk, &grads.dv, &grads.dbias, &grads.dlow_rank_u, &grads.dlow_rank_w,
        &grads.drelative_table, &grads.dforget_log_f, &grads.dalibi_slopes, &grads.dsinks,
        &grads.dbeta, &grads.drela_gain, &grads.dgate}) {
    if (e == cudaSuccess && t->defined()) e = fill_view(*t, nullptr, stream);
  }
  if (e != cudaSuccess)
    return fail(StatusCode::kInternal, "kernel launch failed: ", cudaGetErrorString(e));
  return {};
}

}  // namespace

Status backward_supports(const core::Problem& p, const core::GradOperands& g,
                         const AttentionGrads& grads, bool deterministic) {
  Status s = check_common(p);
  if (!s.ok()) return s;
  if (!find_instance(p.q.dtype, p.d, p.dv)) {
    std::string built;
    for (const Instance& x : kInstances)
      if (x.fast && x.dtype == p.q.dtype)
        built += (built.empty() ? "" : ", ") + (x.d == x.dv ? str(x.d) : str(x.d) + "/" + str(x.dv));
    return fail(StatusCode::kNotImplemented, "backward with head_dim = ", str(p.d),
                ", head_dim_v = ", str(p.dv), " is not built for ", dtype_name(p.q.dtype),
                " (built: ", built,
                "; CMake options ATTNKIT_HEAD_DIMS and ATTNKIT_BWD_MAX_HEAD_DIM add more)");
  }
  const NormalizerKind n = p.spec->normalizer.kind;
  if ((p.softmax_family() || n == NormalizerKind::kKernel) && !p.row_stat.defined())
    return fail(StatusCode::kInvalidArgument, "row_stat is missing: the backward pass needs the ",
                p.softmax_family() ? "forward's LSE" : "forward's log row sum (normalized kernel)");
  for (const auto& [r, name] : {std::pair{&g.dq, "dq"}, {&g.dk, "dk"}, {&g.dv, "dv"}})
    if (r->dtype == DType::kF64)
      return fail(StatusCode::kNotImplemented, name, ".dtype = ", dtype_name(r->dtype),
                  ": the CUDA backward writes fp32 or 16-bit gradients");
  if (g.grad_out.dtype == DType::kF64)
    return fail(StatusCode::kNotImplemented, "grad_out.dtype = fp64: the CUDA backward reads "
                "grad_out in fp32 or 16 bits");
  if (grads.dbias.defined() && grads.dbias.dtype == DType::kF64)
    return fail(StatusCode::kNotImplemented, "dbias.dtype = fp64: the CUDA backward writes dbias "
                "in fp32 or the bias's 16-bit dtype");
  for (const auto& [t, name] : {std::pair{&grads.drela_gain, "drela_gain"},
                                {&grads.dlow_rank_u, "dlow_rank_u"},
                                {&grads.dlow_rank_w, "dlow_rank_w"}})
    if (t->defined() && t->dtype != DType::kF32)
      return fail(StatusCode::kNotImplemented, name, ".dtype = ", dtype_name(t->dtype),
                  ": the CUDA backward adds ", name, " in place in fp32");
  if (grads.drelative_table.defined() && grads.drelative_table.shape[1] > kMaxBwdBuckets)
    return fail(StatusCode::kNotImplemented, "drelative_table with ",
                str(grads.drelative_table.shape[1]), " buckets: the CUDA backward sums at most ",
                str(kMaxBwdBuckets));
  if (deterministic)
    return fail(StatusCode::kNotImplemented,
                "Options::deterministic: the CUDA backward sums dq's tiles by atomic "
                "reduce-adds, so its low-order bits depend on the order of the additions");
  return {};
}

Status backward(const core::Problem& p, const core::GradOperands& g, const AttentionGrads& grads,
                bool deterministic, bool dry_run) {
  if (Status st = backward_supports(p, g, grads, deterministic); !st.ok()) return st;
  if (p.max_nq == 0 || p.max_nk == 0) return dry_run ? Status{} : zero_grads(p, grads);
  const AttentionSpec& spec = *p.spec;
  const Instance& inst = *find_instance(p.q.dtype, p.d, p.dv);
  DeviceScope device(p.device_index);  // before the tensor maps: the encoder needs a context
  // Query tiles of 64 rows; key tiles of 128 (64 where a head dim is above 128: BwdShape::kSplit).
  constexpr int kM = BwdShape<128, 128, false>::kM;
  const bool split = BwdShape<256, 256, false>::kSplit && (p.d > 128 || p.dv > 128);
  const int kN = split ? BwdShape<256, 256, false>::kN : BwdShape<128, 128, false>::kN;

  BwdParams bp;
  FwdParams& f = bp.f;
  fill_params(p, kM, &f);
  int64_t left = 0, right = 0;
  const bool band = band_of(spec.mask, &left, &right);
  // As in the forward: the fast kernel under a band, or under any mask whose block table gives
  // every partial tile its bits.
  // ALiBi alone (without its slopes' gradient) adds its term in either fast instance: under a
  // band without a table (one FMA a score), else under the block table.
  // A softcap, alone or after either, runs the tabled instance too (the cap's derivative from P).
  // ALiBi's term is added in raw dot-product units (slope / scale): a zero or tiny scale takes
  // the general flavor (kMinFastScale).
  const FastMods fm = fast_mods(spec.mods);
  const bool capped = fm.capped;
  const bool alibi =
      fm.alibi && !grads.dalibi_slopes.defined() && std::fabs(p.scale) >= kMinFastScale;
  // So does a dense 16-bit bias alone (encode_bias), its tiles loaded by TMA, with dbias (if
  // wanted) stored by TMA: 16 bits of q's dtype, without broadcast dims.
  TmaMaps bias_map;
  CUtensorMap dbias_map;
  int dbias_hm = 0, dbias_bm = 0;
  auto dbias_by_tma = [&] {
    const TensorView& t = grads.dbias;
    if (!t.defined()) return true;
    if (t.dtype != p.q.dtype || t.ndim != 4 || t.shape[0] != p.batch || t.shape[1] != p.hq ||
        t.shape[2] != p.max_nq || t.shape[3] != p.max_nk || t.strides[3] != 1)
      return false;
    core::RowOperand r;
    r.data = static_cast<char*>(t.data);
    r.dtype = t.dtype;
    r.sb = p.batch > 1 ? t.strides[0] : 0;
    r.sh = p.hq > 1 ? t.strides[1] : 0;
    r.sn = t.strides[2];
    return encode_rows(&dbias_map, &dbias_hm, &dbias_bm, r, p.max_nk, p.max_nq, p.hq, p.batch, kM);
  };
  const bool bias = fm.bias && !split && !p.varlen && std::fabs(p.scale) >= kMinFastScale &&
                    encode_bias(p, &bias_map, kM) &&
                    dbias_by_tma();
  const bool fast = (!f.has_mods || alibi || bias || fm.cap_only) && p.softmax_family() &&
                    (!capped || p.scale >= kMinFastScale) &&
                    ((band && !bias && !capped) || GeneralTables::covers(p, kM, kN));
  if (fast && capped) set_fast_softcap(&f, spec.mods.softcap, p.scale);
  f.fast_alibi = fast && alibi;
  f.fast_bias = fast && bias;
  f.bias_raw = f.fast_bias ? 1.f / p.scale : 0.f;
  // The band instance needs no block table; every other flavor builds one.
  const bool band_instance = fast && band && !bias && !capped;
  if (!band_instance) {
    const Status fit = GeneralTables::fits(p, kN);
    if (!fit.ok()) return fit;
  }
  bp.dbias_tma = f.fast_bias && grads.dbias.defined();
  bp.stat_stride = static_cast<int64_t>(f.num_q_tiles) * kM;
  bp.num_k_tiles = static_cast<int>((p.max_nk + kN - 1) / kN);
  bp.dk = g.dk.data;
  bp.dv = g.dv.data;
  bp.dk_dtype = g.dk.dtype;
  bp.dv_dtype = g.dv.dtype;
  bp.dk_sb = g.dk.sb, bp.dk_sh = g.dk.sh, bp.dk_sn = g.dk.sn;
  bp.dv_sb = g.dv.sb, bp.dv_sh = g.dv.sh, bp.dv_sn = g.dv.sn;
  const RowExtent extent = row_extent(p);
  const int64_t rows_q = extent.rows_q, batch = extent.batch;
  // The fp32 sums of dq: a scratch [batch][hq][rows_q][stride] whose stride is the shared dQ
  // tile's, with a tile of rows to spare at the end (the last tile's copy covers them), converted
  // into dq by the kernel's last CTA of each group (fused_dq) or by convert_dq_kernel after it.
  const int64_t dq_stride = bwd_dq_stride(static_cast<int>(p.d));
  bp.dq_sn = dq_stride;
  bp.dq_sh = rows_q * dq_stride;
  bp.dq_sb = p.varlen ? 0 : p.hq * bp.dq_sh;

  // dO as the kernels read it: grad_out itself, or a gated / converted copy.
  const bool rela = spec.normalizer.kind == NormalizerKind::kReLA;
  const bool copy = spec.gate_kind != GateKind::kNone || g.grad_out.dtype != p.q.dtype || rela ||
                    !rows_aligned(g.grad_out, 8);
  core::RowOperand dout = g.grad_out;
  const int64_t copy_sn = (p.dv + 7) / 8 * 8;
  if (copy) {
    dout.dtype = p.q.dtype;
    dout.sn = copy_sn;
    dout.sh = rows_q * copy_sn;
    dout.sb = p.varlen ? 0 : p.hq * dout.sh;
  }

  // The tensor maps first: an operand the copy engine cannot address fails the call before any
  // output is written. (The dO copy's address is set below, once its scratch exists.)
  BwdMaps maps;
  const char* bad = encode_maps(p, &maps.qkv, kM, kN);
  core::RowOperand dout_probe = dout;
  if (copy) dout_probe.data = reinterpret_cast<char*>(uintptr_t{1} << 20);  // any aligned address
  if (!bad && !encode_rows(&maps.dout, &maps.o_hm, &maps.o_bm, dout_probe, p.dv,
                           std::max<int64_t>(rows_q, 1), p.hq, batch, kM))
    bad = "grad_out";
  if (bad)
    return fail(StatusCode::kInvalidArgument, bad, ": the copy engine (TMA) cannot address it ",
                "(strides must be multiples of 16 bytes below 2^40 bytes, rows below 2^31)");
  // can_run_backward: every rule checked, nothing launched.
  if (Status st = tensor_maps_ready(dry_run); !st.ok() || dry_run) return st;
  const cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  // Packed rows past the last sequence (cu_seqlens may end before the tensors do) are in no
  // sequence: their gradients are zero, which the kernels (the sequences' rows only) leave
  // unwritten (core::padding_tails: the rows every backend zeroes).
  for (const core::PaddingTail& t : core::padding_tails(p, grads)) {
    const TensorView& grad = *t.grad;
    if (grad.shape[t.dim] <= t.from) continue;
    TensorView tail = grad;  // its rows from t.from on
    tail.data =
        static_cast<char*>(grad.data) + t.from * grad.strides[t.dim] * dtype_size(grad.dtype);
    tail.shape[t.dim] -= t.from;
    const cudaError_t e = fill_view(tail, nullptr, stream);
    if (e != cudaSuccess)
      return fail(StatusCode::kInternal, "kernel launch failed: ", cudaGetErrorString(e));
  }
  // dK and dV by the copy engine where they are 16-bit rows of q's dtype it can address, up to
  // head dim 128, not packed (ATTNKIT_CUDA_TMA_DKDV=0: the threads' stores, for measurements).
  bp.tma_dkdv = env_switch("ATTNKIT_CUDA_TMA_DKDV", true) && !p.varlen && p.d <= 128 &&
                p.dv <= 128 && g.dk.dtype == p.q.dtype && g.dv.dtype == p.q.dtype && p.max_nk > 0 &&
                encode_rows(&maps.dk, &maps.dk_hm, &maps.dk_bm, g.dk, p.d, p.max_nk, p.hk, batch,
                            64) &&
                encode_rows(&maps.dv, &maps.dv_hm, &maps.dv_bm, g.dv, p.dv, p.max_nk, p.hk, batch,
                            64);
  // The tabled instance's walk narrowed to each column's non-empty query tiles (run 104, H100:
  // document-causal's backward kernel 1477 -> 1178 us, -20%; causal tabled 3042 -> 2848, within
  // the run's noise; gpu.md part 27; ATTNKIT_CUDA_BWD_COL_RANGE=0 walks every tile).
  bp.col_range = env_switch("ATTNKIT_CUDA_BWD_COL_RANGE", true);
  if (f.fast_bias) {
    maps.qkv.bias = bias_map.bias;
    maps.qkv.bias_hm = bias_map.bias_hm;
    maps.qkv.bias_bm = bias_map.bias_bm;
    maps.dbias = dbias_map;
    maps.dbias_hm = dbias_hm;
    maps.dbias_bm = dbias_bm;
  }
  // Scratch: lse2 and D per padded row, the dsinks sums, the dO copy, dq's sums.
  const int64_t stat_floats = p.batch * p.hq * bp.stat_stride;
  const int64_t copy_bytes = copy ? (batch * p.hq * rows_q * copy_sn * 2 + 255) / 256 * 256 : 0;
  // lse2 and D per row; the normalized kernel's length scale too where it has one.
  const bool lscaled =
      spec.normalizer.kind == NormalizerKind::kKernel && spec.normalizer.length_scale;
  const int64_t stat_bytes = ((lscaled ? 3 : 2) * stat_floats * 4 + 255) / 256 * 256;
  const int64_t sink_bytes = grads.dsinks.defined() ? (p.hq * 8 + 255) / 256 * 256 : 0;
  const int64_t dq_bytes = (batch * p.hq * rows_q + kM) * dq_stride * 4;
  // dq converted by the kernel where a group's rows are few (its last CTA converts them while
  // the others compute); ATTNKIT_CUDA_FUSED_DQ=ROWS sets the bound on a group's rows (0: off;
  // for measurements).
  const char* fd = std::getenv("ATTNKIT_CUDA_FUSED_DQ");
  const int64_t fused_rows = fd && *fd ? std::strtoll(fd, nullptr, 10) : kFusedDqRows;
  bp.fused_dq = fused_rows > 0 && p.max_nq * p.group <= fused_rows;
  const int64_t done_bytes = bp.fused_dq ? (p.batch * p.hk * 4 + 255) / 256 * 256 : 0;
  void* scratch = nullptr;
  cudaError_t e = cudaMallocAsync(
      &scratch, copy_bytes + stat_bytes + sink_bytes + done_bytes + dq_bytes, stream);
  if (e != cudaSuccess)
    return fail(StatusCode::kInternal, "scratch allocation failed: ", cudaGetErrorString(e));
  char* base = static_cast<char*>(scratch);
  if (copy) {
    dout.data = base;
    if (!encode_rows(&maps.dout, &maps.o_hm, &maps.o_bm, dout, p.dv, std::max<int64_t>(rows_q, 1),
                     p.hq, batch, kM))
      e = cudaErrorInvalidValue;  // the same map as probed above, at the scratch's address
  }
  bp.lse2 = reinterpret_cast<float*>(base + copy_bytes);
  bp.dd = bp.lse2 + stat_floats;
  float* lscale = lscaled ? reinterpret_cast<float*>(base + copy_bytes) + 2 * stat_floats : nullptr;
  bp.lscale = lscale;
  double* dsinks = grads.dsinks.defined()
                       ? reinterpret_cast<double*>(base + copy_bytes + stat_bytes)
                       : nullptr;
  if (e == cudaSuccess && dsinks) e = cudaMemsetAsync(dsinks, 0, sink_bytes, stream);
  if (bp.fused_dq)
    bp.group_done = reinterpret_cast<int*>(base + copy_bytes + stat_bytes + sink_bytes);
  bp.dq = reinterpret_cast<float*>(base + copy_bytes + stat_bytes + sink_bytes + done_bytes);
  const core::RowOperand& dqv = g.dq;
  bp.dq_out = dqv.data;
  bp.dq_out_dtype = dqv.dtype;
  bp.dqo_sb = dqv.sb, bp.dqo_sh = dqv.sh, bp.dqo_sn = dqv.sn;
  bp.dq_vec4 = (dqv.dtype == DType::kBF16 || dqv.dtype == DType::kF16) && f.d % 4 == 0 &&
               reinterpret_cast<uintptr_t>(dqv.data) % 8 == 0 && dqv.sb % 4 == 0 &&
               dqv.sh % 4 == 0 && dqv.sn % 4 == 0;

  PrepParams pp;
  pp.dout = g.grad_out.data;
  pp.do_dtype = g.grad_out.dtype;
  pp.do_sb = g.grad_out.sb, pp.do_sh = g.grad_out.sh, pp.do_sn = g.grad_out.sn;
  pp.out = p.out.data;
  pp.out_dtype = p.out.dtype;
  pp.o_sb = p.out.sb, pp.o_sh = p.out.sh, pp.o_sn = p.out.sn;
  if (p.softmax_family() || spec.normalizer.kind == NormalizerKind::kKernel) {
    pp.row_stat = p.row_stat.data;
    pp.st_sb = p.row_stat.sb, pp.st_sh = p.row_stat.sh, pp.st_sn = p.row_stat.sn;
  }
  pp.gate = spec.gate_kind;
  pp.gate_ptr = p.gate.data;
  pp.gate_dtype = p.gate.dtype;
  pp.g_sb = p.gate.sb, pp.g_sh = p.gate.sh, pp.g_sn = p.gate.sn;
  if (g.dgate.defined()) {
    pp.dgate = g.dgate.data;
    pp.dgate_dtype = g.dgate.dtype;
    pp.dg_sb = g.dgate.sb, pp.dg_sh = g.dgate.sh, pp.dg_sn = g.dgate.sn;
  }
  if (copy) {
    pp.dout_copy = dout.data;
    pp.copy_bf16 = p.q.dtype == DType::kBF16;
    pp.c_sb = dout.sb, pp.c_sh = dout.sh, pp.c_sn = dout.sn;
  }
  pp.dq = bp.dq;
  pp.dq_sb = bp.dq_sb, pp.dq_sh = bp.dq_sh, pp.dq_sn = bp.dq_sn;
  pp.group_done = bp.group_done;
  pp.group = static_cast<int>(p.group);
  pp.lse2 = const_cast<float*>(bp.lse2);
  pp.dd = const_cast<float*>(bp.dd);
  pp.stat_stride = bp.stat_stride;
  pp.sinks = f.sinks;
  pp.sinks_s = f.sinks_s;
  pp.dsinks = dsinks;
  pp.hq = f.hq, pp.d = f.d, pp.dv = f.dv, pp.nq = f.nq, pp.nk = f.nk;
  pp.cu_q = f.cu_q, pp.cu_k = f.cu_k;
  // ReLA: O1 recomputed by the forward pass (fp32, before the RMS, gain and gate), and
  // drela_gain zeroed for the preparation's atomics.
  void* raw = nullptr;
  if (e == cudaSuccess && rela) {
    core::Problem fp = p;
    fp.out.dtype = DType::kF32;
    fp.out.sn = p.dv;
    fp.out.sh = rows_q * p.dv;
    fp.out.sb = p.varlen ? 0 : p.hq * fp.out.sh;
    fp.row_stat = {};
    fp.raw_output = true;
    e = cudaMallocAsync(&raw, batch * p.hq * rows_q * p.dv * 4, stream);
    if (e == cudaSuccess) {
      fp.out.data = static_cast<char*>(raw);
      const Status st = forward(fp);
      if (!st.ok()) {
        (void)cudaFreeAsync(raw, stream);
        (void)cudaFreeAsync(scratch, stream);
        return st;
      }
    }
    pp.raw_o = reinterpret_cast<const float*>(raw);
    pp.r_sb = fp.out.sb, pp.r_sh = fp.out.sh, pp.r_sn = fp.out.sn;
    pp.gain = f.gain;
    pp.gain_s = f.gain_s;
    pp.eps = f.rela_eps;
    const TensorView& dg = grads.drela_gain;
    if (e == cudaSuccess && dg.defined()) {
      pp.dgain = static_cast<float*>(dg.data);
      pp.dgain_s = dg.strides[0];
      e = fill_view(dg, nullptr, stream);
    }
  }
  // The scratch zeroed whole by the driver's memset (its spare rows and padding columns too),
  // the preparation only reading O and dO: the two took 98 us where the preparation's stores
  // took 110 (d 64: 100 against 130; run 149, gpu.md part 36). ATTNKIT_CUDA_BWD_MEMSET=0 leaves
  // the zeros to the preparation.
  if (e == cudaSuccess && env_switch("ATTNKIT_CUDA_BWD_MEMSET", true)) {
    e = cudaMemsetAsync(bp.dq, 0, dq_bytes, stream);
    pp.dq = nullptr;
  }
  if (e == cudaSuccess) {
    const dim3 grid(static_cast<unsigned>((bp.stat_stride + 7) / 8), static_cast<unsigned>(p.hq),
                    static_cast<unsigned>(p.batch));
    const int lg = prep_vec_group(pp);
    if (lg < 0) {
      bwd_prep_kernel<<<grid, 256, 0, stream>>>(pp);
    } else {
      const dim3 vgrid(static_cast<unsigned>((bp.stat_stride + (256 >> lg) - 1) / (256 >> lg)),
                       grid.y, grid.z);
      if (pp.out_dtype == DType::kBF16)
        bwd_prep_vec_kernel<__nv_bfloat16><<<vgrid, 256, 0, stream>>>(pp, lg);
      else
        bwd_prep_vec_kernel<__half><<<vgrid, 256, 0, stream>>>(pp, lg);
    }
    e = cudaGetLastError();
  }
  if (e == cudaSuccess && lscale) {
    const dim3 grid(static_cast<unsigned>((bp.stat_stride + 7) / 8), static_cast<unsigned>(p.hq),
                    static_cast<unsigned>(p.batch));
    row_length_scale_kernel<<<grid, 256, 0, stream>>>(f, lscale, bp.stat_stride);
    e = cudaGetLastError();
  }
  if (e == cudaSuccess && dsinks) {
    const TensorView& t = grads.dsinks;
    store_sums_kernel<<<1, 256, 0, stream>>>(dsinks, static_cast<int>(p.hq), t.data, t.dtype,
                                               t.strides[0]);
    e = cudaGetLastError();
  }

  // The score mods' gradients. dbias without broadcast dims: stored per pair in its dtype
  // (zeroed first only where pairs go unvisited: a mask, or packed sequences shorter than its
  // extents); with broadcast dims: added in place in fp32 (a 16-bit dbias through an fp32
  // scratch). The other sums in a zeroed scratch, stored after the kernel.
  const TensorView& gb = grads.dbias;
  float* dbias_scratch = nullptr;
  if (e == cudaSuccess && gb.defined()) {
    const bool broadcast = (gb.shape[0] == 1 && p.batch > 1) || (gb.shape[1] == 1 && p.hq > 1);
    const bool dense = spec.mask.nodes.size() == 1 && spec.mask.nodes[0].kind == MaskKind::kNone;
    bp.dbias_direct = !broadcast;
    bp.dbias_dtype = broadcast ? DType::kF32 : gb.dtype;
    bp.dbias = gb.data;
    int64_t st[4] = {gb.strides[0], gb.strides[1], gb.strides[2], gb.strides[3]};
    if (broadcast && gb.dtype != DType::kF32) {
      e = cudaMallocAsync(reinterpret_cast<void**>(&dbias_scratch),
                          gb.shape[0] * gb.shape[1] * gb.shape[2] * gb.shape[3] * 4, stream);
      bp.dbias = dbias_scratch;
      st[3] = 1, st[2] = gb.shape[3], st[1] = st[2] * gb.shape[2], st[0] = st[1] * gb.shape[1];
    }
    bp.db_sb = gb.shape[0] > 1 ? st[0] : 0;
    bp.db_sh = gb.shape[1] > 1 ? st[1] : 0;
    bp.db_si = st[2];
    bp.db_sj = st[3];
    if (e == cudaSuccess && (broadcast || !dense || p.varlen))
      e = fill_view(gb, nullptr, stream, bp.dbias, bp.dbias_dtype, st);
  }
  for (const auto& [t, ptr] : {std::pair{&grads.dlow_rank_u, &bp.du}, {&grads.dlow_rank_w, &bp.dw}}) {
    if (e != cudaSuccess || !t->defined()) continue;
    *ptr = static_cast<float*>(t->data);
    e = fill_view(*t, nullptr, stream);
  }
  if (bp.du) {
    const TensorView& u = grads.dlow_rank_u;
    bp.du_sb = u.strides[0], bp.du_sh = u.strides[1], bp.du_sn = u.strides[2];
    bp.du_sr = u.strides[3];
  }
  if (bp.dw) {
    const TensorView& w = grads.dlow_rank_w;
    bp.dw_sb = w.strides[0], bp.dw_sh = w.strides[1], bp.dw_sn = w.strides[2];
    bp.dw_sr = w.strides[3];
  }
  const bool slopes = grads.dalibi_slopes.defined(), table = grads.drelative_table.defined();
  const bool beta = grads.dbeta.defined(), forget = grads.dforget_log_f.defined();
  const int64_t ex_slopes = slopes ? p.hq : 0, ex_beta = beta ? 1 : 0;
  const int64_t ex_table = table ? p.hq * kMaxBwdBuckets : 0, ex_dc = forget ? p.batch * p.hq * p.max_nk : 0;
  const int64_t ex_bytes = (ex_slopes + ex_beta) * 8 + (ex_table + ex_dc) * 4;
  void* ex = nullptr;
  if (e == cudaSuccess && ex_bytes > 0) {
    e = cudaMallocAsync(&ex, ex_bytes, stream);
    if (e == cudaSuccess) e = cudaMemsetAsync(ex, 0, ex_bytes, stream);
    double* d = static_cast<double*>(ex);
    if (slopes) bp.dslopes = d;
    if (beta) bp.dbeta = d + ex_slopes;
    float* fl = reinterpret_cast<float*>(d + ex_slopes + ex_beta);
    if (table) {
      bp.dtable = fl;
      bp.table_buckets = static_cast<int>(grads.drelative_table.shape[1]);
    }
    if (forget) {
      bp.dc = fl + ex_table;
      bp.dc_stride = p.max_nk;
    }
  }

  bp.extras = bp.dbias || bp.dslopes || bp.dtable || bp.dc || bp.du || bp.dw;
  if (e == cudaSuccess) {
    if (band_instance) {
      e = inst.fast(bp, maps, stream);
    } else {
      GeneralTables tables;
      e = tables.build(p, kM, kN, fast ? kMaxBitSlots : kGeneralBitSlots, stream, &f);
      if (e == cudaSuccess) e = fast ? inst.tabled(bp, maps, stream) : inst.general(bp, maps, stream);
      const cudaError_t e2 = tables.release(stream);
      if (e == cudaSuccess) e = e2;
    }
  }
  if (e == cudaSuccess && !bp.fused_dq) {
    const dim3 grid(static_cast<unsigned>((bp.stat_stride + kConvertRows - 1) / kConvertRows),
                    static_cast<unsigned>(p.hq), static_cast<unsigned>(p.batch));
    convert_dq_kernel<<<grid, 256, 0, stream>>>(bp.dq, bp.dq_sb, bp.dq_sh, bp.dq_sn, dqv.data,
                                                dqv.dtype, dqv.sb, dqv.sh, dqv.sn, f.d, f.nq,
                                                f.cu_q, bp.stat_stride, bp.dq_vec4);
    e = cudaGetLastError();
  }
  if (dbias_scratch) {
    if (e == cudaSuccess) e = fill_view(gb, dbias_scratch, stream);
    const cudaError_t e2 = cudaFreeAsync(dbias_scratch, stream);
    if (e == cudaSuccess) e = e2;
  }
  if (e == cudaSuccess && slopes) {
    const TensorView& t = grads.dalibi_slopes;
    store_sums_kernel<<<1, 256, 0, stream>>>(bp.dslopes, static_cast<int>(p.hq), t.data, t.dtype,
                                             t.strides[0]);
    e = cudaGetLastError();
  }
  if (e == cudaSuccess && beta) {
    store_sums_kernel<<<1, 32, 0, stream>>>(bp.dbeta, 1, grads.dbeta.data, grads.dbeta.dtype, 1);
    e = cudaGetLastError();
  }
  if (e == cudaSuccess && table) {
    const TensorView& t = grads.drelative_table;
    store_table_kernel<<<1, 256, 0, stream>>>(bp.dtable, static_cast<int>(p.hq),
                                              static_cast<int>(t.shape[1]), t.data, t.dtype,
                                              t.strides[0], t.strides[1]);
    e = cudaGetLastError();
  }
  if (e == cudaSuccess && forget) {
    const TensorView& t = grads.dforget_log_f;
    const int n = static_cast<int>(p.batch * p.hq);
    forget_suffix_kernel<<<(n + 127) / 128, 128, 0, stream>>>(
        bp.dc, bp.dc_stride, static_cast<int>(p.batch), static_cast<int>(p.hq), f.nk, f.cu_k,
        t.data, t.dtype, t.strides[0], t.strides[1], t.strides[2]);
    e = cudaGetLastError();
  }
  if (ex) {
    const cudaError_t e4 = cudaFreeAsync(ex, stream);
    if (e == cudaSuccess) e = e4;
  }
  if (raw) {
    const cudaError_t e5 = cudaFreeAsync(raw, stream);
    if (e == cudaSuccess) e = e5;
  }
  const cudaError_t e3 = cudaFreeAsync(scratch, stream);
  if (e == cudaSuccess) e = e3;
  if (e != cudaSuccess)
    return fail(StatusCode::kInternal, "kernel launch failed: ", cudaGetErrorString(e));
  return {};
}

}  // namespace attnkit::cuda
