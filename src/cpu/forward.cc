// CPU forward attention: FlashAttention-2's tiled online softmax on SIMD (Google Highway,
// dispatched at run time) and OpenMP threads, for every tier-1 mask, score mod and normalizer.
//
// Data flow, per call:
//   1. A BlockMask per distinct mask instance (core/block_mask.h): the key tiles each query tile
//      visits, full or partial with exact bits. Tiles hold 64 tokens (grid boxes for 2-D/3-D
//      neighborhood masks), so work follows the number of allowed pairs.
//   2. Pack, once per (batch, kv head) and key tile: K^T as fp32 [d][64] (the B operand of
//      S = Q K^T) and V as fp32 [64][dv_pad] (zero padded), converting bf16/fp16 on the way.
//      A low-rank bias is fused here as extra head dims: Q' = [scale q, u], K' = [k, w].
//      bf16 on a CPU with bf16 dot products (FwdCall::bf16) stays bf16 instead: K^T and V as
//      pairs for vdpbf16ps, the tile GEMMs and the softmax step of tile_ops_avx512.h, P rounded
//      to bf16 for P V (as on GPUs).
//   3. One task per (batch, query head, query tile): Q' tile packed as fp32 [64][d'] with the
//      scale folded in; for each visited key tile: S = Q' K'^T (register-blocked 6 x 2-vector
//      microkernel), score mods (general path only), element mask (partial tiles only), the
//      normalizer's tile step (online max / exp / sums for softmax), then O = alpha O + P V with
//      the same microkernel. O (64 x dv_pad fp32), S and the row state stay in L1/L2; nothing of
//      size N x N is ever stored. Epilogue: normalize, ReLA RMS, gate, LSE and statistics.
//   4. Column mass (only when asked): a second pass recomputes P = exp(S - LSE) per tile.
// Reads Q, K, V once per task group; writes O once. FLOPs: 4 d pairs per allowed pair
// (2 d for Q K^T, 2 dv for P V), the GEMM rate bounds it.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

// Highway's per-target compilation: this file is re-included once per SIMD target; the order
// of these includes matters.
// clang-format off
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/forward.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>
#include <hwy/aligned_allocator.h>
#include <hwy/contrib/math/math-inl.h>
// clang-format on

#include "attnkit/variant/normalizers.h"
#include "core/block_mask.h"
#include "core/convert.h"
#include "core/score_tables.h"
#include "cpu/forward.h"
#include "cpu/parallel.h"
#include "cpu/tile_common.h"
#include "cpu/tile_ops-inl.h"
#include "cpu/tile_ops_avx512.h"

#ifndef ATTNKIT_CPU_FORWARD_CALL
#define ATTNKIT_CPU_FORWARD_CALL
namespace attnkit::cpu {

// Everything a task reads, resolved once per call.
struct FwdCall {
  const core::Problem* p = nullptr;
  core::BlockMaskSet masks;
  std::vector<core::ScoreTables<float>> tables;  // per batch element
  std::vector<float> beta;                       // sigmoid beta per batch element
  bool lowrank = false;
  // bf16 Q, K, V on a CPU with bf16 dot products (tile_ops_avx512.h): Q, K and V stay bf16 (packed
  // as pairs), P is rounded to bf16 for P V, and the scale multiplies S instead of Q.
  bool bf16 = false;
  int64_t d_eff = 0, dv_pad = 0, units_per_batch = 0;
  int64_t d_pairs = 0;  // bf16: head dim pairs (d rounded up to even)
  // Packed K/V of the units from unit_begin on: unit u at (u - unit_begin) * unit_floats.
  float* packed = nullptr;  // the calling thread's workspace (packed_workspace)
  int64_t unit_floats = 0, k_tile_floats = 0, v_tile_floats = 0, max_k_tiles = 0;
  int64_t unit_begin = 0;
  // [B][Hq][max_nq] when column mass is asked for: each row's running max m and 1 / l, so that
  // P = exp(S - m) / l (exp(S - LSE) sums to l where m + log l rounds to m: scores near -FLT_MAX).
  std::vector<float> lse, inv_l;
  int threads = 1;

  const core::BlockMask& mask(int64_t b, int64_t h) const { return masks.of(b, h); }
  float* k_tile(int64_t unit, int64_t t) {
    return packed + (unit - unit_begin) * unit_floats + t * k_tile_floats;
  }
  float* v_tile(int64_t unit, int64_t t) {
    return packed + (unit - unit_begin) * unit_floats + max_k_tiles * k_tile_floats +
           t * v_tile_floats;
  }
};

}  // namespace attnkit::cpu
#endif  // ATTNKIT_CPU_FORWARD_CALL

HWY_BEFORE_NAMESPACE();
namespace attnkit::cpu {
namespace HWY_NAMESPACE {

// Per-worker scratch of a task.
struct Scratch {
  hwy::AlignedFreeUniquePtr<float[]> q, s, o;
  hwy::AlignedFreeUniquePtr<uint16_t[]> q16, p16;  // bf16: the Q tile, P for P V
  // Row state: running max, sum of P (lp: of P as rounded for P V), entropy sum, ...
  std::vector<float> m, l, lp, es, rmax, alpha, lscale;
  explicit Scratch(const FwdCall& c)
      : q(hwy::AllocateAligned<float>(kTile * c.d_eff)),
        s(hwy::AllocateAligned<float>(kTile * kTile)),
        o(hwy::AllocateAligned<float>(kTile * c.dv_pad)),
        q16(hwy::AllocateAligned<uint16_t>(c.bf16 ? kTile * 2 * c.d_pairs : 1)),
        p16(hwy::AllocateAligned<uint16_t>(c.bf16 ? kTile * kTile : 1)),
        m(kTile),
        l(kTile),
        lp(kTile),
        es(kTile),
        rmax(kTile),
        alpha(kTile),
        lscale(kTile) {}
};

// Step 2 for bf16: K^T as head-dim pairs [d_pairs][64] and V as key pairs [32][dv_pad], in
// 32-bit words (tile_ops_avx512.h).
void pack_kv_bf16(const FwdCall& c, int64_t b, int64_t hk, const TileTokens& kt, uint32_t* k2,
                  uint32_t* v2) {
  const core::Problem& p = *c.p;
  const core::Sequence& s = p.seqs[b];
  const void* krow[kTile];
  const uint16_t* vrow[kTile];
  for (int64_t x = 0; x < kTile; ++x) {
    const bool in = x < kt.count;
    krow[x] = in ? p.k.row(b, hk, s.k_start + kt.at(x)) : nullptr;
    vrow[x] = in ? static_cast<const uint16_t*>(p.v.row(b, hk, s.k_start + kt.at(x))) : nullptr;
  }
  transpose_rows_to_words(krow, 2 * p.d, k2);
  for (int64_t pr = 0; pr < kTile / 2; ++pr)
    pack_v_pairs_bf16(vrow[2 * pr], vrow[2 * pr + 1], p.dv, c.dv_pad, v2 + pr * c.dv_pad);
}

// Step 2: pack key tile t of a unit.
void pack_kv(FwdCall& c, int64_t unit, int64_t t) {
  const core::Problem& p = *c.p;
  const int64_t b = unit / c.units_per_batch, u = unit % c.units_per_batch;
  const int64_t hk = c.lowrank ? u / p.group : u;
  const core::Sequence& s = p.seqs[b];
  const core::BlockMask& bm = c.mask(b, 0);  // the tilings of b are the same for every head
  if (t >= bm.k.num_tiles()) return;
  const TileTokens kt = bm.k.tile(t);
  float* kp = c.k_tile(unit, t);
  float* vp = c.v_tile(unit, t);
  if (c.bf16) {  // every word of the bf16 layouts is written: no fill
    pack_kv_bf16(c, b, hk, kt, reinterpret_cast<uint32_t*>(kp), reinterpret_cast<uint32_t*>(vp));
    return;
  }
  if (!c.lowrank && p.k.dtype == DType::kF32 && p.v.dtype == DType::kF32 && avx512_supported()) {
    const void* krow[kTile];
    for (int64_t x = 0; x < kTile; ++x)
      krow[x] = x < kt.count ? p.k.row(b, hk, s.k_start + kt.at(x)) : nullptr;
    transpose_rows_to_words(krow, 4 * p.d, reinterpret_cast<uint32_t*>(kp));
    for (int64_t x = 0; x < kTile; ++x) {
      float* vx = vp + x * c.dv_pad;
      if (x < kt.count) std::memcpy(vx, p.v.row(b, hk, s.k_start + kt.at(x)), p.dv * sizeof(float));
      std::fill(vx + (x < kt.count ? p.dv : 0), vx + c.dv_pad, 0.f);
    }
    return;
  }
  std::fill(kp, kp + c.k_tile_floats, 0.f);
  std::fill(vp, vp + c.v_tile_floats, 0.f);
  std::vector<float> row(std::max(c.d_eff, p.dv));
  const TensorView& w = p.spec->mods.low_rank_w;
  for (int64_t x = 0; x < kt.count; ++x) {
    const int64_t j = kt.at(x);
    load_row(p.k.row(b, hk, s.k_start + j), p.k.dtype, p.d, 1.f, row.data());
    if (c.lowrank)
      for (int64_t r = 0; r < c.d_eff - p.d; ++r)
        row[p.d + r] = static_cast<const float*>(
            w.data)[b * w.strides[0] + u * w.strides[1] + j * w.strides[2] + r * w.strides[3]];
    for (int64_t e = 0; e < c.d_eff; ++e) kp[e * kTile + x] = row[e];
    load_row(p.v.row(b, hk, s.k_start + j), p.v.dtype, p.dv, 1.f, vp + x * c.dv_pad);
  }
}

// The Q' tile of (b, h): fp32 [rows][d'], scale folded in, low-rank u appended unscaled; bf16:
// the rows as they are, [rows][2 d_pairs] (the scale multiplies S).
void pack_q(const FwdCall& c, Scratch& w, int64_t b, int64_t h, const TileTokens& qt) {
  const core::Problem& p = *c.p;
  if (c.bf16) {
    const int64_t ld = 2 * c.d_pairs;
    for (int64_t r = 0; r < qt.count; ++r) {
      uint16_t* qr = w.q16.get() + r * ld;
      std::memcpy(qr, p.q.row(b, h, p.seqs[b].q_start + qt.at(r)), p.d * sizeof(uint16_t));
      if (ld > p.d) qr[p.d] = 0;
    }
    return;
  }
  float* q = w.q.get();
  const TensorView& u = p.spec->mods.low_rank_u;
  for (int64_t r = 0; r < qt.count; ++r) {
    const int64_t i = qt.at(r);
    float* qr = q + r * c.d_eff;
    load_row(p.q.row(b, h, p.seqs[b].q_start + i), p.q.dtype, p.d, p.scale, qr);
    if (c.lowrank)
      for (int64_t e = 0; e < c.d_eff - p.d; ++e)
        qr[p.d + e] = static_cast<const float*>(
            u.data)[b * u.strides[0] + h * u.strides[1] + i * u.strides[2] + e * u.strides[3]];
  }
}

// S = Q' K'^T of a tile pair ([rows][64], scaled).
HWY_INLINE void score_gemm(FwdCall& c, Scratch& w, int64_t unit, int64_t k_tile, int64_t rows,
                           float* S) {
  if (c.bf16)
    gemm_bf16(w.q16.get(), 2 * c.d_pairs, reinterpret_cast<const uint16_t*>(c.k_tile(unit, k_tile)),
              c.d_pairs, S, kTile, rows, kTile, nullptr, false, c.p->scale);
  else
    gemm(w.q.get(), c.d_eff, c.k_tile(unit, k_tile), kTile, c.d_eff, S, kTile, rows, kTile, nullptr,
         false);
}

// O = alpha O + P V (O = P V when !load_o) over the tile's keys; P is S after the normalizer, or
// w.p16 already (p16_done).
HWY_INLINE void value_gemm(FwdCall& c, Scratch& w, int64_t unit, int64_t k_tile, int64_t keys,
                           int64_t rows, const float* alpha, bool load_o, bool p16_done) {
  if (c.bf16) {
    if (!p16_done) to_bf16_rows(w.s.get(), kTile, w.p16.get(), kTile, rows, kTile);
    gemm_bf16(w.p16.get(), kTile, reinterpret_cast<const uint16_t*>(c.v_tile(unit, k_tile)),
              (keys + 1) / 2, w.o.get(), c.dv_pad, rows, c.dv_pad, alpha, load_o, 1.f);
  } else {
    gemm(w.s.get(), kTile, c.v_tile(unit, k_tile), c.dv_pad, keys, w.o.get(), c.dv_pad, rows,
         c.dv_pad, alpha, load_o);
  }
}

// Step 3: one (batch, query head, query tile).
template <NormalizerKind kNorm, bool kMods>
void attend_tile(FwdCall& c, Scratch& w, int64_t b, int64_t h, int64_t t) {
  const core::Problem& p = *c.p;
  const AttentionSpec& spec = *p.spec;
  const Normalizer& norm = spec.normalizer;
  const core::Sequence& s = p.seqs[b];
  const core::BlockMask& bm = c.mask(b, h);
  const TileTokens qt = bm.q.tile(t);
  const int64_t rows = qt.count;
  const int64_t unit = b * c.units_per_batch + (c.lowrank ? h : h / p.group);
  const DF d;
  const size_t N = hn::Lanes(d);
  // The normalized kernel runs as a softmax over its log weights p log f(s): kOnline.
  constexpr bool kSoftmax =
      kNorm == NormalizerKind::kSoftmax || kNorm == NormalizerKind::kSoftmaxSink;
  constexpr bool kOnline = kSoftmax || kNorm == NormalizerKind::kKernel;

  pack_q(c, w, b, h, qt);
  const float sink = kNorm == NormalizerKind::kSoftmaxSink
                         ? static_cast<const float*>(norm.sinks.data)[h * norm.sinks.strides[0]]
                         : kNegInf;
  for (int64_t r = 0; r < rows; ++r) {
    w.m[r] = sink;
    w.l[r] = kNorm == NormalizerKind::kSoftmaxSink ? 1.f : 0.f;
    w.lp[r] = w.l[r];
    w.es[r] = 0.f;
    w.rmax[r] = kNegInf;
    w.alpha[r] = 1.f;
    if (kNorm == NormalizerKind::kKernel && norm.length_scale)
      w.lscale[r] = length_scale<float>(bm.allowed_keys[qt.at(r)]);
  }
  // O is written by the first visited tile's P V (no load); a row of a q tile without any
  // visited key tile is zeroed here.
  const bool no_tiles = bm.row_begin[t] == bm.row_begin[t + 1];
  if (no_tiles) std::fill(w.o.get(), w.o.get() + rows * c.dv_pad, 0.f);

  ScoreModEval<float> mods;
  if constexpr (kMods) mods = core::resolve_score_mods(p, c.tables[b], b, h, false);
  const float* prescale =
      kNorm == NormalizerKind::kKernel && norm.length_scale ? w.lscale.data() : nullptr;
  const bool want_entropy = p.entropy.defined();
  const bool round_p = c.bf16;  // P V takes P in bf16
  const bool softmax16 = c.bf16 && !want_entropy;
  const float beta = c.beta[b];

  float* S = w.s.get();
  for (int64_t e = bm.row_begin[t]; e < bm.row_begin[t + 1]; ++e) {
    const core::BlockEntry& ent = bm.entries[e];
    const TileTokens kt = bm.k.tile(ent.k_tile);
    score_gemm(c, w, unit, ent.k_tile, rows, S);
    // The normalizer's tile step: S -> P in place (bf16 softmax: into w.p16, on vectors, with
    // the element mask).
    const bool p16_done = kOnline && softmax16;
    score_tile<kMods>(S, mods, s.offset, qt, kt, bm, ent, prescale, nullptr, !p16_done);
    if constexpr (kNorm == NormalizerKind::kKernel)  // masked -inf stays -inf
      for (int64_t x = 0; x < rows * kTile; x += N)
        hn::StoreU(kernel_log_weight(d, hn::LoadU(d, S + x), norm.feature, norm.power), d, S + x);
    if (p16_done)
      softmax_step_bf16(S, rows,
                        {w.m.data(), w.l.data(), w.lp.data(), w.alpha.data(), w.rmax.data()},
                        {ent.cls == TileClass::kPartial ? &bm.bits[ent.bits] : nullptr,
                         kt.count < kTile ? (uint64_t{1} << kt.count) - 1 : ~uint64_t{0}},
                        w.p16.get());
    for (int64_t r = 0; r < (p16_done ? 0 : rows); ++r) {
      float* sr = S + r * kTile;
      if constexpr (kOnline) {
        const float mx = reduce_max(sr);
        w.rmax[r] = std::max(w.rmax[r], mx);
        const float m_new = std::max(w.m[r], mx);
        if (m_new == kNegInf) {
          std::fill(sr, sr + kTile, 0.f);
          w.alpha[r] = 1.f;
          continue;
        }
        const float alpha = w.m[r] == m_new     ? 1.f
                            : w.m[r] == kNegInf ? 0.f
                                                : std::exp(w.m[r] - m_new);
        const VF vm = hn::Set(d, m_new);
        VF sum = hn::Zero(d), esum = hn::Zero(d), rsum = hn::Zero(d);
        for (size_t x = 0; x < kTile; x += N) {
          const VF sv = hn::LoadU(d, sr + x);
          VF pv = exp_nonpositive(d, hn::Sub(sv, vm));
          sum = hn::Add(sum, pv);
          if (want_entropy)
            esum = hn::Add(esum, hn::IfThenElseZero(hn::Gt(sv, hn::Set(d, kNegInf)),
                                                    hn::Mul(pv, hn::Sub(sv, vm))));
          if (round_p) {
            pv = round_to_bf16(d, pv);
            rsum = hn::Add(rsum, pv);
          }
          hn::StoreU(pv, d, sr + x);
        }
        // es = sum_j exp(s_j - m) (s_j - m), rescaled when m moves (no cancellation at large
        // logits: entropy = log(l) - es / l).
        // (alpha = 0: what came before weighs nothing; l (m - m_new) may overflow to -inf.)
        if (want_entropy)
          w.es[r] = (alpha > 0.f
                         ? alpha * (w.es[r] + (w.m[r] == kNegInf ? 0.f : (w.m[r] - m_new) * w.l[r]))
                         : 0.f) +
                    hn::GetLane(hn::SumOfLanes(d, esum));
        w.l[r] = w.l[r] * alpha + hn::GetLane(hn::SumOfLanes(d, sum));
        if (round_p) w.lp[r] = w.lp[r] * alpha + hn::GetLane(hn::SumOfLanes(d, rsum));
        w.m[r] = m_new;
        w.alpha[r] = alpha;
      } else {
        const VF zero = hn::Zero(d), ninf = hn::Set(d, kNegInf);
        VF sum = zero, rsum = zero;
        for (size_t x = 0; x < kTile; x += N) {
          const VF sv = hn::LoadU(d, sr + x);
          const auto live = hn::Gt(sv, ninf);
          VF pv;
          if constexpr (kNorm == NormalizerKind::kSigmoid) {
            const VF z = hn::Add(sv, hn::Set(d, beta));
            const VF ez = hn::Exp(d, hn::Neg(hn::Abs(z)));  // exp(-|z|) in (0, 1]
            const VF one = hn::Set(d, 1.f);
            pv = hn::Div(hn::IfThenElse(hn::Ge(z, zero), one, ez), hn::Add(one, ez));
          } else {  // ReLA
            pv = hn::Max(sv, zero);
          }
          pv = hn::IfThenElseZero(live, pv);
          sum = hn::Add(sum, pv);
          if (round_p) {
            pv = round_to_bf16(d, pv);
            rsum = hn::Add(rsum, pv);
          }
          hn::StoreU(pv, d, sr + x);
        }
      }
    }
    // O = alpha O + P V; the rescale is skipped when no row's running max moved.
    bool rescale = false;
    if constexpr (kOnline)
      for (int64_t r = 0; r < rows && !rescale; ++r) rescale = w.alpha[r] != 1.f;
    value_gemm(c, w, unit, ent.k_tile, kt.count, rows, rescale ? w.alpha.data() : nullptr,
               e != bm.row_begin[t], p16_done);
  }

  // Epilogue.
  const TensorView& gain = norm.rela_gain;
  const GateKind gate = p.raw_output ? GateKind::kNone : spec.gate_kind;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = qt.at(r), row = s.q_start + i;
    float* o = w.o.get() + r * c.dv_pad;
    float stat = 0.f;
    if constexpr (kOnline) {
      const float l = w.l[r], lo = round_p ? w.lp[r] : l;  // O divides by the weights it used
      const float inv = lo > 0.f ? 1.f / lo : 0.f;
      for (int64_t x = 0; x < p.dv; ++x) o[x] *= inv;
      stat = l > 0.f ? w.m[r] + std::log(l) : kNegInf;
      if (p.row_max.defined()) p.row_max.at(b, h, row) = w.rmax[r];
      if (p.entropy.defined()) {
        float ent = 0.f;
        if (std::isfinite(stat)) {
          ent = std::log(l) - w.es[r] / l;
        }
        p.entropy.at(b, h, row) = ent;
      }
      if (!c.lse.empty()) {
        c.lse[(b * p.hq + h) * p.max_nq + i] = l > 0.f ? w.m[r] : kNegInf;
        c.inv_l[(b * p.hq + h) * p.max_nq + i] = l > 0.f ? 1.f / l : 0.f;
      }
    } else if constexpr (kNorm == NormalizerKind::kReLA) {
      if (p.raw_output) {  // the backward's recompute wants O itself
        store_row_simd(o, p.dv, p.out.dtype, p.out.row(b, h, row));
        continue;
      }
      double ms = 0;
      for (int64_t x = 0; x < p.dv; ++x) ms += static_cast<double>(o[x]) * o[x];
      const float rms = static_cast<float>(std::sqrt(ms / p.dv + norm.rela_eps));
      for (int64_t x = 0; x < p.dv; ++x)
        o[x] = static_cast<const float*>(gain.data)[x * gain.strides[0]] * o[x] / rms;
      stat = rms;
    }
    if (gate == GateKind::kElementwise) {
      float g[kMaxHeadDim];
      load_row(p.gate.row(b, h, row), p.gate.dtype, p.dv, 1.f, g);
      for (int64_t x = 0; x < p.dv; ++x) o[x] *= sigmoid(g[x]);
    } else if (gate == GateKind::kPerHead) {
      const float g = sigmoid(load_float<float>(p.gate.row(b, h, row), p.gate.dtype, 0));
      for (int64_t x = 0; x < p.dv; ++x) o[x] *= g;
    }
    store_row_simd(o, p.dv, p.out.dtype, p.out.row(b, h, row));
    if (p.row_stat.defined()) p.row_stat.at(b, h, row) = stat;
  }
}

// Step 4: column mass of (b, kv group or head): P = exp(S - m) / l summed over query rows.
template <bool kMods>
void column_mass(FwdCall& c, Scratch& w, int64_t b, int64_t h, std::vector<double>& mass) {
  const core::Problem& p = *c.p;
  const core::Sequence& s = p.seqs[b];
  const core::BlockMask& bm = c.mask(b, h);
  const int64_t unit = b * c.units_per_batch + (c.lowrank ? h : h / p.group);
  const DF d;
  const size_t N = hn::Lanes(d);
  ScoreModEval<float> mods;
  if constexpr (kMods) mods = core::resolve_score_mods(p, c.tables[b], b, h, false);
  float* S = w.s.get();
  for (int64_t t = 0; t < bm.q.num_tiles(); ++t) {
    const TileTokens qt = bm.q.tile(t);
    const int64_t rows = qt.count;
    bool any = false;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = qt.at(r), x = (b * p.hq + h) * p.max_nq + i;
      const bool in = i >= p.col_q_begin && i < p.col_q_end;
      w.m[r] = in ? c.lse[x] : kNegInf;
      w.l[r] = in ? c.inv_l[x] : 0.f;
      any = any || w.m[r] != kNegInf;
    }
    if (!any) continue;
    pack_q(c, w, b, h, qt);
    for (int64_t e = bm.row_begin[t]; e < bm.row_begin[t + 1]; ++e) {
      const core::BlockEntry& ent = bm.entries[e];
      const TileTokens kt = bm.k.tile(ent.k_tile);
      score_gemm(c, w, unit, ent.k_tile, rows, S);
      score_tile<kMods>(S, mods, s.offset, qt, kt, bm, ent, nullptr, w.m.data());
      HWY_ALIGN float cs[kTile] = {};  // column sums of this tile pair, any vector width
      for (int64_t r = 0; r < rows; ++r) {
        const float* sr = S + r * kTile;
        if (w.m[r] == kNegInf) continue;
        const VF m = hn::Set(d, w.m[r]), inv_l = hn::Set(d, w.l[r]);
        for (size_t x = 0; x < kTile; x += N)
          hn::Store(
              hn::MulAdd(hn::Exp(d, hn::Sub(hn::LoadU(d, sr + x), m)), inv_l, hn::Load(d, cs + x)),
              d, cs + x);
      }
      for (int64_t x = 0; x < kt.count; ++x) mass[kt.at(x)] += cs[x];
    }
  }
}

// Runs the tasks of the batch elements whose K/V are packed: [batch_begin, batch_end).
template <NormalizerKind kNorm, bool kMods>
void run_packed(FwdCall& c, std::vector<std::unique_ptr<Scratch>>& scratch, int64_t batch_begin,
                int64_t batch_end) {
  const core::Problem& p = *c.p;
  int64_t qtiles = 0;
  for (const core::BlockMask& m : c.masks.masks) qtiles = std::max(qtiles, m.q.num_tiles());
  const int64_t batches = batch_end - batch_begin;
  parallel_for(batches * p.hq * qtiles, c.threads, [&](int64_t task, int worker) {
    const int64_t t = task % qtiles;
    const int64_t h = (task / qtiles) % p.hq;
    const int64_t b = batch_begin + task / (qtiles * p.hq);
    if (t < c.mask(b, 0).q.num_tiles()) attend_tile<kNorm, kMods>(c, *scratch[worker], b, h, t);
  });
  if constexpr (is_softmax_family(kNorm)) {
    if (!p.col_mass.defined()) return;
    // Column mass: one task per (batch, kv head), its query heads in order (deterministic sums).
    parallel_for(batches * p.hk, c.threads, [&](int64_t task, int worker) {
      const int64_t b = batch_begin + task / p.hk, hk = task % p.hk;
      const int64_t nk = p.seqs[b].nk;
      std::vector<double> group(nk, 0.0);
      for (int64_t g = 0; g < p.group; ++g) {
        const int64_t h = hk * p.group + g;
        std::vector<double> mass(nk, 0.0);
        column_mass<kMods>(c, *scratch[worker], b, h, mass);
        for (int64_t j = 0; j < nk; ++j) {
          if (p.col_group_sum)
            group[j] += mass[j];
          else
            p.col_mass.at(b, h, j) = static_cast<float>(mass[j]);
        }
      }
      if (p.col_group_sum)
        for (int64_t j = 0; j < nk; ++j) p.col_mass.at(b, hk, j) = static_cast<float>(group[j]);
    });
  }
}

Status ForwardImpl(const core::Problem& p) {
  const AttentionSpec& spec = *p.spec;
  FwdCall c;
  c.p = &p;
  c.threads = resolve_threads(p.num_threads);
  c.lowrank = spec.mods.low_rank_u.defined();
  c.d_eff = p.d + (c.lowrank ? spec.mods.low_rank_u.shape[3] : 0);
  c.dv_pad = static_cast<int64_t>(vec_pad(p.dv));
  c.bf16 = !c.lowrank && p.q.dtype == DType::kBF16 && p.k.dtype == DType::kBF16 &&
           p.v.dtype == DType::kBF16 && bf16_dot_enabled();
  c.d_pairs = (p.d + 1) / 2;
  if (c.bf16) c.dv_pad = (c.dv_pad + 15) / 16 * 16;  // the bf16 GEMM's columns come in 16s
  c.units_per_batch = c.lowrank ? p.hq : p.hk;
  const bool count_rows =
      spec.normalizer.kind == NormalizerKind::kKernel && spec.normalizer.length_scale;
  c.masks = core::build_block_masks(p, count_rows, c.threads);
  const bool mods = spec.mods.per_element();
  for (int64_t b = 0; b < p.batch; ++b) {
    if (mods) c.tables.push_back(core::build_score_tables<float>(p, b, false));
    c.beta.push_back(spec.normalizer.beta ? static_cast<float>(*spec.normalizer.beta)
                                          : -std::log(static_cast<float>(p.seqs[b].nk)));
  }
  for (const core::BlockMask& bm : c.masks.masks)
    c.max_k_tiles = std::max(c.max_k_tiles, bm.k.num_tiles());
  c.k_tile_floats = c.d_eff * kTile;
  c.v_tile_floats = kTile * c.dv_pad;
  c.unit_floats = c.max_k_tiles * (c.k_tile_floats + c.v_tile_floats);
  if (p.col_mass.defined()) {
    c.lse.assign(p.batch * p.hq * p.max_nq, kNegInf);
    c.inv_l.assign(p.batch * p.hq * p.max_nq, 0.f);
  }

  std::vector<std::unique_ptr<Scratch>> scratch;
  for (int i = 0; i < c.threads; ++i) scratch.push_back(std::make_unique<Scratch>(c));

  const bool ok = for_each_packed_chunk(
      p.batch, c.units_per_batch, c.unit_floats, 0, c.packed, c.unit_begin,
      [&](int64_t b0, int64_t b1) {
        const int64_t units = (b1 - b0) * c.units_per_batch;
        parallel_for(units * c.max_k_tiles, c.threads, [&](int64_t task, int) {
          pack_kv(c, c.unit_begin + task / c.max_k_tiles, task % c.max_k_tiles);
        });
        dispatch(spec.normalizer.kind, mods, [&](auto kn, auto km) {
          run_packed<decltype(kn)::value, decltype(km)::value>(c, scratch, b0, b1);
        });
      });
  if (!ok) return Status(StatusCode::kInternal, "cpu forward: out of memory for packed K/V");
  return {};
}

// The name of the target this code was compiled for (dispatched: the one that runs).
const char* TargetNameImpl() { return hwy::TargetName(HWY_TARGET); }

}  // namespace HWY_NAMESPACE
}  // namespace attnkit::cpu
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace attnkit::cpu {

HWY_EXPORT(ForwardImpl);

Status forward(const core::Problem& p) { return HWY_DYNAMIC_DISPATCH(ForwardImpl)(p); }

HWY_EXPORT(TargetNameImpl);

std::string simd_target() { return HWY_DYNAMIC_DISPATCH(TargetNameImpl)(); }

std::vector<int64_t> simd_targets() { return hwy::SupportedAndGeneratedTargets(); }

}  // namespace attnkit::cpu
#endif  // HWY_ONCE
