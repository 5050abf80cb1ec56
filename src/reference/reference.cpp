// The float64 oracle: every tier-1 item of MECHANISMS.md 1.1-1.5, computed with full N x N
// matrices straight from the definitions, through the same variant policies (masks, score mods,
// normalizer formulas) as the fast kernels. Simple and obviously right; never a fast path.
#include "reference/reference.h"

#include <cmath>
#include <limits>
#include <vector>

#include "attnkit/attention.h"
#include "attnkit/variant/normalizers.h"
#include "core/convert.h"
#include "core/problem.h"
#include "core/score_tables.h"

namespace attnkit {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// `rounding` kF64: the exact oracle. Another dtype: the naive low-precision computation of
// DESIGN.md's tolerance rule (scores, probabilities and both products rounded to that dtype,
// dot products and P V accumulated in fp32).
void reference_head(const core::Problem& p, const core::ScoreTables<double>& tables, int64_t b,
                    int64_t h, std::vector<double>* col_mass, DType rounding) {
  const bool naive = rounding != DType::kF64;
  auto rnd = [&](double x) { return naive ? core::round_to(rounding, x) : x; };
  const AttentionSpec& spec = *p.spec;
  const core::Sequence& s = p.seqs[b];
  const int64_t nq = s.nq, nk = s.nk, hk = h / p.group;
  const MaskEval mask = p.mask_eval(b);
  const ScoreModEval<double> mods = core::resolve_score_mods(p, tables, b, h, true);
  const Normalizer& norm = spec.normalizer;

  // Widen this head's rows to float64 once.
  auto widen = [&](const core::RowOperand& x, int64_t head, int64_t start, int64_t n, int64_t dim) {
    std::vector<double> m(n * dim);
    for (int64_t r = 0; r < n; ++r)
      for (int64_t c = 0; c < dim; ++c)
        m[r * dim + c] = core::load_as_double(x.row(b, head, start + r), x.dtype, c);
    return m;
  };
  const std::vector<double> Q = widen(p.q, h, s.q_start, nq, p.d);
  const std::vector<double> K = widen(p.k, hk, s.k_start, nk, p.d);
  const std::vector<double> V = widen(p.v, hk, s.k_start, nk, p.dv);
  auto qv = [&](int64_t i, int64_t c) { return Q[i * p.d + c]; };
  auto kv = [&](int64_t j, int64_t c) { return K[j * p.d + c]; };
  auto vv = [&](int64_t j, int64_t c) { return V[j * p.dv + c]; };

  std::vector<double> S(nq * nk), P(nq * nk, 0.0);
  std::vector<char> A(nq * nk);
  std::vector<int64_t> n_allowed(nq, 0);
  for (int64_t i = 0; i < nq; ++i)
    for (int64_t j = 0; j < nk; ++j) {
      double dot = 0;
      if (naive) {
        float acc = 0.f;
        for (int64_t c = 0; c < p.d; ++c)
          acc += static_cast<float>(qv(i, c)) * static_cast<float>(kv(j, c));
        dot = rnd(acc);
      } else {
        for (int64_t c = 0; c < p.d; ++c) dot += qv(i, c) * kv(j, c);
      }
      S[i * nk + j] = rnd(mods.score(rnd(p.scale64 * dot), i, i + s.offset, j));
      A[i * nk + j] = mask.allowed(i, j);
      n_allowed[i] += A[i * nk + j];
    }

  std::vector<double> stat(nq, 0.0), lse(nq, -kInf);
  const double sink = norm.kind == NormalizerKind::kSoftmaxSink
                          ? static_cast<const float*>(norm.sinks.data)[h * norm.sinks.strides[0]]
                          : -kInf;
  for (int64_t i = 0; i < nq; ++i) {
    double* Si = &S[i * nk];
    double* Pi = &P[i * nk];
    const char* Ai = &A[i * nk];
    switch (norm.kind) {
      case NormalizerKind::kSoftmax:
      case NormalizerKind::kSoftmaxSink: {
        double m = sink, rmax = -kInf;
        for (int64_t j = 0; j < nk; ++j)
          if (Ai[j]) {
            m = std::max(m, Si[j]);
            rmax = std::max(rmax, Si[j]);
          }
        double l = std::isfinite(sink) ? std::exp(sink - m) : 0.0;
        for (int64_t j = 0; j < nk; ++j)
          if (Ai[j] && Si[j] > -kInf) l += std::exp(Si[j] - m);
        lse[i] = l > 0 ? m + std::log(l) : -kInf;
        double ps = 0;
        for (int64_t j = 0; j < nk; ++j)
          if (Ai[j] && l > 0 && Si[j] > -kInf) {
            Pi[j] = std::exp(Si[j] - lse[i]);
            ps += Pi[j] * Si[j];
          }
        double ent = 0;
        if (std::isfinite(lse[i])) {
          ent = lse[i] - ps;
          if (std::isfinite(sink)) ent -= std::exp(sink - lse[i]) * sink;
        }
        stat[i] = lse[i];
        if (p.row_max.defined()) p.row_max.at(b, h, s.q_start + i) = static_cast<float>(rmax);
        if (p.entropy.defined()) p.entropy.at(b, h, s.q_start + i) = static_cast<float>(ent);
        break;
      }
      case NormalizerKind::kSigmoid: {
        const double beta = norm.beta ? *norm.beta : -std::log(static_cast<double>(nk));
        for (int64_t j = 0; j < nk; ++j)
          if (Ai[j]) Pi[j] = sigmoid(Si[j] + beta);
        break;
      }
      case NormalizerKind::kKernel: {
        const double ls = norm.length_scale ? length_scale<double>(n_allowed[i]) : 1.0;
        double l = 0;
        for (int64_t j = 0; j < nk; ++j)
          if (Ai[j]) {
            Pi[j] = kernel_weight<double>(norm.length_scale ? (ls == 0 ? 0.0 : Si[j] * ls) : Si[j],
                                          norm.feature, norm.power);
            l += Pi[j];
          }
        for (int64_t j = 0; j < nk; ++j) Pi[j] = l > 0 ? Pi[j] / l : 0.0;
        stat[i] = l;
        break;
      }
      case NormalizerKind::kReLA:
        for (int64_t j = 0; j < nk; ++j)
          if (Ai[j]) Pi[j] = Si[j] > 0 ? Si[j] : 0.0;
        break;
    }
  }

  if (naive)
    for (double& x : P) x = rnd(x);
  std::vector<double> o(p.dv);
  for (int64_t i = 0; i < nq; ++i) {
    std::fill(o.begin(), o.end(), 0.0);
    for (int64_t j = 0; j < nk; ++j)
      if (P[i * nk + j] != 0)
        for (int64_t c = 0; c < p.dv; ++c)
          o[c] = naive
                     ? static_cast<float>(o[c] + static_cast<float>(rnd(P[i * nk + j] * vv(j, c))))
                     : o[c] + P[i * nk + j] * vv(j, c);
    if (norm.kind == NormalizerKind::kReLA) {
      double ms = 0;
      for (double x : o) ms += x * x;
      const double rms = std::sqrt(ms / static_cast<double>(p.dv) + norm.rela_eps);
      for (int64_t c = 0; c < p.dv; ++c)
        o[c] = static_cast<const float*>(norm.rela_gain.data)[c * norm.rela_gain.strides[0]] *
               o[c] / rms;
      stat[i] = rms;
    }
    if (spec.gate_kind == GateKind::kElementwise) {
      const void* g = p.gate.row(b, h, s.q_start + i);
      for (int64_t c = 0; c < p.dv; ++c) o[c] *= sigmoid(core::load_as_double(g, p.gate.dtype, c));
    } else if (spec.gate_kind == GateKind::kPerHead) {
      const double g = sigmoid<double>(p.gate_head.at(b, h, s.q_start + i));
      for (double& x : o) x *= g;
    }
    void* dst = p.out.row(b, h, s.q_start + i);
    for (int64_t c = 0; c < p.dv; ++c) core::store_from_double(dst, p.out.dtype, c, o[c]);
    if (p.row_stat.defined()) p.row_stat.at(b, h, s.q_start + i) = static_cast<float>(stat[i]);
  }
  if (col_mass)
    for (int64_t i = p.col_q_begin; i < std::min(p.col_q_end, nq); ++i)
      for (int64_t j = 0; j < nk; ++j) (*col_mass)[j] += P[i * nk + j];
}

}  // namespace

Status reference_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                         const AttentionSpec& spec, const TensorView& out,
                         const TensorView& row_stat, const AttentionStats& stats) {
  return reference::forward(q, k, v, spec, out, row_stat, stats, DType::kF64);
}

namespace reference {

Status forward(const TensorView& q, const TensorView& k, const TensorView& v,
               const AttentionSpec& spec, const TensorView& out, const TensorView& row_stat,
               const AttentionStats& stats, DType rounding) {
  core::Problem p;
  Status st = core::validate_and_resolve(q, k, v, spec, out, row_stat, stats, Options{}, true, &p);
  if (!st.ok()) return st;
  for (int64_t b = 0; b < p.batch; ++b) {
    const core::ScoreTables<double> tables = core::build_score_tables<double>(p, b, true);
    for (int64_t hk = 0; hk < p.hk; ++hk) {
      std::vector<double> group_mass(p.seqs[b].nk, 0.0);
      for (int64_t g = 0; g < p.group; ++g) {
        const int64_t h = hk * p.group + g;
        std::vector<double> mass(p.seqs[b].nk, 0.0);
        reference_head(p, tables, b, h, p.col_mass.defined() ? &mass : nullptr, rounding);
        if (!p.col_mass.defined()) continue;
        if (p.col_group_sum) {
          for (size_t j = 0; j < mass.size(); ++j) group_mass[j] += mass[j];
        } else {
          for (size_t j = 0; j < mass.size(); ++j)
            p.col_mass.at(b, h, j) = static_cast<float>(mass[j]);
        }
      }
      if (p.col_mass.defined() && p.col_group_sum)
        for (size_t j = 0; j < group_mass.size(); ++j)
          p.col_mass.at(b, hk, j) = static_cast<float>(group_mass[j]);
    }
  }
  return {};
}

}  // namespace reference
}  // namespace attnkit
