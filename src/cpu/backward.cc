// CPU backward attention for the softmax family (softmax, softmax with sink): FlashAttention-2's
// recompute, no N x N buffer, every mask through the same BlockMask as the forward pass.
//
// Data flow, per call:
//   0. Per row: D_i = dO_i . O_i (and dsink_h = -sum_i exp(sink_h - LSE_i) D_i).
//   1. Pack, once per (batch, kv head) and key tile: K^T [d][64] and V^T [dv][64] (B operands of
//      S = Q' K^T and dP = dO V^T) and K [64][d_pad] (B operand of dQ = dS K).
//   2. Pass A, one task per (batch, kv head, key tile): for each query head of the group and each
//      query tile that visits the key tile (the BlockMask transposed): S, P = exp(S - LSE),
//      dV += P^T dO, dP = dO V^T, dS = P (dP - D), dK += dS^T Q'. The task owns its dK, dV rows.
//   3. Pass B, one task per (batch, query head, query tile): the same S, P, dP, dS for each
//      visited key tile, dQ += dS K. The task owns its dQ rows.
// No atomics and a fixed order inside every task: gradients are bit-identical for any thread
// count (the `deterministic` option costs nothing here). Recomputing S and dP in both passes
// makes 7 tile GEMMs per visited tile pair against the 5 of a single pass with atomics.
#include <algorithm>
#include <cmath>
#include <vector>

// Highway's per-target compilation: the order of these includes matters.
// clang-format off
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/backward.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>
#include <hwy/contrib/math/math-inl.h>
// clang-format on

#include "cpu/backward.h"
#include "cpu/parallel.h"
#include "cpu/tile_common.h"
#include "cpu/tile_ops-inl.h"

#ifndef ATTNKIT_CPU_BACKWARD_CALL
#define ATTNKIT_CPU_BACKWARD_CALL
namespace attnkit::cpu {

// One visit of a key tile by a query tile: the query tile and its BlockMask entry.
struct Visit {
  int32_t q_tile;
  int64_t entry;
};

struct BwdCall {
  const core::Problem* p = nullptr;
  const core::GradOperands* g = nullptr;
  core::BlockMaskSet masks;
  std::vector<std::vector<std::vector<Visit>>> by_key;  // [mask][key tile] -> visits
  std::vector<float> D;                                 // [b][hq][max_nq]
  int64_t d_pad = 0, dv_pad = 0, max_k_tiles = 0, unit_floats = 0;
  int64_t kt_floats = 0, vt_floats = 0, kr_floats = 0;
  float* packed = nullptr;
  int64_t unit_begin = 0;  // packed units: (b, hk) from unit_begin on
  int threads = 1;

  const core::BlockMask& mask(int64_t b) const { return masks.of(b); }
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
  float lse(int64_t b, int64_t h, int64_t i) const {
    return p->row_stat.at(b, h, p->seqs[b].q_start + i);
  }
  float d_row(int64_t b, int64_t h, int64_t i) const { return D[(b * p->hq + h) * p->max_nq + i]; }
};

}  // namespace attnkit::cpu
#endif  // ATTNKIT_CPU_BACKWARD_CALL

HWY_BEFORE_NAMESPACE();
namespace attnkit::cpu {
namespace HWY_NAMESPACE {

struct BwdScratch {
  hwy::AlignedFreeUniquePtr<float[]> q, dout, s, dp, acc0, acc1;
  explicit BwdScratch(const BwdCall& c)
      : q(hwy::AllocateAligned<float>(kTile * c.d_pad)),
        dout(hwy::AllocateAligned<float>(kTile * c.dv_pad)),
        s(hwy::AllocateAligned<float>(kTile * kTile)),
        dp(hwy::AllocateAligned<float>(kTile * kTile)),
        acc0(hwy::AllocateAligned<float>(kTile * std::max(c.d_pad, c.dv_pad))),
        acc1(hwy::AllocateAligned<float>(kTile * std::max(c.d_pad, c.dv_pad))) {}
};

// Step 1: the packed tiles of key tile t of unit (b, hk).
void pack_tile(BwdCall& c, int64_t unit, int64_t t) {
  const core::Problem& p = *c.p;
  const int64_t b = unit / p.hk, hk = unit % p.hk;
  const core::BlockMask& bm = c.mask(b);
  if (t >= bm.k.num_tiles()) return;
  const TileTokens kt = bm.k.tile(t);
  float *kT = c.k_t(unit, t), *vT = c.v_t(unit, t), *kr = c.k_rows(unit, t);
  std::fill(kT, kT + c.kt_floats, 0.f);
  std::fill(vT, vT + c.vt_floats, 0.f);
  std::fill(kr, kr + c.kr_floats, 0.f);
  std::vector<float> row(std::max(p.d, p.dv));
  for (int64_t x = 0; x < kt.count; ++x) {
    const int64_t j = p.seqs[b].k_start + kt.at(x);
    load_row(p.k.row(b, hk, j), p.k.dtype, p.d, 1.f, kr + x * c.d_pad);
    for (int64_t e = 0; e < p.d; ++e) kT[e * kTile + x] = kr[x * c.d_pad + e];
    load_row(p.v.row(b, hk, j), p.v.dtype, p.dv, 1.f, row.data());
    for (int64_t e = 0; e < p.dv; ++e) vT[e * kTile + x] = row[e];
  }
}

// Q' (scaled) and dO of a query tile, zero-padded to d_pad / dv_pad columns and 64 rows.
void pack_rows(const BwdCall& c, BwdScratch& w, int64_t b, int64_t h, const TileTokens& qt) {
  const core::Problem& p = *c.p;
  std::fill(w.q.get(), w.q.get() + kTile * c.d_pad, 0.f);
  std::fill(w.dout.get(), w.dout.get() + kTile * c.dv_pad, 0.f);
  for (int64_t r = 0; r < qt.count; ++r) {
    const int64_t row = p.seqs[b].q_start + qt.at(r);
    load_row(p.q.row(b, h, row), p.q.dtype, p.d, p.scale, w.q.get() + r * c.d_pad);
    load_row(c.g->grad_out.row(b, h, row), c.g->grad_out.dtype, p.dv, 1.f,
             w.dout.get() + r * c.dv_pad);
  }
}

// S, P = exp(S - LSE) into w.s, then dP = dO V^T and dS = P (dP - D) into w.dp.
void tile_grads(BwdCall& c, BwdScratch& w, int64_t b, int64_t h, const TileTokens& qt,
                const TileTokens& kt, const core::BlockEntry& ent, int64_t unit) {
  const core::Problem& p = *c.p;
  const core::BlockMask& bm = c.mask(b);
  const int64_t rows = qt.count;
  const DF d;
  const size_t N = hn::Lanes(d);
  float *S = w.s.get(), *dP = w.dp.get();
  gemm(w.q.get(), c.d_pad, c.k_t(unit, ent.k_tile), kTile, p.d, S, kTile, rows, kTile, nullptr,
       false);
  score_tile<false>(S, ScoreModEval<float>{}, 0, qt, kt, bm, ent, nullptr, nullptr);
  gemm(w.dout.get(), c.dv_pad, c.v_t(unit, ent.k_tile), kTile, p.dv, dP, kTile, rows, kTile,
       nullptr, false);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = qt.at(r);
    const float lse = c.lse(b, h, i);
    float *sr = S + r * kTile, *dr = dP + r * kTile;
    if (lse == kNegInf) {  // a row with no allowed key: no gradient
      std::fill(sr, sr + kTile, 0.f);
      std::fill(dr, dr + kTile, 0.f);
      continue;
    }
    const VF vl = hn::Set(d, lse), vd = hn::Set(d, c.d_row(b, h, i));
    for (size_t x = 0; x < kTile; x += N) {
      const VF pv = hn::Exp(d, hn::Sub(hn::LoadU(d, sr + x), vl));
      hn::StoreU(pv, d, sr + x);
      hn::StoreU(hn::Mul(pv, hn::Sub(hn::LoadU(d, dr + x), vd)), d, dr + x);
    }
  }
}

// Step 2: dK and dV of key tile u of unit (b, hk).
void key_tile(BwdCall& c, BwdScratch& w, int64_t unit, int64_t u) {
  const core::Problem& p = *c.p;
  const int64_t b = unit / p.hk, hk = unit % p.hk;
  const core::BlockMask& bm = c.mask(b);
  if (u >= bm.k.num_tiles()) return;
  const TileTokens kt = bm.k.tile(u);
  float *dK = w.acc0.get(), *dV = w.acc1.get();
  std::fill(dK, dK + kTile * c.d_pad, 0.f);
  std::fill(dV, dV + kTile * c.dv_pad, 0.f);
  for (int64_t g = 0; g < p.group; ++g) {
    const int64_t h = hk * p.group + g;
    for (const Visit& vis : c.by_key[c.masks.mask_of_batch[b]][u]) {
      const TileTokens qt = bm.q.tile(vis.q_tile);
      pack_rows(c, w, b, h, qt);
      tile_grads(c, w, b, h, qt, kt, bm.entries[vis.entry], unit);
      // dV += P^T dO, dK += dS^T Q' (Q' carries the scale).
      gemm<true>(w.s.get(), kTile, w.dout.get(), c.dv_pad, qt.count, dV, c.dv_pad, kt.count,
                 c.dv_pad, nullptr, true);
      gemm<true>(w.dp.get(), kTile, w.q.get(), c.d_pad, qt.count, dK, c.d_pad, kt.count, c.d_pad,
                 nullptr, true);
    }
  }
  for (int64_t x = 0; x < kt.count; ++x) {
    const int64_t j = p.seqs[b].k_start + kt.at(x);
    store_row(dK + x * c.d_pad, p.d, c.g->dk.dtype, c.g->dk.row(b, hk, j));
    store_row(dV + x * c.dv_pad, p.dv, c.g->dv.dtype, c.g->dv.row(b, hk, j));
  }
}

// Step 3: dQ of query tile t of (b, h).
void query_tile(BwdCall& c, BwdScratch& w, int64_t b, int64_t h, int64_t t) {
  const core::Problem& p = *c.p;
  const core::BlockMask& bm = c.mask(b);
  if (t >= bm.q.num_tiles()) return;
  const TileTokens qt = bm.q.tile(t);
  const int64_t unit = b * p.hk + h / p.group;
  float* dQ = w.acc0.get();
  std::fill(dQ, dQ + kTile * c.d_pad, 0.f);
  pack_rows(c, w, b, h, qt);
  for (int64_t e = bm.row_begin[t]; e < bm.row_begin[t + 1]; ++e) {
    const core::BlockEntry& ent = bm.entries[e];
    const TileTokens kt = bm.k.tile(ent.k_tile);
    tile_grads(c, w, b, h, qt, kt, ent, unit);
    gemm(w.dp.get(), kTile, c.k_rows(unit, ent.k_tile), c.d_pad, kt.count, dQ, c.d_pad, qt.count,
         c.d_pad, nullptr, true);
  }
  for (int64_t r = 0; r < qt.count; ++r) {
    float* dq = dQ + r * c.d_pad;
    for (int64_t e = 0; e < p.d; ++e) dq[e] *= p.scale;
    store_row(dq, p.d, c.g->dq.dtype, c.g->dq.row(b, h, p.seqs[b].q_start + qt.at(r)));
  }
}

Status BackwardImpl(const core::Problem& p, const core::GradOperands& g,
                    const AttentionGrads& grads) {
  BwdCall c;
  c.p = &p;
  c.g = &g;
  c.threads = resolve_threads(p.num_threads);
  c.d_pad = static_cast<int64_t>(vec_pad(p.d));
  c.dv_pad = static_cast<int64_t>(vec_pad(p.dv));
  c.masks = core::build_block_masks(p, false, c.threads);
  for (const core::BlockMask& bm : c.masks.masks) {
    std::vector<std::vector<Visit>> keys(bm.k.num_tiles());
    for (int64_t t = 0; t < bm.q.num_tiles(); ++t)
      for (int64_t e = bm.row_begin[t]; e < bm.row_begin[t + 1]; ++e)
        keys[bm.entries[e].k_tile].push_back({static_cast<int32_t>(t), e});
    c.by_key.push_back(std::move(keys));
    c.max_k_tiles = std::max(c.max_k_tiles, bm.k.num_tiles());
  }
  // Step 0: D = rowsum(dO * O); dsinks.
  c.D.assign(p.batch * p.hq * p.max_nq, 0.f);
  parallel_for(p.batch * p.hq, c.threads, [&](int64_t task, int) {
    const int64_t b = task / p.hq, h = task % p.hq;
    std::vector<float> o(p.dv), go(p.dv);
    for (int64_t i = 0; i < p.seqs[b].nq; ++i) {
      const int64_t row = p.seqs[b].q_start + i;
      load_row(p.out.row(b, h, row), p.out.dtype, p.dv, 1.f, o.data());
      load_row(g.grad_out.row(b, h, row), g.grad_out.dtype, p.dv, 1.f, go.data());
      double acc = 0;
      for (int64_t e = 0; e < p.dv; ++e) acc += static_cast<double>(o[e]) * go[e];
      c.D[(b * p.hq + h) * p.max_nq + i] = static_cast<float>(acc);
    }
  });
  if (grads.dsinks.defined()) {
    const Normalizer& n = p.spec->normalizer;
    for (int64_t h = 0; h < p.hq; ++h) {
      const double sink = static_cast<const float*>(n.sinks.data)[h * n.sinks.strides[0]];
      double acc = 0;
      for (int64_t b = 0; b < p.batch; ++b)
        for (int64_t i = 0; i < p.seqs[b].nq; ++i) {
          const double lse = c.lse(b, h, i);
          if (std::isfinite(lse)) acc -= std::exp(sink - lse) * c.d_row(b, h, i);
        }
      core::store_from_double(grads.dsinks.data, grads.dsinks.dtype, h * grads.dsinks.strides[0],
                              acc);
    }
  }
  c.kt_floats = p.d * kTile;
  c.vt_floats = p.dv * kTile;
  c.kr_floats = kTile * c.d_pad;
  c.unit_floats = c.max_k_tiles * (c.kt_floats + c.vt_floats + c.kr_floats);
  std::vector<std::unique_ptr<BwdScratch>> scratch;
  for (int i = 0; i < c.threads; ++i) scratch.push_back(std::make_unique<BwdScratch>(c));

  const int64_t batch_bytes = p.hk * c.unit_floats * int64_t{sizeof(float)};
  const int64_t per_chunk =
      std::max<int64_t>(1, kPackBudgetBytes / std::max<int64_t>(1, batch_bytes));
  c.packed = thread_workspace(1, std::min(per_chunk, p.batch) * p.hk * c.unit_floats);
  if (!c.packed) return Status(StatusCode::kInternal, "cpu backward: out of memory for packed K/V");
  int64_t q_tiles = 0;
  for (const core::BlockMask& bm : c.masks.masks) q_tiles = std::max(q_tiles, bm.q.num_tiles());
  for (int64_t b0 = 0; b0 < p.batch; b0 += per_chunk) {
    const int64_t b1 = std::min(p.batch, b0 + per_chunk);
    c.unit_begin = b0 * p.hk;
    const int64_t units = (b1 - b0) * p.hk;
    parallel_for(units * c.max_k_tiles, c.threads, [&](int64_t task, int) {
      pack_tile(c, c.unit_begin + task / c.max_k_tiles, task % c.max_k_tiles);
    });
    parallel_for(units * c.max_k_tiles, c.threads, [&](int64_t task, int worker) {
      key_tile(c, *scratch[worker], c.unit_begin + task / c.max_k_tiles, task % c.max_k_tiles);
    });
    parallel_for((b1 - b0) * p.hq * q_tiles, c.threads, [&](int64_t task, int worker) {
      const int64_t t = task % q_tiles, h = (task / q_tiles) % p.hq;
      query_tile(c, *scratch[worker], b0 + task / (q_tiles * p.hq), h, t);
    });
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
  const AttentionSpec& s = *p.spec;
  if (!p.softmax_family())
    return Status(StatusCode::kNotImplemented,
                  std::string("cpu backward: normalizer ") + normalizer_name(s.normalizer.kind) +
                      " is not implemented yet (softmax and sink are)");
  if (s.mods.any())
    return Status(StatusCode::kNotImplemented,
                  "cpu backward: score mods (softcap, ALiBi, bias, low-rank bias, relative "
                  "buckets, forget gate) are not implemented yet");
  if (s.gate_kind != GateKind::kNone)
    return Status(StatusCode::kNotImplemented,
                  "cpu backward: the output gate is not implemented yet");
  if (!p.row_stat.defined())
    return Status(StatusCode::kInvalidArgument,
                  "row_stat is missing: the backward pass needs the forward's LSE");
  return {};
}

Status backward(const core::Problem& p, const core::GradOperands& g, const AttentionGrads& grads) {
  return HWY_DYNAMIC_DISPATCH(BackwardImpl)(p, g, grads);
}

}  // namespace attnkit::cpu
#endif  // HWY_ONCE
