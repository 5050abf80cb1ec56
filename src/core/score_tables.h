// Per-call tables that the score-mod policies read, built once on the host for any backend:
// relative-position bucket of every distance, forget-gate prefix sums, ALiBi slopes, and the
// resolution of a ScoreModEval for one (batch, query head).
#pragma once
#include <vector>

#include "attnkit/variant/score_mods.h"
#include "core/convert.h"
#include "core/problem.h"

namespace attnkit::core {

// Tables for one sequence (all heads).
template <class T>
struct ScoreTables {
  std::vector<int32_t> bucket_of;  // bucket of rel = j - i', index rel + origin
  int64_t bucket_origin = 0;
  std::vector<double> forget_c;  // [hq][nk] prefix sums of log f, per batch element
  std::vector<T> slopes;         // [hq]
  std::vector<T> table;          // [hq][buckets]
  int64_t buckets = 0;
  std::vector<T> lowrank_u, lowrank_w;  // [hq][n][r] (reference only)
  int64_t rank = 0;
};

template <class T>
ScoreTables<T> build_score_tables(const Problem& p, int64_t b, bool dense_extras) {
  const ScoreMods& m = p.spec->mods;
  const Sequence& s = p.seqs[b];
  ScoreTables<T> t;
  if (m.alibi != AlibiMode::kOff) {
    t.slopes.resize(p.hq);
    for (int64_t h = 0; h < p.hq; ++h)
      t.slopes[h] = m.alibi_slopes.defined()
                        ? static_cast<T>(load_as_double(m.alibi_slopes.data, m.alibi_slopes.dtype,
                                                        h * m.alibi_slopes.strides[0]))
                        : static_cast<T>(alibi_default_slope(h, p.hq));
  }
  if (m.relative != RelativeBucketKind::kOff) {
    t.bucket_origin = s.offset + s.nq - 1;
    const int64_t n = s.nk + s.nq - 1 + (s.offset < 0 ? -s.offset : 0) + 1;
    t.bucket_of.resize(n);
    for (int64_t x = 0; x < n; ++x) {
      const int64_t rel = x - t.bucket_origin;
      t.bucket_of[x] =
          static_cast<int32_t>(m.relative == RelativeBucketKind::kT5
                                   ? t5_bucket(rel, m.bidirectional, m.num_buckets, m.max_distance)
                                   : (rel < -m.clip  ? -m.clip
                                      : rel > m.clip ? m.clip
                                                     : rel) +
                                         m.clip);
    }
    const TensorView& tab = m.relative_table;
    t.buckets = tab.shape[1];
    t.table.resize(p.hq * t.buckets);
    for (int64_t h = 0; h < p.hq; ++h)
      for (int64_t x = 0; x < t.buckets; ++x)
        t.table[h * t.buckets + x] = static_cast<T>(
            load_as_double(tab.data, tab.dtype, h * tab.strides[0] + x * tab.strides[1]));
  }
  if (m.forget_log_f.defined()) {
    const TensorView& f = m.forget_log_f;
    t.forget_c.resize(p.hq * s.nk);
    for (int64_t h = 0; h < p.hq; ++h) {
      double c = 0;
      for (int64_t j = 0; j < s.nk; ++j) {
        c +=
            load_as_double(f.data, f.dtype, b * f.strides[0] + h * f.strides[1] + j * f.strides[2]);
        t.forget_c[h * s.nk + j] = c;
      }
    }
  }
  if (dense_extras && m.low_rank_u.defined()) {
    const TensorView &u = m.low_rank_u, &w = m.low_rank_w;
    t.rank = u.shape[3];
    t.lowrank_u.resize(p.hq * s.nq * t.rank);
    t.lowrank_w.resize(p.hq * s.nk * t.rank);
    for (int64_t h = 0; h < p.hq; ++h)
      for (int64_t r = 0; r < t.rank; ++r) {
        for (int64_t i = 0; i < s.nq; ++i)
          t.lowrank_u[(h * s.nq + i) * t.rank + r] = static_cast<T>(load_as_double(
              u.data, u.dtype,
              b * u.strides[0] + h * u.strides[1] + i * u.strides[2] + r * u.strides[3]));
        for (int64_t j = 0; j < s.nk; ++j)
          t.lowrank_w[(h * s.nk + j) * t.rank + r] = static_cast<T>(load_as_double(
              w.data, w.dtype,
              b * w.strides[0] + h * w.strides[1] + j * w.strides[2] + r * w.strides[3]));
      }
  }
  return t;
}

// Resolves the score mods of (b, h) for the tables of batch element b (the bias is read in
// place, broadcast dims of size 1).
template <class T>
ScoreModEval<T> resolve_score_mods(const Problem& p, const ScoreTables<T>& t, int64_t b, int64_t h,
                                   bool with_lowrank) {
  const ScoreMods& m = p.spec->mods;
  const Sequence& s = p.seqs[b];
  ScoreModEval<T> e;
  e.softcap = static_cast<T>(m.softcap);
  e.alibi = m.alibi;
  if (m.alibi != AlibiMode::kOff) e.slope = t.slopes[h];
  e.relative = m.relative;
  if (m.relative != RelativeBucketKind::kOff) {
    e.table = t.table.data() + h * t.buckets;
    e.bucket_of = t.bucket_of.data();
    e.bucket_origin = t.bucket_origin;
  }
  if (!t.forget_c.empty()) e.forget_c = t.forget_c.data() + h * s.nk;
  if (m.bias.defined()) {
    const TensorView& bias = m.bias;
    e.bias =
        static_cast<const char*>(bias.data) + ((bias.shape[0] == 1 ? 0 : b) * bias.strides[0] +
                                               (bias.shape[1] == 1 ? 0 : h) * bias.strides[1]) *
                                                  dtype_size(bias.dtype);
    e.bias_dtype = bias.dtype;
    e.bias_si = bias.strides[2];
    e.bias_sj = bias.strides[3];
  }
  if (with_lowrank && t.rank > 0) {
    e.u = t.lowrank_u.data() + h * s.nq * t.rank;
    e.w = t.lowrank_w.data() + h * s.nk * t.rank;
    e.rank = e.u_stride = e.w_stride = t.rank;
  }
  return e;
}

}  // namespace attnkit::core
