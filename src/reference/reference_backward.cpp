// The float64 oracle of the backward pass: every gradient of MECHANISMS.md 1.1-1.5 by the chain
// rule through the forward's float64 intermediates (reference/reference.h), full matrices.
//
// Per (batch, query head), from dO_final = grad_out:
//   gate:   O_final = O1 * sigmoid(G)       -> dG, dO1
//   ReLA:   O1 = gain * O / rms(O)          -> dgain, dO      (else O1 = O)
//   P V:    dV_j += sum_i P_ij dO_i,  dP_ij = dO_i . V_j
//   norm:   dS from dP (softmax: P (dP - D), D_i = dO_i . O_i; sink: dsink = -sum_i p_sink,i D_i;
//           sigmoid: dP P (1 - P), dbeta = sum dS; kernel: the softmax's over p log f(s') times
//           p ls (log f)'(s'); ReLA)
//   cap:    dT = dS * (1 - tanh^2(T / c))  (T = scale q.k + additive terms)
//   terms:  dbias, dU, dW, dtable, dlog_f (reverse prefix sums), dslopes from dT
//   q, k:   dQ_i = scale sum_j dT_ij K_j,  dK_j += scale sum_i dT_ij Q_i
#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "attnkit/variant/normalizers.h"
#include "core/convert.h"
#include "cpu/parallel.h"
#include "reference/reference.h"

namespace attnkit {
namespace {

// A gradient accumulated in float64 in the logical (row-major) order of its tensor's shape.
struct Acc {
  const TensorView* t = nullptr;
  std::vector<double> x;
  explicit Acc(const TensorView& view) : t(&view) {
    if (view.defined()) x.assign(view.numel(), 0.0);
  }
  bool on() const { return !x.empty(); }
  // Writes the accumulated values through the tensor's strides.
  void store() const {
    if (!on()) return;
    for (int64_t flat = 0; flat < static_cast<int64_t>(x.size()); ++flat) {
      int64_t rem = flat, off = 0;
      for (int d = t->ndim - 1; d >= 0; --d) {
        off += (rem % t->shape[d]) * t->strides[d];
        rem /= t->shape[d];
      }
      core::store_from_double(t->data, t->dtype, off, x[flat]);
    }
  }
};

}  // namespace

namespace reference {
Status resolve_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                        const TensorView& grad_out, const AttentionSpec& spec,
                        const AttentionGrads& grads, core::Problem* p, core::GradOperands* ops) {
  TensorView out_like = q;  // validation of the forward needs an `out`: q's layout with dv
  out_like.shape[out_like.ndim - 1] = v.ndim > 0 ? v.shape[v.ndim - 1] : 0;
  for (int64_t i = out_like.ndim - 1, stride = 1; i >= 0; --i) {  // contiguous: it never overlaps
    out_like.strides[i] = stride;
    stride *= std::max<int64_t>(out_like.shape[i], 1);
  }
  out_like.data = q.data;  // q's dtype and alignment (grad_out is checked as itself)
  out_like.dtype = q.dtype;
  const Status st = core::validate_and_resolve(q, k, v, spec, out_like, {}, {}, Options{}, true, p);
  if (!st.ok()) return st;
  if (p->device != Device::kCPU)
    return Status(StatusCode::kTypeError,
                  "q is on a CUDA device: the float64 oracle reads host memory (copy to the CPU)");
  return core::validate_grads(*p, q, k, v, grad_out, grads, ops);
}
}  // namespace reference

Status reference_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                          const TensorView& grad_out, const AttentionSpec& spec,
                          const AttentionGrads& grads) {
  core::Problem p;
  core::GradOperands ops;
  const Status st = reference::resolve_backward(q, k, v, grad_out, spec, grads, &p, &ops);
  if (!st.ok()) return st;
  core::zero_padding_grads(p, grads);

  const Normalizer& norm = spec.normalizer;
  const ScoreMods& mods = spec.mods;
  const int64_t d = p.d, dv = p.dv;
  Acc dbias(grads.dbias), du(grads.dlow_rank_u), dw(grads.dlow_rank_w);
  Acc dtable(grads.drelative_table), dlogf(grads.dforget_log_f), dslopes(grads.dalibi_slopes);
  Acc dsinks(grads.dsinks), dbeta(grads.dbeta), dgain(grads.drela_gain), dgate(grads.dgate);

  for (int64_t b = 0; b < p.batch; ++b) {
    const core::Sequence& s = p.seqs[b];
    const core::ScoreTables<double> tables = core::build_score_tables<double>(p, b, true);
    const int64_t nq = s.nq, nk = s.nk;
    std::vector<std::vector<double>> dK(p.hk, std::vector<double>(nk * d, 0.0));
    std::vector<std::vector<double>> dV(p.hk, std::vector<double>(nk * dv, 0.0));
    // Every head's forward first, on every core for a large problem (oracle_threads); the chain
    // rule below then runs head after head as before, so the sums keep their order.
    std::vector<reference::HeadForward> forwards(p.hq);
    cpu::parallel_for(p.hq, reference::oracle_threads(p), [&](int64_t h, int) {
      forwards[h] = reference::forward_head(p, tables, b, h, DType::kF64);
    });
    for (int64_t h = 0; h < p.hq; ++h) {
      const reference::HeadForward f = std::move(forwards[h]);
      const int64_t hk = f.hk;
      // dO through the gate and ReLA.
      std::vector<double> dO(nq * dv), O1(nq * dv);
      for (int64_t i = 0; i < nq; ++i) {
        const int64_t row = s.q_start + i;
        const void* go = ops.grad_out.row(b, h, row);
        double* dOi = &dO[i * dv];
        double* o1 = &O1[i * dv];
        const double* o = &f.O[i * dv];
        for (int64_t c = 0; c < dv; ++c) dOi[c] = core::load_as_double(go, ops.grad_out.dtype, c);
        for (int64_t c = 0; c < dv; ++c)
          o1[c] = norm.kind == NormalizerKind::kReLA
                      ? core::load_as_double(norm.rela_gain.data, norm.rela_gain.dtype,
                                             c * norm.rela_gain.strides[0]) *
                            o[c] / f.rms[i]
                      : o[c];
        if (spec.gate_kind == GateKind::kElementwise) {
          const void* gr = p.gate.row(b, h, row);
          for (int64_t c = 0; c < dv; ++c) {
            const double G_c = core::load_as_double(gr, p.gate.dtype, c), g = sigmoid(G_c);
            if (dgate.on()) {
              // dgate has the gate's shape: [B, Hq, Nq, dv] (BHND) or its layout's order.
              const TensorView& G = spec.gate;
              const int64_t idx = p.varlen ? (row * p.hq + h) * dv + c
                                  : spec.layout == Layout::kBHND
                                      ? ((b * p.hq + h) * G.shape[2] + row) * dv + c
                                      : ((b * G.shape[1] + row) * p.hq + h) * dv + c;
              dgate.x[idx] += dOi[c] * o1[c] * g * sigmoid(-G_c);  // 1 - g, kept past 37
            }
            dOi[c] *= g;
          }
        } else if (spec.gate_kind == GateKind::kPerHead) {
          const double gh = core::load_as_double(p.gate.row(b, h, row), p.gate.dtype, 0);
          const double g = sigmoid(gh);
          double acc = 0;
          for (int64_t c = 0; c < dv; ++c) {
            acc += dOi[c] * o1[c];
            dOi[c] *= g;
          }
          if (dgate.on()) {
            const int64_t idx =
                p.varlen ? h * spec.gate.shape[1] + row : (b * p.hq + h) * spec.gate.shape[2] + row;
            dgate.x[idx] += acc * g * sigmoid(-gh);
          }
        }
        if (norm.kind == NormalizerKind::kReLA) {
          const double r = f.rms[i];
          double dot = 0;
          for (int64_t c = 0; c < dv; ++c) {
            const double gain = core::load_as_double(norm.rela_gain.data, norm.rela_gain.dtype,
                                                     c * norm.rela_gain.strides[0]);
            if (dgain.on()) dgain.x[c] += dOi[c] * o[c] / r;
            dot += gain * dOi[c] * o[c];
          }
          for (int64_t c = 0; c < dv; ++c) {
            const double gain = core::load_as_double(norm.rela_gain.data, norm.rela_gain.dtype,
                                                     c * norm.rela_gain.strides[0]);
            dOi[c] = gain * dOi[c] / r - o[c] * dot / (static_cast<double>(dv) * r * r * r);
          }
        }
      }
      // dV and dP.
      std::vector<double> dP(nq * nk, 0.0);
      for (int64_t i = 0; i < nq; ++i)
        for (int64_t j = 0; j < nk; ++j) {
          const int64_t x = i * nk + j;
          if (!f.A[x]) continue;
          double acc = 0;
          for (int64_t c = 0; c < dv; ++c) {
            acc += dO[i * dv + c] * f.V[j * dv + c];
            dV[hk][j * dv + c] += f.P[x] * dO[i * dv + c];
          }
          dP[x] = acc;
        }
      // dS through the normalizer, then dT through the softcap.
      std::vector<double> dT(nq * nk, 0.0);
      for (int64_t i = 0; i < nq; ++i) {
        double D = 0;  // sum_j P_ij dP_ij
        for (int64_t j = 0; j < nk; ++j) D += f.P[i * nk + j] * dP[i * nk + j];
        if (norm.kind == NormalizerKind::kSoftmaxSink && dsinks.on() && std::isfinite(f.lse[i]))
          dsinks.x[h] -= std::exp(f.sink - f.lse[i]) * D;
        for (int64_t j = 0; j < nk; ++j) {
          const int64_t x = i * nk + j;
          if (!f.A[x]) continue;
          double dS = 0;
          switch (norm.kind) {
            case NormalizerKind::kSoftmax:
            case NormalizerKind::kSoftmaxSink:
              dS = f.P[x] * (dP[x] - D);
              break;
            case NormalizerKind::kSigmoid:
              dS = dP[x] * f.P[x] * sigmoid(-(f.S[x] + f.beta));  // 1 - P, kept past |z| ~ 37
              if (dbeta.on()) dbeta.x[0] += dS;
              break;
            case NormalizerKind::kKernel: {  // P = exp(p log f(s') - log L): as a softmax
              const double ls = f.length_scale[i];
              if (f.P[x] == 0 || ls == 0) break;
              dS = f.P[x] * (dP[x] - D) * norm.power *
                   dlog_kernel_feature(f.S[x] * ls, norm.feature) * ls;
              break;
            }
            case NormalizerKind::kReLA:
              dS = f.S[x] > 0 ? dP[x] : 0.0;
              break;
          }
          dT[x] = dS * f.mods.cap_grad(f.T[x]);
        }
      }
      // The additive terms.
      for (int64_t i = 0; i < nq; ++i) {
        const int64_t ia = i + s.offset;
        for (int64_t j = 0; j < nk; ++j) {
          const double g = dT[i * nk + j];
          if (g == 0) continue;
          if (dbias.on()) {
            const TensorView& B = mods.bias;
            const int64_t bb = B.shape[0] == 1 ? 0 : b, bh = B.shape[1] == 1 ? 0 : h;
            dbias.x[((bb * B.shape[1] + bh) * B.shape[2] + i) * B.shape[3] + j] += g;
          }
          if (du.on() || dw.on()) {
            const int64_t r = f.mods.rank;
            for (int64_t e = 0; e < r; ++e) {
              if (du.on()) du.x[((b * p.hq + h) * nq + i) * r + e] += g * f.mods.w[j * r + e];
              if (dw.on()) dw.x[((b * p.hq + h) * nk + j) * r + e] += g * f.mods.u[i * r + e];
            }
          }
          if (dtable.on()) {
            const int64_t bucket = f.mods.bucket_of[j - ia + f.mods.bucket_origin];
            dtable.x[h * mods.relative_table.shape[1] + bucket] += g;
          }
          if (dlogf.on()) {  // t += c[i'] - c[j], c = prefix sums of log f
            dlogf.x[(b * p.hq + h) * nk + ia] += g;
            dlogf.x[(b * p.hq + h) * nk + j] -= g;
          }
          if (dslopes.on())
            dslopes.x[h] -= g * static_cast<double>(mods.alibi == AlibiMode::kCausal
                                                        ? ia - j
                                                        : (ia > j ? ia - j : j - ia));
        }
      }
      // dQ, dK.
      for (int64_t i = 0; i < nq; ++i) {
        std::vector<double> dq(d, 0.0);
        for (int64_t j = 0; j < nk; ++j) {
          const double g = dT[i * nk + j] * p.scale64;
          if (g == 0) continue;
          for (int64_t c = 0; c < d; ++c) {
            dq[c] += g * f.K[j * d + c];
            dK[hk][j * d + c] += g * f.Q[i * d + c];
          }
        }
        void* dst = ops.dq.row(b, h, s.q_start + i);
        for (int64_t c = 0; c < d; ++c) core::store_from_double(dst, ops.dq.dtype, c, dq[c]);
      }
    }
    for (int64_t hk = 0; hk < p.hk; ++hk)
      for (int64_t j = 0; j < nk; ++j) {
        void* kdst = ops.dk.row(b, hk, s.k_start + j);
        void* vdst = ops.dv.row(b, hk, s.k_start + j);
        for (int64_t c = 0; c < d; ++c)
          core::store_from_double(kdst, ops.dk.dtype, c, dK[hk][j * d + c]);
        for (int64_t c = 0; c < dv; ++c)
          core::store_from_double(vdst, ops.dv.dtype, c, dV[hk][j * dv + c]);
      }
  }
  // Forget gate: d log f_m = sum_{n >= m} dc_n (c is a prefix sum over key positions).
  if (dlogf.on()) {
    const int64_t nk = mods.forget_log_f.shape[2];
    for (int64_t row = 0; row < p.batch * p.hq; ++row) {
      double acc = 0;
      for (int64_t m = nk - 1; m >= 0; --m) {
        acc += dlogf.x[row * nk + m];
        dlogf.x[row * nk + m] = acc;
      }
    }
  }
  for (const Acc* a :
       {&dbias, &du, &dw, &dtable, &dlogf, &dslopes, &dsinks, &dbeta, &dgain, &dgate})
    a->store();
  return {};
}

}  // namespace attnkit
