// What a correct backend's rounding errors are proportional to, where the plain norm of a result
// says nothing about them: gradient_magnitudes() for the backward pass, output_magnitude() for
// ReLA's output and RMS, kernel_row_stat_slack() for the normalized kernel's row statistic.
//
// gradient_magnitudes() follows the chain rule of the float64 oracle
// (src/reference/reference_backward.cpp) with the absolute value of every factor, so each element
// of a gradient receives sum |term| over the terms the oracle adds up to it. A backward pass in
// floating point computes each term with a small relative error and sums them, so its error is a
// few units of its precision times this sum however much the terms cancel; the plain norm of a
// gradient that cancels to almost nothing (dslopes summed over every pair with both signs, a
// dbias under a one-hot softmax, dv through ReLA at head_dim_v 1) says nothing about what its
// error can be.
//
// A factor that a correct backend has only to an absolute error a, not a relative one, counts as
// |factor| + a / tol: its share of the error, a times the rest of its term, then stays within tol
// times the magnitude. Such factors:
//   - O = P V stored in the inputs' dtype, and P where a backend takes it in that dtype (the GPU's
//     P V and dS; sigmoid's dS itself, which P's floor no longer bounds where 1 - P is tiny):
//     their subnormals keep half their spacing (fp16 below 6e-5);
//   - the softcap's slope 1 - tanh^2 (T saturates): 2^-21 (sigmoid's 1 - P is sigmoid(-z) on
//     every backend, known to P's relative error);
//   - P itself, through its score's rounding ds (score_error), a relative ds for the softmax
//     family and sigmoid (d log P / ds is at most 1), which at large logits in fp32 is no
//     longer small against the tolerance;
//   - ReLA's P = relu(s) and the ReLU kernel's P ~ s^p, and the kernel's 1 / s, where the score
//     s is small: s has the absolute error ds of the fp32 sums it comes from (score_error), which
//     near the kink is no longer small against s; and the kink itself, where ReLA's dS = dP [s > 0]
//     (the ReLU kernel's at power 1) jumps and a score within ds of 0 may fall on either side.
// O = P V itself is a sum that may cancel: where it is a factor (the gate's, ReLA's) it counts as
// P|V| = sum_j P_j |V_j|, and ReLA's 1 / rms, computed from it, as known to k = |P|V|| / |O|
// (norms over the row).
//
// Per (batch element, query head), from the oracle's forward (P, S, T, O, LSE), with P~ for P and
// its floor:
//   gate:   |dgate| = |dO| (|O1| g + O's floor) (1 - g),  |dO1| = |dO| g  (|O1|: P~|V|, after
//           ReLA |gain| P~|V| (1 + k) / rms)
//   ReLA:   |dgain| += |dO1| P~|V| (1 + k) / rms,
//           |dO| = (1 + 3 k) (|gain dO1| / rms + P~|V| sum(|gain dO1| P~|V|) / (dv rms^3))
//   P V:    |dP_ij| = |dO_i| . |V_j|,  |dV_j| += P~_ij |dO_i|
//   norm:   |D_i| = sum_j P~_ij |dP_ij| + O's floor (>= |dO_i| . |O_i|: the rounding of O that
//           D = dO . O reads is covered too); softmax |dS| = P (|dP| + |D|), |dsink| += p_sink |D|;
//           sigmoid |dP| P (1 - P); kernel P~ (|dP| + |D|) p |log f'(s')| ls (1 + its
//           floor) + the kink's jump; ReLA |dP| ([s > 0] + the kink's jump)
//   cap:    |dT| = |dS| |1 - tanh^2(T / c)|
//   terms:  every extra's element sums |dT| times |its factor| (|w|, |u|, |distance|, 1)
//   q, k:   |dQ_i| = |scale| sum_j |dT_ij| |K_j|,  |dK_j| += |scale| sum_i |dT_ij| |Q_i|
#include "magnitudes.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <vector>

#include "attnkit/variant/normalizers.h"
#include "core/convert.h"
#include "core/score_tables.h"
#include "cpu/parallel.h"
#include "reference/reference.h"

namespace attnkit::tools {
namespace {

// The absolute error of the softcap's slope 1 - t^2 = (1 - t)(1 + t), t = tanh(T / c) in fp32: a
// few ulps of a tanh near 1, doubled.
constexpr double kTanhFloor = 0x1p-21;

bool contiguous(const TensorView& t) {
  int64_t stride = 1;
  for (int i = t.ndim - 1; i >= 0; stride *= t.shape[i--])
    if (t.shape[i] > 1 && t.strides[i] != stride) return false;
  return true;
}
// The fp64 elements of a contiguous magnitude view (nullptr where the gradient is not asked).
double* elements(const TensorView& t) {
  return t.defined() ? static_cast<double*>(t.data) : nullptr;
}
double* row_of(const core::RowOperand& x, int64_t b, int64_t h, int64_t n) {
  return x.defined() ? static_cast<double*>(x.row(b, h, n)) : nullptr;
}

// The absolute error of the final score S_ij that a backend computing in fp32 may make: a dot
// product of d terms rounds to about sqrt(d) u sum_c |q_c k_c| (Higham and Mary's probabilistic
// bound, taken with a constant of 4, where the worst case d u never happens), and a few
// operations more on the additive terms and S itself (the softcap carries the first through its
// slope); plus softcap_rel |S| where the backend approximates the softcap's tanh.
double score_error(const core::Problem& p, const reference::HeadForward& f, int64_t i, int64_t j,
                   double softcap_rel) {
  double dot = 0, dot_abs = 0;
  for (int64_t c = 0; c < p.d; ++c) {
    dot += f.Q[i * p.d + c] * f.K[j * p.d + c];
    dot_abs += std::abs(f.Q[i * p.d + c] * f.K[j * p.d + c]);
  }
  const int64_t x = i * f.nk + j;
  // A score of -inf (an additive mask) is -inf on every backend: its P is exactly 0.
  if (f.T[x] == -INFINITY) return 0;
  const double terms = std::abs(p.scale64) * dot_abs + std::abs(f.T[x] - p.scale64 * dot);
  return kF32Unit * (4 * std::sqrt(static_cast<double>(p.d)) + 4) *
             (std::abs(f.mods.cap_grad(f.T[x])) * terms + std::abs(f.S[x])) +
         (f.mods.softcap != 0 ? softcap_rel * std::abs(f.S[x]) : 0.0);
}

// P~ = P with its floors, for every allowed pair of one head: the relative error that its score's
// rounding ds gives P, over tol (rel: ds for the softmax family and sigmoid, whose d log P / ds
// is at most 1; p |log f'(s')| ds for the kernel, whose ReLU's 1 / s is unbounded near its kink),
// plus that of the row's LSE (rel's sum weighted by P; lse_rel); ReLA's P = relu(s) has ds
// itself. at_kink: 1 / tol where a score is within ds of ReLA's or the power-1 ReLU kernel's
// kink, where the gradient jumps and the score may fall on either side.
struct Floors {
  std::vector<double> pm, rel, at_kink, lse_rel;
};
Floors floors(const core::Problem& p, const reference::HeadForward& f, double tol,
              double softcap_rel) {
  const Normalizer& norm = p.spec->normalizer;
  const int64_t nq = f.nq, nk = f.nk;
  const bool rela = norm.kind == NormalizerKind::kReLA;
  const bool kernel = norm.kind == NormalizerKind::kKernel;
  const bool kink = rela || (kernel && norm.feature == KernelFeature::kReLU && norm.power <= 1);
  // P in the inputs' dtype (P V and dS on the GPU, as in FlashAttention; bf16 dot products on
  // CPUs) keeps half the spacing of its subnormals: fp16 drops a P below 6e-8.
  const double p_floor = subnormal_floor(p.q.dtype) / tol;
  Floors fl{f.P, std::vector<double>(nq * nk, 0.0), std::vector<double>(nq * nk, 0.0),
            std::vector<double>(nq, 0.0)};
  for (int64_t i = 0; i < nq; ++i) {
    const double ls = f.length_scale[i];
    for (int64_t j = 0; j < nk; ++j) {
      const int64_t x = i * nk + j;
      // (a -inf score, from an additive -inf without a softcap: P = 0 exactly; with one the
      // score is -c, a finite one)
      if (!f.A[x] || f.S[x] == -INFINITY) continue;
      const double ds = score_error(p, f, i, j, softcap_rel) * (kernel ? ls : 1.0);
      const double s1 = kernel ? f.S[x] * ls : f.S[x];
      if (kink && std::abs(s1) < ds && (rela || std::isfinite(f.lse[i]))) fl.at_kink[x] = 1 / tol;
      if (rela) {
        fl.pm[x] = f.S[x] > -ds ? std::max(f.S[x], 0.0) + ds / tol : 0.0;
        continue;
      }
      fl.rel[x] =
          (kernel ? norm.power * std::abs(dlog_kernel_feature(s1, norm.feature)) : 1.0) * ds / tol;
      fl.lse_rel[i] += f.P[x] * fl.rel[x];
    }
    if (norm.kind == NormalizerKind::kSigmoid) fl.lse_rel[i] = 0;  // no LSE
    for (int64_t j = 0; j < nk; ++j) {
      const int64_t x = i * nk + j;
      if (!rela) fl.pm[x] *= 1 + fl.rel[x] + fl.lse_rel[i];
      if (f.A[x]) fl.pm[x] += p_floor;
    }
  }
  return fl;
}

// P~|V| of row i (O's magnitude, column by column) into pv_abs; returns ReLA's k, the ratio of
// |P~|V|| / sqrt(dv) to the row's rms.
double pv_magnitude(const reference::HeadForward& f, const std::vector<double>& pm, int64_t i,
                    int64_t dv, std::vector<double>& pv_abs) {
  std::fill(pv_abs.begin(), pv_abs.begin() + dv, 0.0);
  for (int64_t j = 0; j < f.nk; ++j)  // (V's rows in order: each column sums in j's order)
    for (int64_t c = 0; c < dv; ++c) pv_abs[c] += pm[i * f.nk + j] * std::abs(f.V[j * dv + c]);
  double pv_abs2 = 0;
  for (int64_t c = 0; c < dv; ++c) pv_abs2 += pv_abs[c] * pv_abs[c];
  return std::sqrt(pv_abs2 / static_cast<double>(dv)) / f.rms[i];
}

// The gate's sigmoid at row `row`, column c (its complement 1 - g = sigmoid(-G): kept past 37).
double gate_at(const core::Problem& p, int64_t b, int64_t h, int64_t row, int64_t c,
               bool complement = false) {
  const double sign = complement ? -1 : 1;
  switch (p.spec->gate_kind) {
    case GateKind::kElementwise:
      return sigmoid(sign * core::load_as_double(p.gate.row(b, h, row), p.gate.dtype, c));
    case GateKind::kPerHead:
      return sigmoid(sign * core::load_as_double(p.gate.row(b, h, row), p.gate.dtype, 0));
    default:
      return complement ? 0.0 : 1.0;
  }
}

}  // namespace

double subnormal_floor(DType t) {
  return t == DType::kF16    ? 0x1p-25
         : t == DType::kBF16 ? 0x1p-134
         : t == DType::kF64  ? 0.0
                             : 0x1p-150;
}

Status gradient_magnitudes(const TensorView& q, const TensorView& k, const TensorView& v,
                           const TensorView& grad_out, const AttentionSpec& spec, double tol,
                           const AttentionGrads& mag, double softcap_rel) {
  for (const TensorView* t :
       {&mag.dq, &mag.dk, &mag.dv, &mag.dbias, &mag.dlow_rank_u, &mag.dlow_rank_w,
        &mag.drelative_table, &mag.dforget_log_f, &mag.dalibi_slopes, &mag.dsinks, &mag.dbeta,
        &mag.drela_gain, &mag.dgate})
    if (t->defined() && (t->dtype != DType::kF64 || !contiguous(*t)))
      return Status(StatusCode::kInvalidArgument, "magnitudes are contiguous fp64 views");
  if (!(tol > 0)) return Status(StatusCode::kInvalidArgument, "tol must be > 0");
  core::Problem p;
  core::GradOperands ops;
  const Status st = reference::resolve_backward(q, k, v, grad_out, spec, mag, &p, &ops);
  if (!st.ok()) return st;

  const Normalizer& norm = spec.normalizer;
  const ScoreMods& mods = spec.mods;
  const int64_t d = p.d, dv = p.dv;
  const bool rela = norm.kind == NormalizerKind::kReLA;
  const double out_floor = subnormal_floor(q.dtype) / tol;
  const double cap_floor = mods.softcap != 0 ? kTanhFloor / tol : 0.0;
  double* dbias = elements(mag.dbias);
  double *du = elements(mag.dlow_rank_u), *dw = elements(mag.dlow_rank_w);
  double* dtable = elements(mag.drelative_table);
  double* dc = elements(mag.dforget_log_f);  // |dc| first, then its suffix sums
  double* dslopes = elements(mag.dalibi_slopes);
  double *dsinks = elements(mag.dsinks), *dbeta = elements(mag.dbeta);
  double* dgain = elements(mag.drela_gain);
  auto gain = [&](int64_t c) {
    return std::abs(core::load_as_double(norm.rela_gain.data, norm.rela_gain.dtype,
                                         c * norm.rela_gain.strides[0]));
  };

  for (int64_t b = 0; b < p.batch; ++b) {
    const core::Sequence& s = p.seqs[b];
    const core::ScoreTables<double> tables = core::build_score_tables<double>(p, b, true);
    const int64_t nq = s.nq, nk = s.nk;
    for (int64_t h = 0; h < p.hq; ++h) {
      const reference::HeadForward f = reference::forward_head(p, tables, b, h, DType::kF64);
      const Floors fl = floors(p, f, tol, softcap_rel);
      const std::vector<double>&pm = fl.pm, &rel = fl.rel, &at_kink = fl.at_kink;
      // |dO| through the gate and ReLA, row by row; sum |dO_out| (O's floor in D).
      std::vector<double> a(nq * dv), dout_sum(nq, 0.0), pv_abs(dv);
      for (int64_t i = 0; i < nq; ++i) {
        const int64_t row = s.q_start + i;
        const void* go = ops.grad_out.row(b, h, row);
        // O = P V is known to a few units of P~|V| (pv_abs), not of |O|, where it cancels;
        // ReLA's 1 / rms then to the ratio k of their norms.
        const double kappa = pv_magnitude(f, pm, i, dv, pv_abs), r = f.rms[i];
        double* ai = &a[i * dv];
        double* dgate = row_of(ops.dgate, b, h, row);
        for (int64_t c = 0; c < dv; ++c) {
          const double g = gate_at(p, b, h, row, c);
          const double dout = std::abs(core::load_as_double(go, ops.grad_out.dtype, c));
          const double o1 = rela ? gain(c) * pv_abs[c] / r * (1 + kappa) : pv_abs[c];
          if (dgate)  // dO O1 g (1 - g) = dO out (1 - g): out in the inputs' dtype has O's floor
            dgate[spec.gate_kind == GateKind::kElementwise ? c : 0] +=
                dout * (o1 * g + out_floor) * gate_at(p, b, h, row, c, true);
          ai[c] = dout * g;
          dout_sum[i] += dout;
        }
        if (!rela) continue;
        // dO = gain dO1 / rms - O (sum gain dO1 O) / (dv rms^3): each factor O as P~|V|, each
        // 1 / rms to k.
        double dot = 0;
        for (int64_t c = 0; c < dv; ++c) {
          if (dgain) dgain[c] += ai[c] * pv_abs[c] / r * (1 + kappa);
          dot += gain(c) * ai[c] * pv_abs[c];
        }
        for (int64_t c = 0; c < dv; ++c)
          ai[c] = (1 + 3 * kappa) *
                  (gain(c) * ai[c] / r + pv_abs[c] * dot / (static_cast<double>(dv) * r * r * r));
      }
      // |dP| and |dV|; then |D|, |dS|, |dT| and every term's share, row by row.
      std::vector<double> dP(nq * nk, 0.0);
      for (int64_t i = 0; i < nq; ++i)
        for (int64_t j = 0; j < nk; ++j) {
          if (!f.A[i * nk + j]) continue;
          double* vrow = row_of(ops.dv, b, f.hk, s.k_start + j);
          double acc = 0;  // (in a register: vrow may alias dP for the compiler)
          for (int64_t c = 0; c < dv; ++c) {
            acc += a[i * dv + c] * std::abs(f.V[j * dv + c]);
            vrow[c] += pm[i * nk + j] * a[i * dv + c];
          }
          dP[i * nk + j] = acc;
        }
      for (int64_t i = 0; i < nq; ++i) {
        const int64_t ia = i + s.offset;
        double D = out_floor * dout_sum[i];
        for (int64_t j = 0; j < nk; ++j) D += pm[i * nk + j] * dP[i * nk + j];
        if (dsinks && std::isfinite(f.lse[i]))
          dsinks[h] += std::exp(f.sink - f.lse[i]) * (1 + fl.lse_rel[i]) * D;
        double* qrow = row_of(ops.dq, b, h, s.q_start + i);
        for (int64_t j = 0; j < nk; ++j) {
          const int64_t x = i * nk + j;
          if (!f.A[x] || f.S[x] == -INFINITY) continue;  // a -inf score: dS = 0 exactly
          double dS = 0;
          switch (norm.kind) {
            case NormalizerKind::kSoftmax:
            case NormalizerKind::kSoftmaxSink:
              dS = pm[x] * (dP[x] + D);
              break;
            case NormalizerKind::kSigmoid:  // 1 - P = sigmoid(-s) has P's relative error too
              dS = dP[x] * pm[x] * sigmoid(-(f.S[x] + f.beta)) * (1 + rel[x]);
              if (dbeta) dbeta[0] += dS;  // summed in fp32 on every backend
              // dS itself in the inputs' dtype (the GPU's dq, dk and extras read it packed):
              // its subnormals keep half their spacing (fp16 dS of saturated logits underflow).
              dS += out_floor;
              break;
            case NormalizerKind::kKernel: {  // P / s' -> exp(-LSE) at the kink (power 1)
              const double ls = f.length_scale[i];
              dS =
                  (pm[x] * std::abs(dlog_kernel_feature(f.S[x] * ls, norm.feature)) * (1 + rel[x]) +
                   (at_kink[x] > 0 ? at_kink[x] * std::exp(-f.lse[i]) : 0.0)) *
                  (dP[x] + D) * norm.power * ls;
              break;
            }
            case NormalizerKind::kReLA:
              dS = ((f.S[x] > 0 ? 1.0 : 0.0) + at_kink[x]) * dP[x];
              break;
          }
          const double dT = dS * (std::abs(f.mods.cap_grad(f.T[x])) + cap_floor);
          if (dT == 0) continue;
          if (dbias) {
            const TensorView& B = mods.bias;
            const int64_t bb = B.shape[0] == 1 ? 0 : b, bh = B.shape[1] == 1 ? 0 : h;
            dbias[((bb * B.shape[1] + bh) * B.shape[2] + i) * B.shape[3] + j] += dT;
          }
          for (int64_t e = 0; du && e < f.mods.rank; ++e) {
            du[((b * p.hq + h) * nq + i) * f.mods.rank + e] +=
                dT * std::abs(f.mods.w[j * f.mods.w_stride + e]);
            dw[((b * p.hq + h) * nk + j) * f.mods.rank + e] +=
                dT * std::abs(f.mods.u[i * f.mods.u_stride + e]);
          }
          if (dtable)  // the oracle's bucket table (its ScoreModEval has no bucket parameters)
            dtable[h * mods.relative_table.shape[1] +
                   f.mods.bucket_of[j - ia + f.mods.bucket_origin]] += dT;
          if (dc) {
            dc[(b * p.hq + h) * nk + ia] += dT;
            dc[(b * p.hq + h) * nk + j] += dT;
          }
          if (dslopes) dslopes[h] += dT * static_cast<double>(ia > j ? ia - j : j - ia);
          double* krow = row_of(ops.dk, b, f.hk, s.k_start + j);
          for (int64_t c = 0; c < d; ++c) {
            qrow[c] += std::abs(p.scale64) * dT * std::abs(f.K[j * d + c]);
            krow[c] += std::abs(p.scale64) * dT * std::abs(f.Q[i * d + c]);
          }
        }
      }
    }
  }
  // Forget gate: d log f_m = sum_{n >= m} dc_n, so its magnitude sums |dc| the same way.
  if (dc) {
    const int64_t nk = mods.forget_log_f.shape[2];
    for (int64_t row = 0; row < p.batch * p.hq; ++row)
      for (int64_t m = nk - 2; m >= 0; --m) dc[row * nk + m] += dc[row * nk + m + 1];
  }
  return {};
}

Status output_magnitude(const TensorView& q, const TensorView& k, const TensorView& v,
                        const AttentionSpec& spec, double tol, const TensorView& mag,
                        const TensorView& rms_mag, double softcap_rel, double* top_score) {
  const Normalizer& norm = spec.normalizer;
  if (top_score) *top_score = 0;
  if (mag.dtype != DType::kF64)
    return Status(StatusCode::kInvalidArgument, "the magnitude is an fp64 view shaped like out");
  if (!(tol > 0)) return Status(StatusCode::kInvalidArgument, "tol must be > 0");
  core::Problem p;
  Status st = core::validate_and_resolve(q, k, v, spec, mag, rms_mag, {}, Options{}, true, &p);
  if (!st.ok()) return st;
  std::vector<core::ScoreTables<double>> tables;
  tables.reserve(p.batch);
  for (int64_t b = 0; b < p.batch; ++b)
    tables.push_back(core::build_score_tables<double>(p, b, true));
  // Each (batch element, head) on its own (every core for a large problem, as the oracle): it
  // writes its own rows and its own largest row max.
  std::vector<double> tops(p.batch * p.hq, 0.0);
  cpu::parallel_for(p.batch * p.hq, reference::oracle_threads(p), [&](int64_t task, int) {
    const int64_t b = task / p.hq, h = task % p.hq;
    const core::Sequence& s = p.seqs[b];
    const reference::HeadForward f = reference::forward_head(p, tables[b], b, h, DType::kF64);
    const std::vector<double> pm = floors(p, f, tol, softcap_rel).pm;
    for (int64_t i = 0; top_score && i < s.nq; ++i) {
      // The row's max over its allowed finite scores, unless at the bottom of fp32's range (a
      // row of nothing but the lowest value: its scores round to one, its weights are exact).
      double m = -INFINITY;
      for (int64_t j = 0; j < s.nk; ++j)
        if (f.A[i * s.nk + j] && std::isfinite(f.S[i * s.nk + j]))
          m = std::max(m, f.S[i * s.nk + j]);
      if (m > -0.5 * FLT_MAX) tops[task] = std::max(tops[task], std::abs(m));
    }
    std::vector<double> pv_abs(p.dv);
    for (int64_t i = 0; i < s.nq; ++i) {
      const int64_t row = s.q_start + i;
      const double kappa = pv_magnitude(f, pm, i, p.dv, pv_abs), r = f.rms[i];
      if (p.row_stat.defined())  // |P~|V|| / sqrt(dv): what O's error moves the RMS by
        p.row_stat.at(b, h, row) = static_cast<float>(kappa * r);
      double* out = static_cast<double*>(p.out.row(b, h, row));
      for (int64_t c = 0; c < p.dv; ++c) {
        const double gain =
            norm.kind != NormalizerKind::kReLA
                ? 1.0
                : std::abs(core::load_as_double(norm.rela_gain.data, norm.rela_gain.dtype,
                                                c * norm.rela_gain.strides[0])) *
                      (1 + kappa) / r;
        out[c] = gate_at(p, b, h, row, c) * gain * pv_abs[c];
      }
    }
  });
  if (top_score) *top_score = tops.empty() ? 0.0 : *std::max_element(tops.begin(), tops.end());
  return {};
}

Status kernel_row_stat_slack(const TensorView& q, const TensorView& k, const TensorView& v,
                             const AttentionSpec& spec, const TensorView& out,
                             const TensorView& slack, double softcap_rel) {
  const Normalizer& norm = spec.normalizer;
  if (norm.kind != NormalizerKind::kKernel)
    return Status(StatusCode::kInvalidArgument, "the slack is the normalized kernel's");
  core::Problem p;
  Status st = core::validate_and_resolve(q, k, v, spec, out, slack, {}, Options{}, true, &p);
  if (!st.ok()) return st;
  for (int64_t b = 0; b < p.batch; ++b) {
    const core::Sequence& s = p.seqs[b];
    const core::ScoreTables<double> tables = core::build_score_tables<double>(p, b, true);
    for (int64_t h = 0; h < p.hq; ++h) {
      const reference::HeadForward f = reference::forward_head(p, tables, b, h, DType::kF64);
      for (int64_t i = 0; i < s.nq; ++i) {
        const double ls = f.length_scale[i];
        double e = 0;
        for (int64_t j = 0; j < s.nk; ++j)
          if (f.P[i * s.nk + j] > 0)
            e += f.P[i * s.nk + j] *
                 std::abs(dlog_kernel_feature(f.S[i * s.nk + j] * ls, norm.feature)) *
                 score_error(p, f, i, j, softcap_rel) * ls;
        p.row_stat.at(b, h, s.q_start + i) = static_cast<float>(norm.power * e);
      }
    }
  }
  return {};
}

}  // namespace attnkit::tools
