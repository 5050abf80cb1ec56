// What the two CUDA forward kernels share: tile shapes, the per-row online normalization step on
// wgmma accumulator fragments, sequence extents, and the epilogue that normalizes and stores O.
//
// Fragments: a warpgroup's m64nNk16 accumulator gives thread (warp w, lane l) rows
// w * 16 + l / 4 and that + 8 (index r = 0, 1), and in each 8-column chunk c the columns
// c * 8 + 2 * (l % 4) + {0, 1}: register c * 4 + 2 * r + e.
#pragma once
#include <cuda.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cmath>
#include <type_traits>

#include "attnkit/variant/normalizers.h"
#include "attnkit/variant/score_mods.h"
#include "cuda/fwd_params.h"
#include "cuda/sm90_ops.cuh"
#include "cuda/tile_bits.h"

namespace attnkit::cuda {

// Tensor maps of q, k, v as 4-D tensors (column, row, head, batch) of 64-column boxes with the
// 128-byte swizzle; rows of a varlen batch are the packed rows (batch extent 1). A broadcast
// head or batch dimension (stride 0) has extent 1 and its coordinate multiplier 0.
// The fast forward's bias (FwdParams::fast_bias) is a fourth such map: (key, query, head, batch)
// in boxes of 64 keys x 128 queries.
struct TmaMaps {
  CUtensorMap q, k, v, bias, o;  // o: FwdParams::tma_out
  int q_hm = 1, q_bm = 1, k_hm = 1, k_bm = 1, v_hm = 1, v_bm = 1, bias_hm = 0, bias_bm = 0;
  int o_hm = 1, o_bm = 1;
};

// Tiles of a (D, DV) instantiation: kRows query rows (a consumer warpgroup's 64 each: 128 or,
// FwdParams::rows192, 192) by kN keys (kKeys, or by default 128 where both head dims are at most
// 128, else 64; 176: FwdParams::keys176).
template <int kD, int kDV, int kRows = 128, int kKeys = 0>
struct FwdTiles {
  static constexpr int kM = kRows;
  static constexpr int kDp = (kD + 63) / 64 * 64;  // head dims padded to whole 64-column panels
  static constexpr int kDVp = (kDV + 63) / 64 * 64;
  static constexpr int kN = kKeys ? kKeys : (kDp <= 128 && kDVp <= 128) ? 128 : 64;
  static_assert(kN % 16 == 0 && kN * 128 % 1024 == 0, "whole k-steps and swizzle atoms");
  static constexpr int kQBytes = kM * kDp * 2;
  static constexpr int kKBytes = kN * kDp * 2;
  static constexpr int kVBytes = kN * kDVp * 2;
};

// 2^x on the special-function unit (2^-inf = 0); exp2f adds range handling the softmax does not
// need.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// tanh on the special-function unit (relative error ~2^-11, below the 16-bit rounding of P);
// the softcap takes it, as FlashAttention-3 and FlexAttention do.
__device__ __forceinline__ float fast_tanh(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// The fast kernels' softcap on a thread's scores, in the raw dot products' units:
// x = cap tanh(x * inv), cap = FwdParams::cap_raw, inv = inv_cap_raw.
template <int kRegs>
__device__ __forceinline__ void softcap_raw(float (&s)[kRegs], float cap, float inv) {
#pragma unroll
  for (int x = 0; x < kRegs; ++x) s[x] = cap * fast_tanh(s[x] * inv);
}

// normalizers.h's weights in float on the special-function unit, without calls: a call (or a
// division's slow path) in the consumer loop makes ptxas spill the accumulators around it. Same
// definitions; float accuracy (2-3 ulp) where the shared policies use the libm functions.
// sigmoid(x) and sigmoid(-x) = 1 - sigmoid(x) from one exponential: the second without the
// cancellation of 1 - sigmoid(x) (0 in fp32 past x ~ 17); sigmoid'(x) = *s * *sc.
__device__ __forceinline__ void fast_sigmoid_pair(float x, float* s, float* sc) {
  const float e = __expf(-fabsf(x));
  const float r = __fdividef(1.f, 1.f + e);
  *s = x >= 0.f ? r : e * r;
  *sc = x >= 0.f ? e * r : r;
}
__device__ __forceinline__ float fast_sigmoid(float x) {
  float s, sc;
  fast_sigmoid_pair(x, &s, &sc);  // (sc unused: the compiler drops it)
  return s;
}
// The sigmoid normalizer's weights go into the P V product times 2^15 (O, dV taken back by
// 2^-15 when stored; exact in both directions): sigmoid(s + beta) is not scaled by a row max as
// the softmax's are, and fp16's normals end at 6.1e-5, so beta = -log n puts a long row's
// weights (~1/n) among fp16's subnormals and a beta of -18 below them (fuzz seed 33577: the
// output's error 0.26). Scaled, weights from 1.9e-9 to 1 keep fp16's 11 bits (1 -> 32768, below
// its largest 65504); bf16 loses nothing either way.
inline constexpr float kSigmoidWeightScale = 32768.f;
// The normalized kernel's log weight p log f(s) (normalizers.h's log_kernel_feature; -inf where
// f(s) = 0), and d log f / ds.
__device__ __forceinline__ float fast_kernel_log_weight(float s, KernelFeature f, float power) {
  if (f == KernelFeature::kSoftplus) {
    const float e = __expf(-fabsf(s));
    return power * (s < -16.f ? s - 0.5f * e : __logf(fmaxf(s, 0.f) + log1pf(e)));
  }
  return s > 0.f ? power * __logf(s) : -INFINITY;
}
__device__ __forceinline__ float fast_dlog_kernel_feature(float s, KernelFeature f) {
  if (f == KernelFeature::kSoftplus) {
    const float e = __expf(-fabsf(s));
    return s < -16.f ? 1.f - 0.5f * e
                     : __fdividef(s >= 0.f ? 1.f : e, (1.f + e) * (fmaxf(s, 0.f) + log1pf(e)));
  }
  return s > 0.f ? __fdividef(1.f, s) : 0.f;
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffff, x, 1);
  return x + __shfl_xor_sync(0xffffffff, x, 2);
}
// A 4 x 4 transpose of 32-bit words within a quad: word j of lane q (= lane % 4) becomes word q
// of lane j. Two rounds (lanes q ^ 1, then q ^ 2), each sending the two words whose index
// differs from q in that round's bit; every lane takes part (no branch).
__device__ __forceinline__ void quad_transpose(uint32_t (&w)[4], int q) {
  const bool odd = q & 1, hi = q & 2;
#pragma unroll
  for (int j = 0; j < 4; j += 2) {
    const uint32_t got = __shfl_xor_sync(0xffffffff, odd ? w[j] : w[j + 1], 1);
    w[j] = odd ? got : w[j];
    w[j + 1] = odd ? w[j + 1] : got;
  }
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const uint32_t got = __shfl_xor_sync(0xffffffff, hi ? w[j] : w[j + 2], 2);
    w[j] = hi ? got : w[j];
    w[j + 2] = hi ? w[j + 2] : got;
  }
}

// One row (r of the thread's two) of an online normalization: its running max m moves to
// m_new = max(m, the row's scores); each score x becomes weight(x, m_new); the row sum l is
// rescaled by rescale(m, m_new) and that factor is returned for the row of O (scale_row).
template <int kN, class Weight, class Rescale>
__device__ __forceinline__ float online_row(float (&s)[kN / 2], int r, float lowest, float& m,
                                            float& l, Weight weight, Rescale rescale) {
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
  return alpha;
}
template <int kDVp>
__device__ __forceinline__ void scale_row(float (&o)[kDVp / 2], int r, float alpha) {
#pragma unroll
  for (int c = 0; c < kDVp / 8; ++c) {
    o[c * 4 + 2 * r] *= alpha;
    o[c * 4 + 2 * r + 1] *= alpha;
  }
}

// The softmax step of one row with the scale folded into the exponent: scores are raw dot
// products (to2 = scale * log2 e) or already scaled (to2 = log2 e). kSaturate (the general
// flavor and the fast bias instance, whose scores take an additive term of any size): a row max
// below -FLT_MAX / to2 (a bias near fp32's or bf16's lowest value) would make -max * to2 +inf
// and the weights NaN; saturated at FLT_MAX, such a row's weights are 0: it counts as masked
// (DESIGN.md, numerics).
template <int kN, bool kSaturate = false>
__device__ __forceinline__ float softmax_row(float (&s)[kN / 2], int r, float to2, float& m,
                                             float& l) {
  return online_row<kN>(
      s, r, -INFINITY, m, l,
      [&](float x, float m_new) {
        const float m_use = m_new == -INFINITY ? 0.f : m_new;
        const float c = kSaturate ? fminf(-m_use * to2, FLT_MAX) : -m_use * to2;
        return fast_exp2(fmaf(x, to2, c));
      },
      [&](float m_old, float m_new) {
        return fast_exp2((m_old - (m_new == -INFINITY ? 0.f : m_new)) * to2);
      });
}

// P as the A operand of O += P V: 16-bit pairs of the accumulator fragment, 16 keys per k-step.
template <class T, int kN>
__device__ __forceinline__ void pack_p(const float (&s)[kN / 2], uint32_t (&a)[kN / 16][4]) {
#pragma unroll
  for (int kk = 0; kk < kN / 16; ++kk)
#pragma unroll
    for (int x = 0; x < 4; ++x) a[kk][x] = ElemTraits<T>::pack(s[8 * kk + 2 * x], s[8 * kk + 2 * x + 1]);
}

// A band's bound relative to a tile's first column, clamped to [-1, n] (32 bits: a score's test
// is then two compares of its compile-time column; 64-bit bounds cost ~7 instructions each).
__device__ __forceinline__ int tile_bound(int64_t v, int n) {
  return static_cast<int>(imax(imin(v, n), -1));
}

// The fast kernel's masks are bands: key j is allowed for query i iff j < nk and
// i' - left <= j <= i' + right (i' = i + offset). Masked scores become -inf.
template <int kN>
__device__ __forceinline__ void band_mask(float (&s)[kN / 2], const int (&row_i)[2], int n0,
                                          int col0, int nk, int64_t offset, int64_t left,
                                          int64_t right) {
  // Each row's allowed keys [ia - left, min(ia + right, nk - 1)], relative to the thread's first
  // column n0 + col0 (tile_bound).
  int lo[2], hi[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t ia = row_i[r] + offset, j0 = n0 + col0;
    const int64_t a = ia - left - j0, b = imin(ia + right, nk - 1) - j0;
    lo[r] = tile_bound(a, kN);
    hi[r] = tile_bound(b, kN);
  }
  // A score then costs a bit test and a select.
  constexpr int kBits = kN / 4;
  if constexpr (kBits <= 32) {  // both rows in one word
    const uint64_t allow = band_run_bits<kN>(lo[0], hi[0]) |
                           uint64_t{band_run_bits<kN>(lo[1], hi[1])} << kBits;
#pragma unroll
    for (int c = 0; c < kN / 8; ++c)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (!((allow >> ((e / 2) * kBits + 2 * c + (e & 1))) & 1)) s[c * 4 + e] = -INFINITY;
  } else {  // wider key tiles (FwdParams::keys176): a word a row
    const uint64_t allow[2] = {band_run_bits<kN, uint64_t>(lo[0], hi[0]),
                               band_run_bits<kN, uint64_t>(lo[1], hi[1])};
#pragma unroll
    for (int c = 0; c < kN / 8; ++c)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (!((allow[e / 2] >> (2 * c + (e & 1))) & 1)) s[c * 4 + e] = -INFINITY;
  }
}

// The 2-D neighborhood on grid tiles (tile_bits.h): the thread's queries are (qr, qc) and (qr,
// qc + 8); the key tile is the box at grid row kr, column kc. Masked scores become -inf.
template <int kN>
__device__ __forceinline__ void grid_mask(float (&s)[kN / 2], const FwdParams& p, int qr, int qc,
                                          int kr, int kc, int col0) {
  static_assert(kN == kGridRows * kGridCols);
  // The thread's 64 tests as the bits of two words, one a query column, bit 2 c + (e & 1) for
  // score c * 4 + e (the tabled tiles' layout); a score then costs a bit test and a select.
  uint32_t allow[2];
  grid_words(p.grid, qr, qc, kr, kc, col0, allow);
#pragma unroll
  for (int c = 0; c < kN / 8; ++c)
#pragma unroll
    for (int e = 0; e < 4; ++e)
      if (!((allow[e / 2] >> (2 * c + (e & 1))) & 1u)) s[c * 4 + e] = -INFINITY;
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

// Sequence extents of batch element b.
// The fast kernels' ALiBi slope of query head h in units of the raw dot products (the scale
// folds into the exponent there): the term is -slope_raw (i' - j), or -slope_raw |i' - j|.
__device__ __forceinline__ float alibi_slope_raw(const FwdParams& p, int h) {
  return (p.alibi_slopes ? p.alibi_slopes[h * p.slopes_s]
                         : static_cast<float>(alibi_default_slope(h, p.hq))) /
         p.scale;
}

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

// Epilogue of a thread's two rows: normalize O by the row sum (or RMS for ReLA), write the row
// statistic (LSE for the softmax family and the normalized kernel), apply the output gate,
// store. kGeneral = false knows only the softmax family (m is then the max of raw dot products)
// and no gate. Both rows' factors and statistics come first; the fast flavor's 16-bit rows of
// full width then take every product, then the stores of O: a register a store reads stays busy
// until the store has left (the long scoreboard), so arithmetic after a store that writes such a
// register waits for the stores before it (ncu, run 208: 4% of the d128 forward's samples at N
// 1024 were such waits between one row's stores and the next row's). The other rows multiply
// and store pair by pair.
template <bool kGeneral, int kDVp>
__device__ __forceinline__ void store_rows(const FwdParams& p, NormalizerKind norm, int b, int h,
                                           const SeqExtent& seq, const int (&row_i)[2],
                                           int col0, bool lane_leads, const float (&o)[kDVp / 2],
                                           const float (&m)[2], const float (&l)[2],
                                           float* muls = nullptr) {
  const bool softmax = norm == NormalizerKind::kSoftmax || norm == NormalizerKind::kSoftmaxSink;
  const int64_t out_es = p.out_dtype == DType::kF32 ? 4 : 2;
  float mul[2], gate_h[2];
  bool live[2];
  int64_t row[2];
  char* orow[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = row_i[r];
    const float lsum = quad_sum(l[r]);
    float stat = 0.f;
    mul[r] = 1.f;
    if (softmax || norm == NormalizerKind::kKernel) {  // the kernel: a softmax over p log f(s)
      // (no branch here: the fast flavor stores under the next item's first S, and a branch
      // there serializes its matrix multiplies. A row's sum is 0, or about 1 or more and below
      // 2^126, where __fdividef is within 2 ulp; __logf is within 3 ulp)
      mul[r] = lsum > 0.f ? __fdividef(1.f, lsum) : 0.f;
      const float mnat = kGeneral ? m[r] : m[r] * p.scale;
      stat = lsum > 0.f ? mnat + __logf(lsum) : -INFINITY;
    } else if (norm == NormalizerKind::kSigmoid) {
      mul[r] = 1.f / kSigmoidWeightScale;  // the weights' scale in P V
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
      mul[r] = p.raw_output ? 1.f : 1.f / rms;
      stat = rms;
    }
    // muls: the rows' factors go to the caller, which stores O itself (FwdParams::tma_out).
    if (muls) muls[r] = mul[r];
    live[r] = i >= 0 && i < seq.nq;  // (i < 0: FwdParams::align_end's first tile)
    row[r] = seq.q_start + (live[r] ? i : 0);
    orow[r] = static_cast<char*>(p.out) + (b * p.o_sb + h * p.o_sh + row[r] * p.o_sn) * out_es;
    gate_h[r] = 1.f;
    if (kGeneral && live[r] && p.gate == GateKind::kPerHead)
      gate_h[r] = fast_sigmoid(
          load_any(p.gate_ptr, p.gate_dtype, b * p.g_sb + h * p.g_sh + row[r] * p.g_sn));
    if (p.row_stat && lane_leads && live[r])
      p.row_stat[b * p.st_sb + h * p.st_sh + row[r] * p.st_sn] = stat;
  }
  // The rows' columns: kOut 1 = bf16 or 2 = fp16 with every column of kDVp in the output and
  // rows aligned to 16 bytes (packed, transposed, then stored), or -1 = the dtype and the width
  // read per column pair (the general flavor: one copy of its gate code). The fast flavor's
  // 16-bit rows of full width take the first (those tests cost it three branches and both
  // conversions a pair).
  auto put = [&](auto out) {
    constexpr int kOut = decltype(out)::value;
    if constexpr (kOut > 0) {
      // Lane q of a quad holds column pair q of each 16-byte chunk of its rows; a transpose of
      // each four chunks' words in the quad gives lane q chunk 4 g + q whole, stored in one
      // 16-byte store (FwdParams::out_rows16): a quad writes 64 contiguous bytes of a row a
      // store, against 16 with a word a lane, and a thread 8 stores of d_v = 128, not 32.
      using E = ElemTraits<std::conditional_t<kOut == 1, __nv_bfloat16, __half>>;
      static_assert(kDVp % 32 == 0, "whole groups of four chunks");
      uint32_t v[2][kDVp / 32][4];
#pragma unroll
      for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int c = 0; c < kDVp / 8; ++c)
          v[r][c / 4][c % 4] = E::pack(o[c * 4 + 2 * r] * mul[r], o[c * 4 + 2 * r + 1] * mul[r]);
      const int q = col0 / 2;
#pragma unroll
      for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int g = 0; g < kDVp / 32; ++g) quad_transpose(v[r][g], q);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        uint4* chunk = reinterpret_cast<uint4*>(orow[r]) + q;  // (one address a row)
#pragma unroll
        for (int g = 0; g < kDVp / 32; ++g)
          if (live[r]) chunk[4 * g] = make_uint4(v[r][g][0], v[r][g][1], v[r][g][2], v[r][g][3]);
      }
    } else {
#pragma unroll
      for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int c = 0; c < kDVp / 8; ++c) {
          const int col = c * 8 + col0;
          const bool ok = live[r] && col < p.dv;
          if (kGeneral && !ok) continue;
          float x0 = o[c * 4 + 2 * r] * mul[r], x1 = o[c * 4 + 2 * r + 1] * mul[r];
          if constexpr (kGeneral) {
            if (norm == NormalizerKind::kReLA && !p.raw_output) {
              x0 *= p.gain[col * p.gain_s];
              x1 *= p.gain[(col + 1) * p.gain_s];
            }
            if (p.gate == GateKind::kElementwise) {
              const int64_t g = b * p.g_sb + h * p.g_sh + row[r] * p.g_sn + col;
              x0 *= fast_sigmoid(load_any(p.gate_ptr, p.gate_dtype, g));
              x1 *= fast_sigmoid(load_any(p.gate_ptr, p.gate_dtype, g + 1));
            }
            x0 *= gate_h[r];
            x1 *= gate_h[r];
          }
          if (p.out_dtype == DType::kF32) {
            if (ok) *reinterpret_cast<float2*>(orow[r] + col * 4) = make_float2(x0, x1);
          } else {
            const uint32_t v = p.out_dtype == DType::kBF16
                                   ? ElemTraits<__nv_bfloat16>::pack(x0, x1)
                                   : ElemTraits<__half>::pack(x0, x1);
            if (ok) reinterpret_cast<uint32_t*>(orow[r] + col0 * 2)[c * 4] = v;
          }
        }
    }
  };
  if (!muls) {
    if constexpr (kGeneral) {
      put(std::integral_constant<int, -1>{});
    } else if (p.dv == kDVp && p.out_rows16 && p.out_dtype == DType::kBF16) {
      put(std::integral_constant<int, 1>{});
    } else if (p.dv == kDVp && p.out_rows16 && p.out_dtype == DType::kF16) {
      put(std::integral_constant<int, 2>{});
    } else {
      put(std::integral_constant<int, -1>{});
    }
  }
}

}  // namespace attnkit::cuda
