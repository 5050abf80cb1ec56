// The float64 oracle: every tier-1 item of MECHANISMS.md 1.1-1.5, computed with full N x N
// matrices straight from the definitions, through the same variant policies (masks, score mods,
// normalizer formulas) as the fast kernels. Simple and obviously right; never a fast path.
#include "reference/reference.h"

#include <cmath>
#include <limits>
#include <vector>

#include "attnkit/variant/normalizers.h"
#include "core/convert.h"
#include "cpu/parallel.h"

namespace attnkit::reference {
namespace {
constexpr double kInf = std::numeric_limits<double>::infinity();
}  // namespace

int oracle_threads(const core::Problem& p) {
  const double work = static_cast<double>(p.batch) * p.hq * p.max_nq * p.max_nk * (p.d + p.dv);
  return work >= 2e8 ? cpu::resolve_threads(0) : 1;
}

HeadForward forward_head(const core::Problem& p, const core::ScoreTables<double>& tables, int64_t b,
                         int64_t h, DType rounding) {
  const AttentionSpec& spec = *p.spec;
  const Normalizer& norm = spec.normalizer;
  const core::Sequence& s = p.seqs[b];
  const bool naive = rounding != DType::kF64;
  auto rnd = [&](double x) { return naive ? core::round_to(rounding, x) : x; };
  HeadForward f;
  const int64_t nq = f.nq = s.nq, nk = f.nk = s.nk;
  f.hk = h / p.group;
  const MaskEval mask = p.mask_eval(b, h);
  f.mods = core::resolve_score_mods(p, tables, b, h, true);

  auto widen = [&](const core::RowOperand& x, int64_t head, int64_t start, int64_t n, int64_t dim) {
    std::vector<double> m(n * dim);
    for (int64_t r = 0; r < n; ++r)
      for (int64_t c = 0; c < dim; ++c)
        m[r * dim + c] = core::load_as_double(x.row(b, head, start + r), x.dtype, c);
    return m;
  };
  f.Q = widen(p.q, h, s.q_start, nq, p.d);
  f.K = widen(p.k, f.hk, s.k_start, nk, p.d);
  f.V = widen(p.v, f.hk, s.k_start, nk, p.dv);

  f.T.assign(nq * nk, 0.0);
  f.S.assign(nq * nk, 0.0);
  f.P.assign(nq * nk, 0.0);
  f.A.assign(nq * nk, 0);
  f.n_allowed.assign(nq, 0);
  // The naive computation's fp32 operands (Q and K hold values of the inputs' dtype: exact).
  const std::vector<float> Qf(naive ? f.Q.begin() : f.Q.end(), f.Q.end());
  const std::vector<float> Kf(naive ? f.K.begin() : f.K.end(), f.K.end());
  for (int64_t i = 0; i < nq; ++i)
    for (int64_t j = 0; j < nk; ++j) {
      double dot = 0;
      if (naive) {  // one fp32 chain, as a naive loop sums (the tolerances scale with its error)
        const float *qi = &Qf[i * p.d], *kj = &Kf[j * p.d];
        float acc = 0.f;
        for (int64_t c = 0; c < p.d; ++c) acc += qi[c] * kj[c];
        dot = rnd(acc);
      } else {
        dot = dot64(&f.Q[i * p.d], &f.K[j * p.d], p.d);
      }
      const int64_t x = i * nk + j;
      f.T[x] = f.mods.additive(rnd(p.scale64 * dot), i, i + s.offset, j);
      f.S[x] = rnd(f.mods.cap(f.T[x]));
      f.A[x] = mask.allowed(i, j);
      f.n_allowed[i] += f.A[x];
    }

  f.lse.assign(nq, -kInf);
  f.length_scale.assign(nq, 1.0);
  f.sink = norm.kind == NormalizerKind::kSoftmaxSink
               ? core::load_as_double(norm.sinks.data, norm.sinks.dtype, h * norm.sinks.strides[0])
               : -kInf;
  f.beta = norm.beta ? *norm.beta : -std::log(static_cast<double>(nk));
  if (norm.kind == NormalizerKind::kKernel) f.W.assign(nq * nk, -kInf);
  for (int64_t i = 0; i < nq; ++i) {
    const double* Si = f.S.data() + i * nk;  // (nk may be 0: a sequence without keys)
    double* Pi = f.P.data() + i * nk;
    const char* Ai = f.A.data() + i * nk;
    switch (norm.kind) {
      case NormalizerKind::kSoftmax:
      case NormalizerKind::kSoftmaxSink: {
        double m = f.sink;
        for (int64_t j = 0; j < nk; ++j)
          if (Ai[j]) m = std::max(m, Si[j]);
        double l = std::isfinite(f.sink) ? std::exp(f.sink - m) : 0.0;
        for (int64_t j = 0; j < nk; ++j)
          if (Ai[j] && Si[j] > -kInf) l += std::exp(Si[j] - m);
        f.lse[i] = l > 0 ? m + std::log(l) : -kInf;
        // Divided by the sum, not exp(S - LSE): at scores near -FLT_MAX (an additive mask of the
        // lowest value) m + log l rounds to m and the weights of a row would sum to l.
        for (int64_t j = 0; j < nk; ++j)
          if (Ai[j] && l > 0 && Si[j] > -kInf) Pi[j] = std::exp(Si[j] - m) / l;
        break;
      }
      case NormalizerKind::kSigmoid:
        for (int64_t j = 0; j < nk; ++j)
          if (Ai[j]) Pi[j] = sigmoid(Si[j] + f.beta);
        break;
      case NormalizerKind::kKernel: {
        // f(s')^p / sum f(s')^p as a softmax over p log f(s'): no weight underflows (MECHANISMS.md
        // 1.3; the row statistic is the log of the row sum).
        const double ls = norm.length_scale ? length_scale<double>(f.n_allowed[i]) : 1.0;
        f.length_scale[i] = ls;
        double m = -kInf, l = 0;
        for (int64_t j = 0; j < nk; ++j)
          if (Ai[j]) {
            f.W[i * nk + j] =
                norm.power * log_kernel_feature<double>(length_scaled(Si[j], ls), norm.feature);
            m = std::max(m, f.W[i * nk + j]);
          }
        for (int64_t j = 0; j < nk; ++j)
          if (Ai[j] && f.W[i * nk + j] > -kInf) l += std::exp(f.W[i * nk + j] - m);
        f.lse[i] = l > 0 ? m + std::log(l) : -kInf;
        for (int64_t j = 0; j < nk; ++j)
          Pi[j] =
              Ai[j] && l > 0 && f.W[i * nk + j] > -kInf ? std::exp(f.W[i * nk + j] - m) / l : 0.0;
        break;
      }
      case NormalizerKind::kReLA:
        for (int64_t j = 0; j < nk; ++j)
          if (Ai[j]) Pi[j] = Si[j] > 0 ? Si[j] : 0.0;
        break;
    }
  }
  if (naive)
    for (double& x : f.P) x = rnd(x);

  f.O.assign(nq * p.dv, 0.0);
  f.O_final.assign(nq * p.dv, 0.0);
  f.rms.assign(nq, 1.0);
  // Accumulates P V of row i into o by step(acc, p_ij v_jc): exact, or the naive fp32 sum of
  // products rounded to the inputs' dtype (an instance per dtype: the switch out of the loop).
  auto pv_row = [&](int64_t i, double* o, auto step) {
    for (int64_t j = 0; j < nk; ++j) {
      const double pij = f.P[i * nk + j];
      if (pij == 0) continue;
      const double* vj = &f.V[j * p.dv];
      for (int64_t c = 0; c < p.dv; ++c) o[c] = step(o[c], pij * vj[c]);
    }
  };
  auto naive_step = [](auto round) {
    return [round](double acc, double x) {
      return static_cast<double>(static_cast<float>(acc + static_cast<float>(round(x))));
    };
  };
  for (int64_t i = 0; i < nq; ++i) {
    double* o = &f.O[i * p.dv];
    switch (naive ? rounding : DType::kF64) {
      case DType::kBF16:
        pv_row(i, o, naive_step([](double x) { return core::round_to(DType::kBF16, x); }));
        break;
      case DType::kF16:
        pv_row(i, o, naive_step([](double x) { return core::round_to(DType::kF16, x); }));
        break;
      case DType::kF32:
        pv_row(i, o, naive_step([](double x) { return core::round_to(DType::kF32, x); }));
        break;
      case DType::kF64:
        pv_row(i, o, [](double acc, double x) { return acc + x; });
        break;
      default:
        pv_row(i, o, naive_step(rnd));
    }
    double* of = &f.O_final[i * p.dv];
    for (int64_t c = 0; c < p.dv; ++c) of[c] = o[c];
    if (norm.kind == NormalizerKind::kReLA) {
      double ms = 0;
      for (int64_t c = 0; c < p.dv; ++c) ms += o[c] * o[c];
      f.rms[i] = std::sqrt(ms / static_cast<double>(p.dv) + norm.rela_eps);
      for (int64_t c = 0; c < p.dv; ++c)
        of[c] = core::load_as_double(norm.rela_gain.data, norm.rela_gain.dtype,
                                     c * norm.rela_gain.strides[0]) *
                o[c] / f.rms[i];
    }
    if (spec.gate_kind == GateKind::kElementwise) {
      const void* g = p.gate.row(b, h, s.q_start + i);
      for (int64_t c = 0; c < p.dv; ++c) of[c] *= sigmoid(core::load_as_double(g, p.gate.dtype, c));
    } else if (spec.gate_kind == GateKind::kPerHead) {
      const double g =
          sigmoid<double>(core::load_as_double(p.gate.row(b, h, s.q_start + i), p.gate.dtype, 0));
      for (int64_t c = 0; c < p.dv; ++c) of[c] *= g;
    }
  }
  return f;
}

namespace {

// Writes the outputs of one head: out, row_stat, row_max, entropy; adds its column mass.
void write_head(const core::Problem& p, const HeadForward& f, int64_t b, int64_t h,
                std::vector<double>* col_mass) {
  const core::Sequence& s = p.seqs[b];
  const NormalizerKind kind = p.spec->normalizer.kind;
  for (int64_t i = 0; i < f.nq; ++i) {
    const int64_t row = s.q_start + i;
    void* dst = p.out.row(b, h, row);
    for (int64_t c = 0; c < p.dv; ++c)
      core::store_from_double(dst, p.out.dtype, c, f.O_final[i * p.dv + c]);
    if (p.row_stat.defined()) {
      const double stat = kind == NormalizerKind::kReLA ? f.rms[i] : f.lse[i];
      p.row_stat.at(b, h, row) = static_cast<float>(stat);
    }
    if (!p.softmax_family()) continue;
    double rmax = -kInf;
    for (int64_t j = 0; j < f.nk; ++j)
      if (f.A[i * f.nk + j]) rmax = std::max(rmax, f.S[i * f.nk + j]);
    // -sum P log P = log l + sum_j P_j (m - S_j) (+ the sink's), with m the row's largest score
    // (the sink's too) and l = sum exp(S - m): not LSE - sum P S, which cancels to nothing at
    // scores near -FLT_MAX.
    double ent = 0;  // a row with nothing to attend has entropy 0
    if (std::isfinite(f.lse[i])) {
      const double m = std::max(rmax, f.sink);
      double l = std::isfinite(f.sink) ? std::exp(f.sink - m) : 0.0, spread = 0;
      for (int64_t j = 0; j < f.nk; ++j) {
        const int64_t x = i * f.nk + j;
        if (f.P[x] > 0) {
          l += std::exp(f.S[x] - m);
          spread += f.P[x] * (m - f.S[x]);
        }
      }
      if (std::isfinite(f.sink)) spread += std::exp(f.sink - m) / l * (m - f.sink);
      ent = std::log(l) + spread;
    }
    if (p.row_max.defined()) p.row_max.at(b, h, row) = static_cast<float>(rmax);
    if (p.entropy.defined()) p.entropy.at(b, h, row) = static_cast<float>(ent);
  }
  if (col_mass)
    for (int64_t i = p.col_q_begin; i < std::min(p.col_q_end, f.nq); ++i)
      for (int64_t j = 0; j < f.nk; ++j) (*col_mass)[j] += f.P[i * f.nk + j];
}

}  // namespace

Status forward(const TensorView& q, const TensorView& k, const TensorView& v,
               const AttentionSpec& spec, const TensorView& out, const TensorView& row_stat,
               const AttentionStats& stats, DType rounding) {
  core::Problem p;
  Status st = core::validate_and_resolve(q, k, v, spec, out, row_stat, stats, Options{}, true, &p);
  if (!st.ok()) return st;
  if (p.device != Device::kCPU)
    return Status(StatusCode::kTypeError,
                  "q is on a CUDA device: the float64 oracle reads host memory (copy to the CPU)");
  std::vector<core::ScoreTables<double>> tables;
  tables.reserve(p.batch);
  for (int64_t b = 0; b < p.batch; ++b)
    tables.push_back(core::build_score_tables<double>(p, b, true));
  // The heads on every core (oracle_threads), each task writing only its own rows (and column
  // mass) in the order one thread would, so the results do not depend on the thread count; a
  // task is a (batch element, kv head) group where the column mass sums over the group.
  const bool grouped = p.col_mass.defined() && p.col_group_sum;
  const int64_t heads = grouped ? p.group : 1, tasks_b = p.hq / heads;
  cpu::parallel_for(p.batch * tasks_b, oracle_threads(p), [&](int64_t task, int) {
    const int64_t b = task / tasks_b, h0 = task % tasks_b * heads;
    std::vector<double> group_mass(grouped ? p.seqs[b].nk : 0, 0.0);
    for (int64_t h = h0; h < h0 + heads; ++h) {
      std::vector<double> mass(p.seqs[b].nk, 0.0);
      write_head(p, forward_head(p, tables[b], b, h, rounding), b, h,
                 p.col_mass.defined() ? &mass : nullptr);
      if (!p.col_mass.defined()) continue;
      for (size_t j = 0; j < mass.size(); ++j) {
        if (grouped)
          group_mass[j] += mass[j];
        else
          p.col_mass.at(b, h, j) = static_cast<float>(mass[j]);
      }
    }
    if (grouped)
      for (size_t j = 0; j < group_mass.size(); ++j)
        p.col_mass.at(b, h0 / p.group, j) = static_cast<float>(group_mass[j]);
  });
  return {};
}

}  // namespace attnkit::reference

namespace attnkit {

Status reference_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                         const AttentionSpec& spec, const TensorView& out,
                         const TensorView& row_stat, const AttentionStats& stats) {
  return reference::forward(q, k, v, spec, out, row_stat, stats, DType::kF64);
}

}  // namespace attnkit
