// CPU backward attention for every tier-1 mechanism: FlashAttention-2's recompute, no N x N
// buffer, every mask through the same BlockMask as the forward pass, the score mods and
// normalizers through the same policies (MECHANISMS.md 1.1-1.5; the oracle's chain rule is
// src/reference/reference_backward.cpp).
//
// Data flow, per call:
//   0. Per row, the epilogue backwards: the gate (dG = dO out (1 - sigmoid G); dO <- dO sigmoid G),
//      ReLA (O recomputed by the forward pass without its RMS normalization; dgain; dO through
//      the RMS), D_i = dO_i . out_i for softmax and the normalized kernel (the gate cancels:
//      dO1 . O1 = dO . out), dsink_h = -sum_i exp(sink_h - LSE_i) D_i.
//   1. Pack, once per unit and key tile: K'^T [d'][64] and V^T [dv][64] (B operands of
//      S = Q' K'^T and dP = dO V^T) and K' [64][d'_pad] (B operand of dQ' = dT K'); for the bf16
//      dot products (BwdCall::s16, dp16, dq16, kv16) the same as pairs in 32-bit words. A unit is a
//      (batch, kv head), or a (batch, query head) with a low-rank bias, which is fused as extra
//      head dims as in the forward pass: Q' = [scale q, u], K' = [k, w].
//   2. Per visited tile pair, in both passes: S = Q' K'^T, score mods and element mask; dP = dO
//   V^T;
//      the normalizer's backward per row (P, the weights that multiply V, and dS); through the
//      softcap, dT = dS (1 - (S / c)^2).
//   3. Pass A, one task per (batch, kv head, key tile): for each query head of the group and each
//      query tile that visits the key tile (the BlockMask transposed): dV += P^T dO,
//      dK' += dT^T Q' (dk; dw per query head), column sums of dT (forget gate).
//   4. Pass B, one task per (batch, query head, query tile), or per query tile of the heads and
//      batch elements that share a broadcast bias slice: dQ' += dT K' (dq; du), and what a row
//      owns: dBias, the row sums of dT (forget gate) and partial sums of dslopes, dtable and dbeta
//      per (batch, head, query tile), reduced in a fixed order at the end.
// No atomics and a fixed order inside every task: gradients are bit-identical for any thread
// count (the `deterministic` option costs nothing here). Recomputing S and dP in both passes
// makes 7 tile GEMMs per visited tile pair against the 5 of a single pass with atomics.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

// Highway's per-target compilation: the order of these includes matters.
// clang-format off
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/backward.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>
#include <hwy/contrib/math/math-inl.h>
// clang-format on

#include "attnkit/variant/normalizers.h"
#include "core/score_tables.h"
#include "cpu/backward.h"
#include "cpu/forward.h"
#include "cpu/parallel.h"
#include "cpu/tile_common.h"
#include "cpu/tile_ops-inl.h"
#include "cpu/tile_ops_avx512.h"

#ifndef ATTNKIT_CPU_BACKWARD_CALL
#define ATTNKIT_CPU_BACKWARD_CALL
namespace attnkit::cpu {

// One visit of a key tile by a query tile: the query tile and its BlockMask entry.
struct Visit {
  int32_t q_tile;
  int64_t entry;
};

// Slots of the per-(batch, head, query tile) partial sums.
constexpr int64_t kPartSlopes = 0, kPartBeta = 1, kPartTable = 2;

struct BwdCall {
  const core::Problem* p = nullptr;
  const core::GradOperands* g = nullptr;
  const AttentionGrads* grads = nullptr;
  core::BlockMaskSet masks;
  std::vector<std::vector<std::vector<Visit>>> by_key;  // [mask][key tile] -> visits
  std::vector<core::ScoreTables<float>> tables;         // per batch element (score mods)
  std::vector<float> beta;                              // sigmoid's beta per batch element
  bool lowrank = false;
  // bf16 on a CPU with bf16 dot products (tile_ops_avx512.h): S from bf16 Q and K (s16; no
  // low-rank head dims; the scale multiplies S), dP from bf16 dO and V (dp16; dO not through a
  // gate or ReLA), dQ from dT rounded to bf16 and K (dq16, with s16; as on GPUs), their B
  // operands packed as pairs (K^T and V^T in 32-bit words, K as key pairs); with both s16 and
  // dp16 (kv16), dV^T = dO^T P and dK^T = Q^T dT too (P and dT rounded to bf16 and packed as
  // query pairs, Q^T and dO^T by transposes), transposed back once per key tile.
  bool s16 = false, dp16 = false, dq16 = false, kv16 = false;
  int64_t d_pairs = 0, dv_pairs = 0;
  int64_t d_eff = 0, d_pad = 0, dv_pad = 0, units_per_batch = 0, max_k_tiles = 0, q_tiles = 0;
  int64_t unit_floats = 0, kt_floats = 0, vt_floats = 0, kr_floats = 0;
  float* packed = nullptr;
  int64_t unit_begin = 0;  // packed units: from unit_begin on
  int threads = 1;
  core::RowOperand dout;        // dO before the gate and ReLA (grad_out when there are none)
  std::vector<float> dout_buf;  // its storage when it is not grad_out
  std::vector<float> D;         // [b][hq][max_nq]
  std::vector<double> part;     // [b][hq][q tile][part_width]: dslopes, dbeta, dtable...
  int64_t part_width = 0;
  std::vector<double> dc;  // forget gate, d c = d(prefix sums of log f): [b][hq][max_nk]
  std::vector<std::vector<int64_t>> row_groups;  // pass B: (b * hq + h) sharing a dbias slice

  const core::BlockMask& mask(int64_t b, int64_t h) const { return masks.of(b, h); }
  int64_t unit(int64_t b, int64_t h) const {
    return b * units_per_batch + (lowrank ? h : h / p->group);
  }
  float* k_t(int64_t unit, int64_t t) {
    return packed + (unit - unit_begin) * unit_floats + t * kt_floats;
  }
  float* v_t(int64_t unit, int64_t t) {
    return packed + (unit - unit_begin) * unit_floats + max_k_tiles * kt_floats + t * vt_floats;
  }
  float* k_rows(int64_t unit, int64_t t) {
    return packed + (unit - unit_begin) * unit_floats + max_k_tiles * (kt_floats + vt_floats) +
           t * kr_floats;
  }
  float stat(int64_t b, int64_t h, int64_t i) const {
    return p->row_stat.at(b, h, p->seqs[b].q_start + i);
  }
  float d_row(int64_t b, int64_t h, int64_t i) const { return D[(b * p->hq + h) * p->max_nq + i]; }
  double* part_of(int64_t b, int64_t h, int64_t t) {
    return part.empty() ? nullptr : &part[((b * p->hq + h) * q_tiles + t) * part_width];
  }
  // One slot of the partial sums of query head h, summed over batch and query tiles in order.
  double part_sum(int64_t h, int64_t slot) {
    double acc = 0;
    for (int64_t b = 0; b < p->batch; ++b)
      for (int64_t t = 0; t < q_tiles; ++t) acc += part_of(b, h, t)[slot];
    return acc;
  }
};

// An fp32 [B, Hq, N, dim] buffer addressed like out (under varlen, [total_q, Hq, dim]).
inline core::RowOperand scratch_rows(const core::Problem& p, int64_t dim, std::vector<float>& buf) {
  int64_t rows = p.max_nq, batches = p.batch;
  if (p.varlen) {
    rows = 0;
    for (const core::Sequence& s : p.seqs) rows = std::max(rows, s.q_start + s.nq);
    batches = 1;
  }
  buf.assign(batches * p.hq * rows * dim, 0.f);
  core::RowOperand r;
  r.data = reinterpret_cast<char*>(buf.data());
  r.dtype = DType::kF32;
  r.sb = p.varlen ? 0 : p.hq * rows * dim;
  r.sh = rows * dim;
  r.sn = dim;
  return r;
}

// Element `off` of a gradient tensor (fp32 or fp64): += v.
inline void add_at(const TensorView& t, int64_t off, double v) {
  if (t.dtype == DType::kF32)
    static_cast<float*>(t.data)[off] += static_cast<float>(v);
  else
    static_cast<double*>(t.data)[off] += v;
}

}  // namespace attnkit::cpu
#endif  // ATTNKIT_CPU_BACKWARD_CALL

HWY_BEFORE_NAMESPACE();
namespace attnkit::cpu {
namespace HWY_NAMESPACE {

struct BwdScratch {
  hwy::AlignedFreeUniquePtr<float[]> q, dout, s, dp, acc0, acc1;
  hwy::AlignedFreeUniquePtr<uint16_t[]> q16, dout16;  // s16 / dp16: the rows as they are
  hwy::AlignedFreeUniquePtr<uint16_t[]> dt16;         // dq16 / kv16: dT (or P) in bf16
  // kv16: Q^T, dO^T [2 pairs][64] (through words), P and dT as query pairs [32][64]
  hwy::AlignedFreeUniquePtr<uint16_t[]> qT16, doT16;
  hwy::AlignedFreeUniquePtr<uint32_t[]> words, p2, dt2;
  explicit BwdScratch(const BwdCall& c)
      : q(hwy::AllocateAligned<float>(kTile * c.d_pad)),
        dout(hwy::AllocateAligned<float>(kTile * c.dv_pad)),
        s(hwy::AllocateAligned<float>(kTile * kTile)),
        dp(hwy::AllocateAligned<float>(kTile * kTile)),
        acc0(hwy::AllocateAligned<float>(kTile * std::max(c.d_pad, c.dv_pad))),
        acc1(hwy::AllocateAligned<float>(kTile * std::max(c.d_pad, c.dv_pad))),
        q16(hwy::AllocateAligned<uint16_t>(c.s16 ? kTile * 2 * c.d_pairs : 1)),
        dout16(hwy::AllocateAligned<uint16_t>(c.dp16 ? kTile * 2 * c.dv_pairs : 1)),
        dt16(hwy::AllocateAligned<uint16_t>(c.dq16 ? kTile * kTile : 1)),
        qT16(hwy::AllocateAligned<uint16_t>(c.kv16 ? 2 * c.d_pairs * kTile : 1)),
        doT16(hwy::AllocateAligned<uint16_t>(c.kv16 ? 2 * c.dv_pairs * kTile : 1)),
        words(hwy::AllocateAligned<uint32_t>(c.kv16 ? std::max(c.d_pairs, c.dv_pairs) * kTile : 1)),
        p2(hwy::AllocateAligned<uint32_t>(c.kv16 ? kTile / 2 * kTile : 1)),
        dt2(hwy::AllocateAligned<uint32_t>(c.kv16 ? kTile / 2 * kTile : 1)) {}
};

// Step 1: the packed tiles of key tile t of a unit.
void pack_tile(BwdCall& c, int64_t unit, int64_t t) {
  const core::Problem& p = *c.p;
  const int64_t b = unit / c.units_per_batch, u = unit % c.units_per_batch;
  const int64_t hk = c.lowrank ? u / p.group : u;
  const core::BlockMask& bm = c.mask(b, 0);  // the tilings of b are the same for every head
  if (t >= bm.k.num_tiles()) return;
  const TileTokens kt = bm.k.tile(t);
  float *kT = c.k_t(unit, t), *vT = c.v_t(unit, t), *kr = c.k_rows(unit, t);
  if (c.s16 || c.dp16) {  // the pair layouts write every word (null rows: zeros)
    const void* krow[kTile];
    const void* vrow[kTile];
    for (int64_t x = 0; x < kTile; ++x) {
      const int64_t jr = x < kt.count ? p.seqs[b].k_start + kt.at(x) : 0;
      krow[x] = x < kt.count ? p.k.row(b, hk, jr) : nullptr;
      vrow[x] = x < kt.count ? p.v.row(b, hk, jr) : nullptr;
    }
    if (c.s16) transpose_rows_to_words(krow, 2 * p.d, reinterpret_cast<uint32_t*>(kT));
    if (c.dp16) transpose_rows_to_words(vrow, 2 * p.dv, reinterpret_cast<uint32_t*>(vT));
    if (c.dq16)
      for (int64_t pr = 0; pr < kTile / 2; ++pr)
        pack_v_pairs_bf16(static_cast<const uint16_t*>(krow[2 * pr]),
                          static_cast<const uint16_t*>(krow[2 * pr + 1]), p.d, c.d_pad,
                          reinterpret_cast<uint32_t*>(kr) + pr * c.d_pad);
  }
  if (!c.s16) std::fill(kT, kT + c.kt_floats, 0.f);
  if (!c.dp16) std::fill(vT, vT + c.vt_floats, 0.f);
  if (!c.dq16) std::fill(kr, kr + c.kr_floats, 0.f);
  std::vector<float> row(std::max(p.dv, c.d_eff));
  const TensorView& w = p.spec->mods.low_rank_w;
  for (int64_t x = 0; x < kt.count && !(c.s16 && c.dq16 && c.dp16); ++x) {
    const int64_t j = kt.at(x), jr = p.seqs[b].k_start + j;
    float* k = c.dq16 ? row.data() : kr + x * c.d_pad;
    load_row(p.k.row(b, hk, jr), p.k.dtype, p.d, 1.f, k);
    for (int64_t e = p.d; e < c.d_eff; ++e)
      k[e] = static_cast<const float*>(w.data)[b * w.strides[0] + u * w.strides[1] +
                                               j * w.strides[2] + (e - p.d) * w.strides[3]];
    if (!c.s16)
      for (int64_t e = 0; e < c.d_eff; ++e) kT[e * kTile + x] = k[e];
    if (c.dp16) continue;
    load_row(p.v.row(b, hk, jr), p.v.dtype, p.dv, 1.f, row.data());
    for (int64_t e = 0; e < p.dv; ++e) vT[e * kTile + x] = row[e];
  }
}

// A bf16 row of n elements as the A operand of gemm_bf16: n rounded up to even, zero-padded.
inline void copy_pairs_row(const void* src, int64_t n, uint16_t* dst) {
  std::memcpy(dst, src, n * sizeof(uint16_t));
  if (n % 2) dst[n] = 0;
}

// Q' = [scale q, u] and dO of a query tile, zero-padded to d'_pad / dv_pad columns and 64 rows
// (and the bf16 rows of Q and dO for s16 / dp16).
void pack_rows(const BwdCall& c, BwdScratch& w, int64_t b, int64_t h, const TileTokens& qt) {
  const core::Problem& p = *c.p;
  const TensorView& u = p.spec->mods.low_rank_u;
  // The fp32 rows serve S and dK (Q'), dP and dV (dO): none of them under kv16.
  const bool f32 = !c.kv16;
  if (f32) {
    std::fill(w.q.get(), w.q.get() + kTile * c.d_pad, 0.f);
    std::fill(w.dout.get(), w.dout.get() + kTile * c.dv_pad, 0.f);
  }
  for (int64_t r = 0; r < qt.count; ++r) {
    const int64_t i = qt.at(r), row = p.seqs[b].q_start + i;
    if (f32) {
      float* q = w.q.get() + r * c.d_pad;
      load_row(p.q.row(b, h, row), p.q.dtype, p.d, p.scale, q);
      for (int64_t e = p.d; e < c.d_eff; ++e)
        q[e] = static_cast<const float*>(u.data)[b * u.strides[0] + h * u.strides[1] +
                                                 i * u.strides[2] + (e - p.d) * u.strides[3]];
      load_row(c.dout.row(b, h, row), c.dout.dtype, p.dv, 1.f, w.dout.get() + r * c.dv_pad);
    }
    if (c.s16) copy_pairs_row(p.q.row(b, h, row), p.d, w.q16.get() + r * 2 * c.d_pairs);
    if (c.dp16) copy_pairs_row(c.dout.row(b, h, row), p.dv, w.dout16.get() + r * 2 * c.dv_pairs);
  }
}

// The normalizer's backward on one row of a tile, in place: S (after score mods; -inf where
// masked) -> P, the weights that multiply V; dP -> dT, the gradient of the score before the
// softcap. Adds sum_j dS_j to *dbeta when given (sigmoid).
template <NormalizerKind kNorm>
void row_grads(const BwdCall& c, float* HWY_RESTRICT sr, float* HWY_RESTRICT dr, int64_t b,
               int64_t h, int64_t i, float softcap, double* dbeta) {
  const Normalizer& norm = c.p->spec->normalizer;
  const DF d;
  const size_t N = hn::Lanes(d);
  const VF zero = hn::Zero(d), one = hn::Set(d, 1.f), ninf = hn::Set(d, kNegInf);
  // The normalized kernel is a softmax over p log f(s'), its stat that softmax's LSE.
  constexpr bool kLse = is_softmax_family(kNorm) || kNorm == NormalizerKind::kKernel;
  float lse = 0.f, ls = 1.f;
  bool empty = false;  // a row with no allowed key (no weight at all): no gradient
  if constexpr (kLse) {
    lse = c.stat(b, h, i);
    empty = lse == kNegInf;
  }
  if (kNorm == NormalizerKind::kKernel && norm.length_scale)
    ls = length_scale<float>(c.mask(b, h).allowed_keys[i]);
  if (empty) {
    std::fill(sr, sr + kTile, 0.f);
    std::fill(dr, dr + kTile, 0.f);
    return;
  }
  const VF vD = hn::Set(d, kLse ? c.d_row(b, h, i) : 0.f);
  const VF vcap = hn::Set(d, softcap), vinv_cap = hn::Set(d, softcap != 0.f ? 1.f / softcap : 0.f);
  VF dsum = zero;
  for (size_t x = 0; x < kTile; x += N) {
    const VF s = hn::LoadU(d, sr + x), dp = hn::LoadU(d, dr + x);
    VF pv, ds;
    if constexpr (is_softmax_family(kNorm)) {
      pv = hn::Exp(d, hn::Sub(s, hn::Set(d, lse)));
      ds = hn::Mul(pv, hn::Sub(dp, vD));
    } else if constexpr (kNorm == NormalizerKind::kSigmoid) {
      const VF z = hn::Add(s, hn::Set(d, c.beta[b]));
      const VF ez = hn::Exp(d, hn::Neg(hn::Abs(z)));  // exp(-|z|) in [0, 1]
      const VF q = hn::Div(one, hn::Add(one, ez));
      const VF live = hn::IfThenElseZero(hn::Gt(s, ninf), q);  // 0 where masked
      pv = hn::Mul(hn::IfThenElse(hn::Ge(z, zero), one, ez), live);
      // sigmoid'(z) = P (1 - P) = e^-|z| / (1 + e^-|z|)^2: no cancellation at large |z|.
      ds = hn::Mul(dp, hn::Mul(hn::Mul(ez, q), live));
      dsum = hn::Add(dsum, ds);
    } else if constexpr (kNorm == NormalizerKind::kKernel) {
      // P = exp(p log f(s') - LSE); dS = P (dP - D) p ls (log f)'(s'), 0 where P is.
      const VF sp = hn::IfThenElseZero(hn::Gt(s, ninf), hn::Mul(s, hn::Set(d, ls)));  // s' = s ls
      const VF t = kernel_log_weight(d, sp, norm.feature, norm.power);
      pv = hn::IfThenElseZero(hn::Gt(s, ninf), hn::Exp(d, hn::Sub(t, hn::Set(d, lse))));
      ds = hn::Mul(hn::Mul(pv, hn::Sub(dp, vD)),
                   hn::Mul(hn::Set(d, norm.power * ls), dlog_kernel_feature(d, sp, norm.feature)));
      ds = hn::IfThenElseZero(hn::Gt(pv, zero), ds);
    } else {  // ReLA
      pv = hn::Max(s, zero);
      ds = hn::IfThenElseZero(hn::Gt(s, zero), dp);
    }
    if (softcap != 0.f) {  // S = c tanh(T / c): dT = dS (1 - (S / c)^2); masked S clamp to 0
      const VF t = hn::Mul(hn::Min(hn::Max(s, hn::Neg(vcap)), vcap), vinv_cap);
      ds = hn::Mul(ds, hn::NegMulAdd(t, t, one));
    }
    hn::StoreU(pv, d, sr + x);
    hn::StoreU(ds, d, dr + x);
  }
  if (dbeta) *dbeta += hn::GetLane(hn::SumOfLanes(d, dsum));
}

// Step 2 for one tile pair: P into w.s, dT into w.dp.
template <NormalizerKind kNorm, bool kMods>
void tile_grads(BwdCall& c, BwdScratch& w, int64_t b, int64_t h, const TileTokens& qt,
                const TileTokens& kt, const core::BlockEntry& ent, int64_t unit,
                const ScoreModEval<float>& mods, double* dbeta) {
  const core::Problem& p = *c.p;
  float *S = w.s.get(), *dP = w.dp.get();
  if (c.s16)
    gemm_bf16(w.q16.get(), 2 * c.d_pairs,
              reinterpret_cast<const uint16_t*>(c.k_t(unit, ent.k_tile)), c.d_pairs, S, kTile,
              qt.count, kTile, nullptr, false, p.scale);
  else
    gemm(w.q.get(), c.d_pad, c.k_t(unit, ent.k_tile), kTile, c.d_eff, S, kTile, qt.count, kTile,
         nullptr, false);
  score_tile<kMods>(S, mods, p.seqs[b].offset, qt, kt, c.mask(b, h), ent, nullptr, nullptr);
  if (c.dp16)
    gemm_bf16(w.dout16.get(), 2 * c.dv_pairs,
              reinterpret_cast<const uint16_t*>(c.v_t(unit, ent.k_tile)), c.dv_pairs, dP, kTile,
              qt.count, kTile, nullptr, false, 1.f);
  else
    gemm(w.dout.get(), c.dv_pad, c.v_t(unit, ent.k_tile), kTile, p.dv, dP, kTile, qt.count, kTile,
         nullptr, false);
  for (int64_t r = 0; r < qt.count; ++r)
    row_grads<kNorm>(c, S + r * kTile, dP + r * kTile, b, h, qt.at(r), mods.softcap, dbeta);
}

// Pass B's extras of one tile pair from dT (w.dp): dBias, the forget gate's row sums, and the
// partial sums of dslopes and dtable.
void row_extras(BwdCall& c, const float* dT, int64_t b, int64_t h, const TileTokens& qt,
                const TileTokens& kt, const ScoreModEval<float>& mods, double* part) {
  const core::Problem& p = *c.p;
  const AttentionGrads& g = *c.grads;
  const int64_t offset = p.seqs[b].offset;
  const TensorView& db = g.dbias;
  const int64_t db_base = db.defined() ? (db.shape[0] == 1 ? 0 : b) * db.strides[0] +
                                             (db.shape[1] == 1 ? 0 : h) * db.strides[1]
                                       : 0;
  const bool slopes = g.dalibi_slopes.defined(), table = g.drelative_table.defined();
  // dbias rows on vectors: an fp32 dbias with unit key stride and a run of consecutive keys.
  const bool bias_rows =
      db.defined() && db.dtype == DType::kF32 && db.strides[3] == 1 && !kt.tokens;
  const bool per_element = (db.defined() && !bias_rows) || slopes || table || !c.dc.empty();
  const DF d;
  const size_t N = hn::Lanes(d);
  for (int64_t r = 0; r < qt.count; ++r) {
    const int64_t i = qt.at(r), ia = i + offset;
    const float* row = dT + r * kTile;
    if (bias_rows) {
      float* dst = static_cast<float*>(db.data) + db_base + i * db.strides[2] + kt.start;
      int64_t x = 0;
      for (; x + static_cast<int64_t>(N) <= kt.count; x += N)
        hn::StoreU(hn::Add(hn::LoadU(d, dst + x), hn::LoadU(d, row + x)), d, dst + x);
      for (; x < kt.count; ++x) dst[x] += row[x];
    }
    if (!per_element) continue;
    double sum = 0;
    for (int64_t x = 0; x < kt.count; ++x) {
      const double v = row[x];
      if (v == 0) continue;
      const int64_t j = kt.at(x);
      if (db.defined() && !bias_rows)
        add_at(db, db_base + i * db.strides[2] + j * db.strides[3], v);
      if (slopes)
        part[kPartSlopes] -=
            v * static_cast<double>(mods.alibi == AlibiMode::kCausal ? ia - j
                                                                     : (ia > j ? ia - j : j - ia));
      if (table) part[kPartTable + mods.bucket_of[j - ia + mods.bucket_origin]] += v;
      sum += v;
    }
    if (!c.dc.empty()) c.dc[(b * p.hq + h) * p.max_nk + ia] += sum;
  }
}

// Pass A's products on the bf16 dot products (kv16): dV^T += dO^T P and dK^T += Q^T dT (the scale
// applied at the store) for the tile's `rows` queries, the accumulators [dim][64] (keys as
// columns).
void kv_bf16(const BwdCall& c, BwdScratch& w, int64_t rows, float* dKT, float* dVT) {
  const core::Problem& p = *c.p;
  const void* qr[kTile];
  const void* dr[kTile];
  for (int64_t r = 0; r < kTile; ++r) {
    qr[r] = r < rows ? w.q16.get() + r * 2 * c.d_pairs : nullptr;
    dr[r] = r < rows ? w.dout16.get() + r * 2 * c.dv_pairs : nullptr;
  }
  transpose_rows_to_words(qr, 2 * p.d, w.words.get());
  split_word_halves(w.words.get(), c.d_pairs, w.qT16.get());
  transpose_rows_to_words(dr, 2 * p.dv, w.words.get());
  split_word_halves(w.words.get(), c.dv_pairs, w.doT16.get());
  // P and dT as query pairs (rows past the tile's queries are zero pairs).
  const int64_t pairs = (rows + 1) / 2;
  for (auto [src, dst] : {std::pair{w.s.get(), w.p2.get()}, {w.dp.get(), w.dt2.get()}}) {
    to_bf16_rows(src, kTile, w.dt16.get(), kTile, rows, kTile);
    for (int64_t i = 0; i < pairs; ++i)
      pack_v_pairs_bf16(w.dt16.get() + 2 * i * kTile,
                        2 * i + 1 < rows ? w.dt16.get() + (2 * i + 1) * kTile : nullptr, kTile,
                        kTile, dst + i * kTile);
  }
  gemm_bf16(w.doT16.get(), kTile, reinterpret_cast<const uint16_t*>(w.p2.get()), pairs, dVT, kTile,
            p.dv, kTile, nullptr, true, 1.f);
  gemm_bf16(w.qT16.get(), kTile, reinterpret_cast<const uint16_t*>(w.dt2.get()), pairs, dKT, kTile,
            p.d, kTile, nullptr, true, 1.f);  // (mul would scale the sum so far too)
}

// Step 3 (pass A): dK and dV of key tile u of (b, hk); dw and the forget gate's column sums.
template <NormalizerKind kNorm, bool kMods>
void key_tile(BwdCall& c, BwdScratch& w, int64_t b, int64_t hk, int64_t u) {
  const core::Problem& p = *c.p;
  if (u >= c.mask(b, 0).k.num_tiles()) return;
  const TileTokens kt = c.mask(b, 0).k.tile(u);  // the tilings of b are the same for every head
  const TensorView& dw = c.grads->dlow_rank_w;
  float *dK = w.acc0.get(), *dV = w.acc1.get();
  std::fill(dK, dK + kTile * c.d_pad, 0.f);
  std::fill(dV, dV + kTile * c.dv_pad, 0.f);
  for (int64_t g = 0; g < p.group; ++g) {
    const int64_t h = hk * p.group + g, unit = c.unit(b, h);
    ScoreModEval<float> mods;
    if constexpr (kMods) mods = core::resolve_score_mods(p, c.tables[b], b, h, false);
    const core::BlockMask& bm = c.mask(b, h);
    for (const Visit& vis : c.by_key[c.masks.index(b, h)][u]) {
      const TileTokens qt = bm.q.tile(vis.q_tile);
      pack_rows(c, w, b, h, qt);
      tile_grads<kNorm, kMods>(c, w, b, h, qt, kt, bm.entries[vis.entry], unit, mods, nullptr);
      if (c.kv16) {
        kv_bf16(c, w, qt.count, dK, dV);
      } else {  // dV += P^T dO, dK' += dT^T Q' (Q' carries the scale)
        gemm<true>(w.s.get(), kTile, w.dout.get(), c.dv_pad, qt.count, dV, c.dv_pad, kt.count,
                   c.dv_pad, nullptr, true);
        gemm<true>(w.dp.get(), kTile, w.q.get(), c.d_pad, qt.count, dK, c.d_pad, kt.count, c.d_pad,
                   nullptr, true);
      }
      if (!c.dc.empty()) {  // t = ... + c[i'] - c[j]: the key side
        for (int64_t x = 0; x < kt.count; ++x) {
          double sum = 0;
          for (int64_t r = 0; r < qt.count; ++r) sum += w.dp[r * kTile + x];
          c.dc[(b * p.hq + h) * p.max_nk + kt.at(x)] -= sum;
        }
      }
    }
    if (c.lowrank) {  // dK' columns d.. are this query head's dw
      for (int64_t x = 0; x < kt.count; ++x) {
        float* dkx = dK + x * c.d_pad;
        if (dw.defined())
          for (int64_t e = p.d; e < c.d_eff; ++e)
            core::store_from_double(dw.data, dw.dtype,
                                    b * dw.strides[0] + h * dw.strides[1] +
                                        kt.at(x) * dw.strides[2] + (e - p.d) * dw.strides[3],
                                    dkx[e]);
        std::fill(dkx + p.d, dkx + c.d_eff, 0.f);
      }
    }
  }
  std::vector<float> kx(c.kv16 ? p.d : 0), vx(c.kv16 ? p.dv : 0);
  for (int64_t x = 0; x < kt.count; ++x) {
    const int64_t j = p.seqs[b].k_start + kt.at(x);
    const float *krow = dK + x * c.d_pad, *vrow = dV + x * c.dv_pad;
    if (c.kv16) {  // dK^T and dV^T: [dim][64]; dK^T without the scale
      for (int64_t e = 0; e < p.d; ++e) kx[e] = dK[e * kTile + x] * p.scale;
      for (int64_t e = 0; e < p.dv; ++e) vx[e] = dV[e * kTile + x];
      krow = kx.data();
      vrow = vx.data();
    }
    store_row(krow, p.d, c.g->dk.dtype, c.g->dk.row(b, hk, j));
    store_row(vrow, p.dv, c.g->dv.dtype, c.g->dv.row(b, hk, j));
  }
}

// Step 4 (pass B): dQ (and du) of query tile t of (b, h), and the row-owned extras.
template <NormalizerKind kNorm, bool kMods>
void query_tile(BwdCall& c, BwdScratch& w, int64_t b, int64_t h, int64_t t) {
  const core::Problem& p = *c.p;
  const AttentionGrads& g = *c.grads;
  const core::BlockMask& bm = c.mask(b, h);
  if (t >= bm.q.num_tiles()) return;
  const TileTokens qt = bm.q.tile(t);
  const int64_t unit = c.unit(b, h);
  ScoreModEval<float> mods;
  if constexpr (kMods) mods = core::resolve_score_mods(p, c.tables[b], b, h, false);
  double* part = c.part_of(b, h, t);
  double* dbeta = kNorm == NormalizerKind::kSigmoid && part ? part + kPartBeta : nullptr;
  const bool extras = g.dbias.defined() || g.dalibi_slopes.defined() ||
                      g.drelative_table.defined() || !c.dc.empty();
  float* dQ = w.acc0.get();
  std::fill(dQ, dQ + kTile * c.d_pad, 0.f);
  pack_rows(c, w, b, h, qt);
  for (int64_t e = bm.row_begin[t]; e < bm.row_begin[t + 1]; ++e) {
    const core::BlockEntry& ent = bm.entries[e];
    const TileTokens kt = bm.k.tile(ent.k_tile);
    tile_grads<kNorm, kMods>(c, w, b, h, qt, kt, ent, unit, mods, dbeta);
    if (c.dq16) {  // dT is 0 past the tile's keys, as are K's pairs there
      to_bf16_rows(w.dp.get(), kTile, w.dt16.get(), kTile, qt.count, kTile);
      gemm_bf16(w.dt16.get(), kTile, reinterpret_cast<const uint16_t*>(c.k_rows(unit, ent.k_tile)),
                kTile / 2, dQ, c.d_pad, qt.count, c.d_pad, nullptr, true, 1.f);
    } else {
      gemm(w.dp.get(), kTile, c.k_rows(unit, ent.k_tile), c.d_pad, kt.count, dQ, c.d_pad, qt.count,
           c.d_pad, nullptr, true);
    }
    if (extras) row_extras(c, w.dp.get(), b, h, qt, kt, mods, part);
  }
  const TensorView& du = g.dlow_rank_u;
  for (int64_t r = 0; r < qt.count; ++r) {
    const int64_t i = qt.at(r);
    float* dq = dQ + r * c.d_pad;
    if (du.defined())
      for (int64_t e = p.d; e < c.d_eff; ++e)
        core::store_from_double(
            du.data, du.dtype,
            b * du.strides[0] + h * du.strides[1] + i * du.strides[2] + (e - p.d) * du.strides[3],
            dq[e]);
    for (int64_t e = 0; e < p.d; ++e) dq[e] *= p.scale;
    store_row(dq, p.d, c.g->dq.dtype, c.g->dq.row(b, h, p.seqs[b].q_start + i));
  }
}

// Steps 3 and 4 for the batch elements whose K/V are packed: [b0, b1).
template <NormalizerKind kNorm, bool kMods>
void run_passes(BwdCall& c, std::vector<std::unique_ptr<BwdScratch>>& scratch, int64_t b0,
                int64_t b1) {
  const core::Problem& p = *c.p;
  const int64_t key_tasks = (b1 - b0) * p.hk * c.max_k_tiles;
  parallel_for(key_tasks, c.threads, [&](int64_t task, int worker) {
    const int64_t bh = task / c.max_k_tiles;
    key_tile<kNorm, kMods>(c, *scratch[worker], b0 + bh / p.hk, bh % p.hk, task % c.max_k_tiles);
  });
  const int64_t row_tasks = static_cast<int64_t>(c.row_groups.size()) * c.q_tiles;
  parallel_for(row_tasks, c.threads, [&](int64_t task, int worker) {
    for (int64_t bh : c.row_groups[task / c.q_tiles]) {
      const int64_t b = bh / p.hq;
      if (b >= b0 && b < b1)
        query_tile<kNorm, kMods>(c, *scratch[worker], b, bh % p.hq, task % c.q_tiles);
    }
  });
}

// Step 0: dO through the gate and ReLA, D, dG and the partial dgain of (b, h).
void epilogue_rows(BwdCall& c, int64_t b, int64_t h, const core::RowOperand& raw_o, double* dgain) {
  const core::Problem& p = *c.p;
  const AttentionSpec& spec = *p.spec;
  const Normalizer& norm = spec.normalizer;
  const core::RowOperand& dg = c.g->dgate;
  const int64_t dv = p.dv;
  std::vector<float> o(dv), go(dv), gate(dv), dgv(dv), raw(dv);
  for (int64_t i = 0; i < p.seqs[b].nq; ++i) {
    const int64_t row = p.seqs[b].q_start + i;
    load_row(p.out.row(b, h, row), p.out.dtype, dv, 1.f, o.data());
    load_row(c.g->grad_out.row(b, h, row), c.g->grad_out.dtype, dv, 1.f, go.data());
    double acc = 0;
    for (int64_t e = 0; e < dv; ++e) acc += static_cast<double>(o[e]) * go[e];
    c.D[(b * p.hq + h) * p.max_nq + i] = static_cast<float>(acc);
    // out = sigmoid(G) O1: dG = dO O1 sigmoid'(G) = dO out sigmoid(-G) (1 - sigmoid(G) loses
    // it past G ~ 17 in fp32); dO1 = dO sigmoid(G).
    if (spec.gate_kind == GateKind::kElementwise) {
      load_row(p.gate.row(b, h, row), p.gate.dtype, dv, 1.f, gate.data());
      for (int64_t e = 0; e < dv; ++e) {
        dgv[e] = go[e] * o[e] * sigmoid(-gate[e]);
        go[e] *= sigmoid(gate[e]);
      }
      if (dg.defined()) store_row(dgv.data(), dv, dg.dtype, dg.row(b, h, row));
    } else if (spec.gate_kind == GateKind::kPerHead) {
      const float g = load_float<float>(p.gate.row(b, h, row), p.gate.dtype, 0);
      const float sg = sigmoid(g);
      double dot = 0;
      for (int64_t e = 0; e < dv; ++e) {
        dot += static_cast<double>(go[e]) * o[e];
        go[e] *= sg;
      }
      if (dg.defined()) core::store_from_double(dg.row(b, h, row), dg.dtype, 0, dot * sigmoid(-g));
    }
    // O1 = gain O / r, r = sqrt(mean(O^2) + eps):
    // dO = gain dO1 / r - O (sum_k gain_k dO1_k O_k) / (dv r^3); dgain += dO1 O / r.
    if (norm.kind == NormalizerKind::kReLA) {
      load_row(raw_o.row(b, h, row), DType::kF32, dv, 1.f, raw.data());
      double ms = 0, dot = 0;
      for (int64_t e = 0; e < dv; ++e) ms += static_cast<double>(raw[e]) * raw[e];
      const double r = std::sqrt(ms / dv + norm.rela_eps);
      const float* gain = static_cast<const float*>(norm.rela_gain.data);
      const int64_t gs = norm.rela_gain.strides[0];
      for (int64_t e = 0; e < dv; ++e) {
        dot += static_cast<double>(gain[e * gs]) * go[e] * raw[e];
        if (dgain) dgain[e] += static_cast<double>(go[e]) * raw[e] / r;
      }
      const double k = dot / (dv * r * r * r);
      for (int64_t e = 0; e < dv; ++e)
        go[e] = static_cast<float>(gain[e * gs] * go[e] / r - raw[e] * k);
    }
    if (!c.dout_buf.empty()) store_row(go.data(), dv, DType::kF32, c.dout.row(b, h, row));
  }
}

Status BackwardImpl(const core::Problem& p, const core::GradOperands& g,
                    const AttentionGrads& grads) {
  const AttentionSpec& spec = *p.spec;
  const Normalizer& norm = spec.normalizer;
  BwdCall c;
  c.p = &p;
  c.g = &g;
  c.grads = &grads;
  c.threads = resolve_threads(p.num_threads);
  c.lowrank = spec.mods.low_rank_u.defined();
  c.d_eff = p.d + (c.lowrank ? spec.mods.low_rank_u.shape[3] : 0);
  c.d_pad = static_cast<int64_t>(vec_pad(c.d_eff));
  c.dv_pad = static_cast<int64_t>(vec_pad(p.dv));
  const bool dot = bf16_dot_enabled() && p.k.dtype == DType::kBF16;
  c.s16 = dot && !c.lowrank && p.q.dtype == DType::kBF16;
  c.dq16 = c.s16;
  if (c.dq16) c.d_pad = (c.d_pad + 15) / 16 * 16;  // the bf16 GEMM's columns come in 16s
  c.units_per_batch = c.lowrank ? p.hq : p.hk;
  const bool mods = spec.mods.per_element();
  const bool count_rows = norm.kind == NormalizerKind::kKernel && norm.length_scale;
  c.masks = core::build_block_masks(p, count_rows, c.threads);
  for (const core::BlockMask& bm : c.masks.masks) {
    std::vector<std::vector<Visit>> keys(bm.k.num_tiles());
    for (int64_t t = 0; t < bm.q.num_tiles(); ++t)
      for (int64_t e = bm.row_begin[t]; e < bm.row_begin[t + 1]; ++e)
        keys[bm.entries[e].k_tile].push_back({static_cast<int32_t>(t), e});
    c.by_key.push_back(std::move(keys));
    c.max_k_tiles = std::max(c.max_k_tiles, bm.k.num_tiles());
    c.q_tiles = std::max(c.q_tiles, bm.q.num_tiles());
  }
  for (int64_t b = 0; b < p.batch; ++b) {
    if (mods) c.tables.push_back(core::build_score_tables<float>(p, b, false));
    c.beta.push_back(norm.beta ? static_cast<float>(*norm.beta)
                               : -std::log(static_cast<float>(p.seqs[b].nk)));
  }

  // Step 0. ReLA needs O itself: the forward pass recomputes it without the RMS and the gate.
  std::vector<float> raw_buf;
  core::RowOperand raw_o;
  if (norm.kind == NormalizerKind::kReLA) {
    core::Problem fp = p;
    raw_o = scratch_rows(p, p.dv, raw_buf);
    fp.out = raw_o;
    fp.row_stat = {};
    fp.row_max = {};
    fp.entropy = {};
    fp.col_mass = {};
    fp.raw_output = true;
    const Status st = forward(fp);
    if (!st.ok()) return st;
  }
  c.dout = g.grad_out;
  if (spec.gate_kind != GateKind::kNone || norm.kind == NormalizerKind::kReLA)
    c.dout = scratch_rows(p, p.dv, c.dout_buf);
  c.D.assign(p.batch * p.hq * p.max_nq, 0.f);
  std::vector<double> dgain;
  if (grads.drela_gain.defined()) dgain.assign(p.batch * p.hq * p.dv, 0.0);
  parallel_for(p.batch * p.hq, c.threads, [&](int64_t task, int) {
    epilogue_rows(c, task / p.hq, task % p.hq, raw_o,
                  dgain.empty() ? nullptr : &dgain[task * p.dv]);
  });
  if (grads.dsinks.defined()) {
    for (int64_t h = 0; h < p.hq; ++h) {
      const double sink = static_cast<const float*>(norm.sinks.data)[h * norm.sinks.strides[0]];
      double acc = 0;
      for (int64_t b = 0; b < p.batch; ++b)
        for (int64_t i = 0; i < p.seqs[b].nq; ++i) {
          const double lse = c.stat(b, h, i);
          if (std::isfinite(lse)) acc -= std::exp(sink - lse) * c.d_row(b, h, i);
        }
      core::store_from_double(grads.dsinks.data, grads.dsinks.dtype, h * grads.dsinks.strides[0],
                              acc);
    }
  }
  if (!dgain.empty())
    for (int64_t e = 0; e < p.dv; ++e) {
      double acc = 0;
      for (int64_t bh = 0; bh < p.batch * p.hq; ++bh) acc += dgain[bh * p.dv + e];
      core::store_from_double(grads.drela_gain.data, grads.drela_gain.dtype,
                              e * grads.drela_gain.strides[0], acc);
    }

  // The extras' accumulators; dbias is summed into in place, so it starts at zero.
  const TensorView& db = grads.dbias;
  if (db.defined()) {
    const int es = dtype_size(db.dtype);  // fp32 or fp64: zero bits are 0.0 either way
    for (int64_t x0 = 0; x0 < db.shape[0]; ++x0)
      for (int64_t x1 = 0; x1 < db.shape[1]; ++x1)
        for (int64_t x2 = 0; x2 < db.shape[2]; ++x2) {
          char* row = static_cast<char*>(db.data) +
                      (x0 * db.strides[0] + x1 * db.strides[1] + x2 * db.strides[2]) * es;
          if (db.strides[3] == 1)
            std::memset(row, 0, db.shape[3] * es);
          else
            for (int64_t x3 = 0; x3 < db.shape[3]; ++x3)
              std::memset(row + x3 * db.strides[3] * es, 0, es);
        }
  }
  const int64_t buckets = grads.drelative_table.defined() ? grads.drelative_table.shape[1] : 0;
  if (grads.dalibi_slopes.defined() || grads.dbeta.defined() || buckets > 0) {
    c.part_width = kPartTable + buckets;
    c.part.assign(p.batch * p.hq * c.q_tiles * c.part_width, 0.0);
  }
  if (grads.dforget_log_f.defined()) c.dc.assign(p.batch * p.hq * p.max_nk, 0.0);
  // Pass B's groups: the (b, h) that add into one dbias slice run in one task, in order.
  {
    const bool share_b = db.defined() && db.shape[0] == 1,
               share_h = db.defined() && db.shape[1] == 1;
    std::vector<std::vector<int64_t>> by_slice(p.batch * p.hq);
    for (int64_t b = 0; b < p.batch; ++b)
      for (int64_t h = 0; h < p.hq; ++h)
        by_slice[(share_b ? 0 : b) * p.hq + (share_h ? 0 : h)].push_back(b * p.hq + h);
    for (auto& s : by_slice)
      if (!s.empty()) c.row_groups.push_back(std::move(s));
  }

  c.dp16 = dot && p.v.dtype == DType::kBF16 && c.dout.dtype == DType::kBF16;
  c.kv16 = c.s16 && c.dp16;
  c.d_pairs = (p.d + 1) / 2;
  c.dv_pairs = (p.dv + 1) / 2;
  c.kt_floats = c.d_eff * kTile;  // fp32 K'^T, or K^T's pairs (fewer words)
  c.vt_floats = p.dv * kTile;
  c.kr_floats = kTile * c.d_pad;
  c.unit_floats = c.max_k_tiles * (c.kt_floats + c.vt_floats + c.kr_floats);
  std::vector<std::unique_ptr<BwdScratch>> scratch;
  for (int i = 0; i < c.threads; ++i) scratch.push_back(std::make_unique<BwdScratch>(c));

  const bool ok = for_each_packed_chunk(
      p.batch, c.units_per_batch, c.unit_floats, 1, c.packed, c.unit_begin,
      [&](int64_t b0, int64_t b1) {
        const int64_t units = (b1 - b0) * c.units_per_batch;
        parallel_for(units * c.max_k_tiles, c.threads, [&](int64_t task, int) {
          pack_tile(c, c.unit_begin + task / c.max_k_tiles, task % c.max_k_tiles);
        });
        dispatch(norm.kind, mods, [&](auto kn, auto km) {
          run_passes<decltype(kn)::value, decltype(km)::value>(c, scratch, b0, b1);
        });
      });
  if (!ok) return Status(StatusCode::kInternal, "cpu backward: out of memory for packed K/V");

  // Reductions of the partial sums, in a fixed order.
  if (grads.dalibi_slopes.defined())
    for (int64_t h = 0; h < p.hq; ++h)
      core::store_from_double(grads.dalibi_slopes.data, grads.dalibi_slopes.dtype,
                              h * grads.dalibi_slopes.strides[0], c.part_sum(h, kPartSlopes));
  if (grads.dbeta.defined()) {
    double acc = 0;
    for (int64_t h = 0; h < p.hq; ++h) acc += c.part_sum(h, kPartBeta);
    core::store_from_double(grads.dbeta.data, grads.dbeta.dtype, 0, acc);
  }
  const TensorView& dt = grads.drelative_table;
  for (int64_t h = 0; h < p.hq && buckets > 0; ++h)
    for (int64_t x = 0; x < buckets; ++x)
      core::store_from_double(dt.data, dt.dtype, h * dt.strides[0] + x * dt.strides[1],
                              c.part_sum(h, kPartTable + x));
  // Forget gate: d log f_m = sum_{n >= m} dc_n (c is a prefix sum over key positions).
  const TensorView& df = grads.dforget_log_f;
  if (df.defined())
    for (int64_t b = 0; b < p.batch; ++b)
      for (int64_t h = 0; h < p.hq; ++h) {
        double acc = 0;
        for (int64_t m = p.seqs[b].nk - 1; m >= 0; --m) {
          acc += c.dc[(b * p.hq + h) * p.max_nk + m];
          core::store_from_double(df.data, df.dtype,
                                  b * df.strides[0] + h * df.strides[1] + m * df.strides[2], acc);
        }
      }
  return {};
}

}  // namespace HWY_NAMESPACE
}  // namespace attnkit::cpu
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace attnkit::cpu {

HWY_EXPORT(BackwardImpl);

Status backward_supports(const core::Problem& p) {
  const NormalizerKind n = p.spec->normalizer.kind;
  if ((p.softmax_family() || n == NormalizerKind::kKernel) && !p.row_stat.defined())
    return Status(StatusCode::kInvalidArgument,
                  p.softmax_family()
                      ? "row_stat is missing: the backward pass needs the forward's LSE"
                      : "row_stat is missing: the backward pass needs the forward's log row sum "
                        "(normalized kernel)");
  return {};
}

Status backward(const core::Problem& p, const core::GradOperands& g, const AttentionGrads& grads) {
  return HWY_DYNAMIC_DISPATCH(BackwardImpl)(p, g, grads);
}

}  // namespace attnkit::cpu
#endif  // HWY_ONCE
