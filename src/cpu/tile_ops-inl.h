// Per-SIMD-target building blocks of the CPU kernels (included once per Highway target by
// forward.cc and backward.cc): the register-blocked GEMM microkernel over 64-token tiles, the
// element mask of a tile, row reductions.
#if defined(ATTNKIT_CPU_TILE_OPS_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef ATTNKIT_CPU_TILE_OPS_INL_H_
#undef ATTNKIT_CPU_TILE_OPS_INL_H_
#else
#define ATTNKIT_CPU_TILE_OPS_INL_H_
#endif

#include <hwy/contrib/math/math-inl.h>
#include <hwy/highway.h>

#include "attnkit/variant/score_mods.h"
#include "cpu/tile_common.h"

HWY_BEFORE_NAMESPACE();
namespace attnkit::cpu {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;
using DF = hn::ScalableTag<float>;
using VF = hn::Vec<DF>;

// C[rows x ncols] = (alpha * C or 0) + A[rows x kdim] B[kdim x ncols]; ncols a multiple of
// 2 vectors. Register block: R rows x 2 vectors, B rows streamed, A elements broadcast.
// A(r, k) is A[r * lda + k], or A[k * lda + r] with kTransA (A stored transposed).
template <int R, bool kTransA = false>
HWY_INLINE void gemm_rows(const float* HWY_RESTRICT A, size_t lda, const float* HWY_RESTRICT B,
                          size_t ldb, size_t kdim, float* HWY_RESTRICT C, size_t ldc, size_t ncols,
                          const float* alpha, bool load_c) {
  const DF d;
  const size_t N = hn::Lanes(d);
  for (size_t c0 = 0; c0 < ncols; c0 += 2 * N) {
    VF acc0[R], acc1[R];
    for (int r = 0; r < R; ++r) {
      if (load_c) {
        acc0[r] = hn::LoadU(d, C + r * ldc + c0);
        acc1[r] = hn::LoadU(d, C + r * ldc + c0 + N);
        if (alpha) {
          const VF a = hn::Set(d, alpha[r]);
          acc0[r] = hn::Mul(acc0[r], a);
          acc1[r] = hn::Mul(acc1[r], a);
        }
      } else {
        acc0[r] = hn::Zero(d);
        acc1[r] = hn::Zero(d);
      }
    }
    const float* b = B + c0;
    for (size_t k = 0; k < kdim; ++k, b += ldb) {
      const VF b0 = hn::LoadU(d, b), b1 = hn::LoadU(d, b + N);
      for (int r = 0; r < R; ++r) {
        const VF a = hn::Set(d, kTransA ? A[k * lda + r] : A[r * lda + k]);
        acc0[r] = hn::MulAdd(a, b0, acc0[r]);
        acc1[r] = hn::MulAdd(a, b1, acc1[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      hn::StoreU(acc0[r], d, C + r * ldc + c0);
      hn::StoreU(acc1[r], d, C + r * ldc + c0 + N);
    }
  }
}

constexpr int kGemmRows = 6;

template <bool kTransA = false>
HWY_INLINE void gemm(const float* A, size_t lda, const float* B, size_t ldb, size_t kdim, float* C,
                     size_t ldc, size_t rows, size_t ncols, const float* alpha, bool load_c) {
  const size_t row_step = kTransA ? 1 : lda;  // where row r of A starts
  size_t r = 0;
  for (; r + kGemmRows <= rows; r += kGemmRows)
    gemm_rows<kGemmRows, kTransA>(A + r * row_step, lda, B, ldb, kdim, C + r * ldc, ldc, ncols,
                                  alpha ? alpha + r : nullptr, load_c);
  const float* ar = alpha ? alpha + r : nullptr;
  switch (rows - r) {
    case 5:
      gemm_rows<5, kTransA>(A + r * row_step, lda, B, ldb, kdim, C + r * ldc, ldc, ncols, ar,
                            load_c);
      break;
    case 4:
      gemm_rows<4, kTransA>(A + r * row_step, lda, B, ldb, kdim, C + r * ldc, ldc, ncols, ar,
                            load_c);
      break;
    case 3:
      gemm_rows<3, kTransA>(A + r * row_step, lda, B, ldb, kdim, C + r * ldc, ldc, ncols, ar,
                            load_c);
      break;
    case 2:
      gemm_rows<2, kTransA>(A + r * row_step, lda, B, ldb, kdim, C + r * ldc, ldc, ncols, ar,
                            load_c);
      break;
    case 1:
      gemm_rows<1, kTransA>(A + r * row_step, lda, B, ldb, kdim, C + r * ldc, ldc, ncols, ar,
                            load_c);
      break;
    default:
      break;
  }
}

HWY_INLINE size_t vec_pad(int64_t n) {
  const size_t step = 2 * hn::Lanes(DF());
  return (static_cast<size_t>(n) + step - 1) / step * step;
}

// The element mask of a partial tile, and the padding columns of a short key tile: -inf.
HWY_INLINE void apply_bits(float* HWY_RESTRICT srow, uint64_t word) {
  const DF d;
  const size_t N = hn::Lanes(d);
  const VF ninf = hn::Set(d, kNegInf);
  for (size_t c = 0; c < kTile; c += N) {
    uint8_t bytes[8];
    const uint64_t chunk = word >> c;
    std::memcpy(bytes, &chunk, 8);
    const auto keep = hn::LoadMaskBits(d, bytes);
    hn::StoreU(hn::IfThenElse(keep, hn::LoadU(d, srow + c), ninf), d, srow + c);
  }
}

// The additive terms on vectors where the key tile is a run of consecutive keys and the terms
// are an fp32 bias with unit key stride and / or ALiBi (the common cases); false otherwise (the
// caller then takes the scalar loop). Same arithmetic as ScoreModEval::additive.
HWY_INLINE bool vector_additive(float* HWY_RESTRICT sr, const ScoreModEval<float>& m, int64_t i,
                                int64_t ia, const TileTokens& kt) {
  if (kt.tokens || m.u || m.relative != RelativeBucketKind::kOff || m.forget_c) return false;
  if (m.bias && (m.bias_dtype != DType::kF32 || m.bias_sj != 1)) return false;
  const DF d;
  const size_t N = hn::Lanes(d);
  const int64_t j0 = kt.start, count = kt.count;
  const float* brow = m.bias ? static_cast<const float*>(m.bias) + i * m.bias_si + j0 : nullptr;
  const VF slope = hn::Set(d, m.slope);
  const VF rel0 = hn::Sub(hn::Iota(d, static_cast<float>(j0)), hn::Set(d, static_cast<float>(ia)));
  int64_t x = 0;
  for (; x + static_cast<int64_t>(N) <= count; x += N) {
    VF v = hn::LoadU(d, sr + x);
    if (brow) v = hn::Add(v, hn::LoadU(d, brow + x));
    if (m.alibi != AlibiMode::kOff) {  // rel = j - i': causal -slope (i' - j), else -slope |j - i'|
      const VF rel = hn::Add(rel0, hn::Set(d, static_cast<float>(x)));
      v = hn::MulAdd(slope, m.alibi == AlibiMode::kCausal ? rel : hn::Neg(hn::Abs(rel)), v);
    }
    hn::StoreU(v, d, sr + x);
  }
  for (; x < count; ++x) sr[x] = m.additive(sr[x], i, ia, j0 + x);
  return true;
}

// The S tile after Q' K'^T, in order: score mods (general path), an optional per-row factor
// (the kernel normalizer's length scale; 0 gives 0, a -inf score stays -inf), then the element mask
// of a partial tile and the padding columns of a short key tile (-inf; not with !mask_bits, where
// the normalizer's step applies them). Rows whose skip[r] is -inf are left alone.
template <bool kMods>
void score_tile(float* S, const ScoreModEval<float>& mods, int64_t offset, const TileTokens& qt,
                const TileTokens& kt, const core::BlockMask& bm, const core::BlockEntry& ent,
                const float* prescale, const float* skip, bool mask_bits = true) {
  if (!kMods && !prescale && !mask_bits) return;
  for (int64_t r = 0; r < qt.count; ++r) {
    if (skip && skip[r] == kNegInf) continue;
    float* sr = S + r * kTile;
    if constexpr (kMods) {
      const int64_t i = qt.at(r);
      if (mods.has_additive()) {
        if (!vector_additive(sr, mods, i, i + offset, kt))
          for (int64_t x = 0; x < kt.count; ++x)
            sr[x] = mods.additive(sr[x], i, i + offset, kt.at(x));
      }
      if (mods.softcap != 0.f) {  // c tanh(t / c), on vectors
        const DF d;
        const VF c = hn::Set(d, mods.softcap), inv = hn::Set(d, 1.f / mods.softcap);
        for (size_t x = 0; x < kTile; x += hn::Lanes(d))
          hn::StoreU(hn::Mul(c, hn::Tanh(d, hn::Mul(hn::LoadU(d, sr + x), inv))), d, sr + x);
      }
    }
    if (prescale) {
      const float f = prescale[r];
      for (int64_t x = 0; x < kTile; ++x) sr[x] = length_scaled(sr[x], f);
    }
    if (!mask_bits) continue;
    if (ent.cls == TileClass::kPartial)
      apply_bits(sr, bm.bits[ent.bits + r]);
    else if (kt.count < kTile)
      apply_bits(sr, (uint64_t{1} << kt.count) - 1);
  }
}

// exp(x) for x <= 0 (the softmax's s - m): 2^t = 2^n 2^f with t = x log2(e), n = round(t),
// f in [-1/2, 1/2] and a degree-6 fit of 2^f (relative error 2e-8 before rounding); 2^n from
// the exponent bits, t clamped at -127 so that exp(-inf) and anything below 2^-126.5 give 0.
// About 11 instructions against Highway's general Exp's 20 (range checks, both signs).
HWY_INLINE VF exp_nonpositive(DF d, VF x) {
  const hn::RebindToSigned<DF> di;
  const VF t = hn::Max(hn::Mul(x, hn::Set(d, static_cast<float>(kLog2e))), hn::Set(d, -127.f));
  const auto n = hn::NearestInt(t);
  const VF f = hn::Sub(t, hn::ConvertTo(d, n));
  VF p = hn::Set(d, 1.5469732e-4f);
  p = hn::MulAdd(p, f, hn::Set(d, 1.3400433e-3f));
  p = hn::MulAdd(p, f, hn::Set(d, 9.6180253e-3f));
  p = hn::MulAdd(p, f, hn::Set(d, 5.5503272e-2f));
  p = hn::MulAdd(p, f, hn::Set(d, 2.4022651e-1f));
  p = hn::MulAdd(p, f, hn::Set(d, 6.9314718e-1f));
  p = hn::MulAdd(p, f, hn::Set(d, 1.f));
  const VF two_n = hn::BitCast(d, hn::ShiftLeft<23>(hn::Add(n, hn::Set(di, 127))));
  return hn::Mul(p, two_n);
}

// The normalized kernel's log weights p log f(s) on vectors (normalizers.h's
// log_kernel_feature; -inf where f(s) = 0, and for s = -inf). Below s = -16 the softplus takes
// its tail s - e^s / 2.
HWY_INLINE VF kernel_log_weight(DF d, VF s, KernelFeature f, float power) {
  const VF zero = hn::Zero(d);
  VF t;
  if (f == KernelFeature::kSoftplus) {
    const VF sp = hn::Add(hn::Max(s, zero), hn::Log1p(d, hn::Exp(d, hn::Neg(hn::Abs(s)))));
    const VF tail = hn::NegMulAdd(hn::Set(d, 0.5f), exp_nonpositive(d, hn::Min(s, zero)), s);
    t = hn::IfThenElse(hn::Lt(s, hn::Set(d, -16.f)), tail, hn::Log(d, sp));
  } else {
    const auto pos = hn::Gt(s, zero);
    t = hn::IfThenElse(pos, hn::Log(d, hn::IfThenElse(pos, s, hn::Set(d, 1.f))),
                       hn::Set(d, -std::numeric_limits<float>::infinity()));
  }
  // NaN and +inf stay themselves (Highway's Log gives finite values for them), as on CUDA.
  t = hn::IfThenElse(hn::Or(hn::IsNaN(s), hn::Eq(s, hn::Set(d, HUGE_VALF))), s, t);
  return power == 1.f ? t : hn::Mul(hn::Set(d, power), t);
}
// d log f(s) / ds on vectors (dlog_kernel_feature): sigmoid(s) / softplus(s), or 1 / s for ReLU.
HWY_INLINE VF dlog_kernel_feature(DF d, VF s, KernelFeature f) {
  const VF zero = hn::Zero(d), one = hn::Set(d, 1.f);
  if (f == KernelFeature::kSoftplus) {
    const VF ez = hn::Exp(d, hn::Neg(hn::Abs(s)));
    const VF sp = hn::Add(hn::Max(s, zero), hn::Log1p(d, ez));
    const VF sig = hn::Div(hn::IfThenElse(hn::Ge(s, zero), one, ez), hn::Add(one, ez));
    const VF tail = hn::NegMulAdd(hn::Set(d, 0.5f), exp_nonpositive(d, hn::Min(s, zero)), one);
    return hn::IfThenElse(hn::Lt(s, hn::Set(d, -16.f)), tail, hn::Div(sig, sp));
  }
  const auto pos = hn::Gt(s, zero);
  return hn::IfThenElseZero(pos, hn::Div(one, hn::IfThenElse(pos, s, one)));
}

// v rounded to bf16 precision (nearest even), kept in fp32 lanes: the weights P as P V will use
// them in bf16, so that the normalizer sums the same values (one key then gives O = v exactly).
// For finite v and infinities.
HWY_INLINE VF round_to_bf16(DF d, VF v) {
  const hn::RebindToUnsigned<DF> du;
  const auto u = hn::BitCast(du, v);
  const auto odd = hn::And(hn::ShiftRight<16>(u), hn::Set(du, 1u));
  const auto r = hn::Add(u, hn::Add(odd, hn::Set(du, 0x7fffu)));
  return hn::BitCast(d, hn::And(r, hn::Set(du, 0xffff0000u)));
}

// store_row (tile_common.h) on vectors for fp32 and bf16 (round to nearest even, NaN kept):
// the output rows of a query tile, once per task.
HWY_INLINE void store_row_simd(const float* HWY_RESTRICT src, int64_t n, DType t, void* dst) {
  const DF d;
  const int64_t N = static_cast<int64_t>(hn::Lanes(d));
  int64_t x = 0;
  if (t == DType::kF32) {
    float* o = static_cast<float*>(dst);
    for (; x + N <= n; x += N) hn::StoreU(hn::LoadU(d, src + x), d, o + x);
  } else if (t == DType::kBF16) {
    const hn::RebindToSigned<DF> di;
    const hn::Rebind<uint16_t, DF> d16;
    uint16_t* o = static_cast<uint16_t*>(dst);
    for (; x + N <= n; x += N) {
      const VF v = hn::LoadU(d, src + x);
      const auto u = hn::BitCast(di, v);
      const auto odd = hn::And(hn::ShiftRight<16>(u), hn::Set(di, 1));
      auto r = hn::ShiftRight<16>(hn::Add(u, hn::Add(odd, hn::Set(di, 0x7fff))));
      r = hn::IfThenElse(hn::RebindMask(di, hn::IsNaN(v)),
                         hn::Or(hn::ShiftRight<16>(u), hn::Set(di, 0x40)), r);
      hn::StoreU(hn::DemoteTo(d16, hn::And(r, hn::Set(di, 0xffff))), d16, o + x);
    }
  }
  if (x < n) store_row(src + x, n - x, t, static_cast<char*>(dst) + x * dtype_size(t));
}

HWY_INLINE float reduce_max(const float* x) {
  const DF d;
  const size_t N = hn::Lanes(d);
  VF m = hn::LoadU(d, x);
  for (size_t c = N; c < kTile; c += N) m = hn::Max(m, hn::LoadU(d, x + c));
  return hn::GetLane(hn::MaxOfLanes(d, m));
}

}  // namespace HWY_NAMESPACE
}  // namespace attnkit::cpu
HWY_AFTER_NAMESPACE();

#endif  // ATTNKIT_CPU_TILE_OPS_INL_H_
