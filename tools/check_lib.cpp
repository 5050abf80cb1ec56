// check_mechanism() / check_backward(): one problem through a backend (the CPU, or the GPU with
// inputs copied there) and the float64 oracle, forward or backward, judged by the tolerances of
// DESIGN.md; check_forward() and the Instance overload of check_backward() take a problem the
// caller built (the fuzzer's), the named-mechanism entries build one first.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <span>

#include "device_mirror.h"
#include "magnitudes.h"
#include "reference/reference.h"
#include "spec_json.h"

namespace attnkit::tools {

double tolerance_for(DType t) {
  // DESIGN.md: about 1e-5 for fp32 and 1e-2 for bf16 in practice; fp16 has 3 more mantissa bits.
  switch (t) {
    case DType::kBF16:
      return 1e-2;
    case DType::kF16:
      return 2e-3;
    default:
      return 1e-5;
  }
}

DType parse_dtype(const std::string& s, bool* ok) {
  *ok = true;
  if (s == "fp32" || s == "float32") return DType::kF32;
  if (s == "bf16" || s == "bfloat16") return DType::kBF16;
  if (s == "fp16" || s == "float16") return DType::kF16;
  *ok = false;
  return DType::kF32;
}

bool is_rule_refusal(const Status& s) {
  if (s.ok() || s.code() == StatusCode::kInternal || s.message().empty()) return false;
  std::string m = s.message();
  std::transform(m.begin(), m.end(), m.begin(), [](unsigned char c) { return std::tolower(c); });
  for (const char* failure : {"internal", "launch failed", "out of memory", "allocation failed",
                              "illegal address", "unspecified launch"})
    if (m.find(failure) != std::string::npos) return false;
  return true;
}

namespace {

// A BNHD copy of a BHND tensor (same values, other strides).
OwnedTensor to_bnhd(const OwnedTensor& t) {
  const TensorView& v = t.view;
  OwnedTensor o = OwnedTensor::zeros(v.dtype, {v.shape[0], v.shape[2], v.shape[1], v.shape[3]});
  const int es = dtype_size(v.dtype);
  for (int64_t b = 0; b < v.shape[0]; ++b)
    for (int64_t h = 0; h < v.shape[1]; ++h)
      for (int64_t n = 0; n < v.shape[2]; ++n)
        std::memcpy(o.bytes.data() + (((b * v.shape[2] + n) * v.shape[1] + h) * v.shape[3]) * es,
                    t.bytes.data() + (((b * v.shape[1] + h) * v.shape[2] + n) * v.shape[3]) * es,
                    v.shape[3] * es);
  return o;
}

// sum x_i^2
double dot(const std::vector<double>& x) {
  double n = 0;
  for (double e : x) n += e * e;
  return n;
}

// ||x - y|| beyond an allowance per element: sqrt(sum_i max(0, |x_i - y_i| - allow_i)^2), where
// allow_i = tol m_i + floor (m empty: 0); a NaN in x is an infinite error. An element whose error
// stays within what its own conditioning allows adds nothing, so one ill-conditioned element
// (a row of ReLA at its kink) does not widen the judgment of the others.
double excess_error(const std::vector<double>& x, const std::vector<double>& y,
                    const std::vector<double>& m, double tol, double floor) {
  double n = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    if (std::isnan(x[i])) return INFINITY;
    const double e = std::abs(x[i] - y[i]) - floor - (m.empty() ? 0.0 : tol * m[i]);
    if (e > 0) n += e * e;
  }
  return std::sqrt(n);
}

// Records one judged quantity in r.judged (and in r.error where it missed).
// `raw`: the error before the allowances (shown where they forgave some).
void judge(CheckResult& r, const std::string& name, double err, double tol,
           const std::string& against = "", double raw = 0) {
  r.judged += (r.judged.empty() ? "" : ", ") + name + " " + num(err) + "/" + num(tol) +
              (raw > err ? " (raw " + num(raw) + ")" : "");
  if (err <= tol) return;  // a NaN error misses too
  r.error +=
      (r.error.empty() ? "" : "; ") + name + " error " + num(err) + " > tol " + num(tol) + against;
}

// The refusal or failure of a call, after can_run* said `verdict` about the same arguments: a
// call that does what can_run refused, or refuses what it accepted, is a failure.
void note_status(CheckResult& r, const std::string& what, const Status& verdict, const Status& s) {
  r.not_covered = s.code() == StatusCode::kNotImplemented;
  r.refused = is_rule_refusal(s) && !verdict.ok();
  r.error = what + ": " + (s.ok() ? std::string("ran") : s.message());
  if (verdict.ok() != s.ok())
    r.error += " (but its can_run check said: " + (verdict.ok() ? "ok" : verdict.message()) + ")";
}

}  // namespace

std::string make_instance(const std::string& mechanism, const CheckOptions& opt, Instance& inst) {
  json spec = mechanism_spec(mechanism, opt.dims);
  if (spec.is_null()) return "mechanism '" + mechanism + "' does not apply to this shape";
  if (opt.with.is_object()) spec.update(opt.with);
  inst.dims = opt.dims;
  inst.dtype = opt.dtype;
  make_random_qkv(inst, opt.input_scale, opt.seed);
  std::string err = build_spec(spec, inst, random_extras(opt.seed + 7));
  if (!err.empty()) return err;
  if (opt.bnhd) {
    inst.q = to_bnhd(inst.q);
    inst.k = to_bnhd(inst.k);
    inst.v = to_bnhd(inst.v);
    inst.spec.layout = Layout::kBNHD;
    if (inst.spec.gate_kind == GateKind::kElementwise) {  // addressed like out
      inst.extras["gate"] = to_bnhd(inst.extras["gate"]);
      inst.spec.gate = inst.extras["gate"].view;
    }
  }
  return "";
}

namespace {

// A named mechanism's instance (make_instance) through `check`.
template <class Check>
CheckResult check_named(const std::string& mechanism, const CheckOptions& opt, Check check) {
  Instance inst;
  const std::string err = make_instance(mechanism, opt, inst);
  CheckResult r;
  if (err.empty()) r = check(inst);
  r.mechanism = mechanism;
  if (!err.empty()) r.error = err;
  return r;
}

CheckResult result_for(const Instance& inst, double tol) {
  CheckResult r;
  r.dtype = dtype_name(inst.dtype);
  r.dims = inst.dims;
  r.tol = tol;
  return r;
}

}  // namespace

CheckResult check_mechanism(const std::string& mechanism, const CheckOptions& opt) {
  return check_named(mechanism, opt, [&](Instance& inst) { return check_forward(inst, opt); });
}

CheckResult check_forward(Instance& inst, const CheckOptions& opt) {
  CheckResult r = result_for(inst, tolerance_for(inst.dtype));
  const bool cuda = opt.device == Device::kCUDA;
  Outputs fast = make_outputs(inst, opt.stats, opt.entropy),
          ref = make_outputs(inst, opt.stats, opt.entropy);
  for (Outputs* o : {&fast, &ref})
    if (o->col_mass.view.defined() && opt.col_mass_group_sum)
      o->col_mass = OwnedTensor::zeros(DType::kF32, {inst.dims.batch, inst.dims.hk, inst.dims.nk});
  for (OwnedTensor* t : {&fast.out, &fast.row_stat, &fast.row_max, &fast.entropy, &fast.col_mass})
    poison(*t);
  auto stats_of = [&](Outputs& o) {
    AttentionStats s = stats_views(o);
    s.col_mass_q_begin = opt.col_mass_q_begin;
    s.col_mass_q_end = opt.col_mass_q_end;
    s.col_mass_group_sum = opt.col_mass_group_sum;
    return s;
  };
  Options o;
  o.num_threads = opt.threads;
  o.deterministic = opt.deterministic;
  Status s, verdict;
  const auto t0 = std::chrono::steady_clock::now();
  if (cuda) {
    DeviceMirror dm;
    AttentionSpec spec = inst.spec;
    dm.mirror_spec(spec);
    const TensorView q = dm.to_device(inst.q.view), k = dm.to_device(inst.k.view),
                     v = dm.to_device(inst.v.view);
    const TensorView out = dm.to_device(fast.out.view, opt.out_offset),
                     rs = dm.to_device(fast.row_stat.view);
    const AttentionStats host_stats = stats_of(fast);
    AttentionStats dev_stats = host_stats;
    dev_stats.row_max = dm.to_device(host_stats.row_max);
    dev_stats.entropy = dm.to_device(host_stats.entropy);
    dev_stats.col_mass = dm.to_device(host_stats.col_mass);
    verdict = can_run(q, k, v, spec, out, rs, dev_stats, o);
    s = attention_forward(q, k, v, spec, out, rs, dev_stats, o);
    if (s.ok()) s = DeviceMirror::synchronize();
    if (s.ok()) s = dm.to_host(out, fast.out.view);
    if (s.ok()) s = dm.to_host(rs, fast.row_stat.view);
    for (const auto& [d, h] : {std::pair{dev_stats.row_max, host_stats.row_max},
                               {dev_stats.entropy, host_stats.entropy},
                               {dev_stats.col_mass, host_stats.col_mass}})
      if (s.ok() && d.defined()) s = dm.to_host(d, h);
  } else {
    const AttentionStats stats = stats_of(fast);
    verdict = can_run(inst.q.view, inst.k.view, inst.v.view, inst.spec, fast.out.view,
                      fast.row_stat.view, stats, o);
    s = attention_forward(inst.q.view, inst.k.view, inst.v.view, inst.spec, fast.out.view,
                          fast.row_stat.view, stats, o);
  }
  r.ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  if (!s.ok() || !verdict.ok()) {
    note_status(r, cuda ? "cuda" : "cpu", verdict, s);
    if (!cuda) r.not_covered = false;  // the CPU runs every mechanism: a refusal is a failure
    return r;
  }
  // Packed rows past the last sequence are padding, whose output the forward need not write
  // (as FlashAttention): zeroed on both sides once they ran.
  auto unpad = [&](Outputs& o) {
    if (!inst.spec.cu_seqlens_q.defined()) return;
    const TensorView& cu = inst.spec.cu_seqlens_q;
    const int64_t rows = static_cast<const int32_t*>(cu.data)[(cu.shape[0] - 1) * cu.strides[0]];
    core::zero_rows_from(o.out.view, 0, rows);
    for (OwnedTensor* t : {&o.row_stat, &o.row_max, &o.entropy})
      core::zero_rows_from(t->view, 1, rows);
  };
  unpad(fast);
  ref.out = zeros_like(fast.out, DType::kF64);
  for (OwnedTensor* t : {&ref.out, &ref.row_stat, &ref.row_max, &ref.entropy, &ref.col_mass})
    poison(*t);  // the oracle writes every element too
  s = reference_forward(inst.q.view, inst.k.view, inst.v.view, inst.spec, ref.out.view,
                        ref.row_stat.view, stats_of(ref));
  unpad(ref);
  if (!s.ok()) {
    r.error = "reference: " + s.message();
    return r;
  }
  // The output's magnitude (output_magnitude: |gate| P|V|, after ReLA |gain| P|V| (1 + k) / rms):
  // without floors (tol infinite), how far O cancels; for ReLA, with the floors of its tolerance,
  // the allowance of each element.
  const bool rela = inst.spec.normalizer.kind == NormalizerKind::kReLA;
  const double softcap_rel = cuda ? kCudaSoftcapRel : 0.0;
  std::vector<double> out_mag, out_mag_rela, rms_mag;
  double top_score = 0;
  auto magnitude = [&](double tol, std::vector<double>& m, std::vector<double>* rms) {
    OwnedTensor t = zeros_like(fast.out, DType::kF64), rt;
    if (rms && fast.row_stat.view.defined()) rt = zeros_like(fast.row_stat, DType::kF32);
    const Status st = output_magnitude(inst.q.view, inst.k.view, inst.v.view, inst.spec, tol,
                                       t.view, rt.view, softcap_rel, &top_score);
    m = t.to_doubles();
    if (rms && rt.view.defined()) *rms = rt.to_doubles();
    return st;
  };
  s = magnitude(INFINITY, out_mag, nullptr);
  if (s.ok() && rela) s = magnitude(r.tol, out_mag_rela, &rms_mag);
  if (!s.ok()) {
    r.error = "output_magnitude: " + s.message();
    return r;
  }
  // DESIGN.md's rule: at most 2x the error of a naive computation in the input dtype, plus a
  // floor of 1e-6; never looser than the fixed per-dtype tolerance of the output's magnitude
  // (|P|V||, not |O|: where P V cancels, dv 1 under a uniform softmax, the naive computation is
  // off by more than the fixed tolerance of |O|, and so is any other). Applied to bf16 and fp16,
  // where the naive error is the sum of many roundings of S and P and so is stable. In fp32 at
  // large logits (|s| ~ 1e3) one run's error is one or two roundings of the top scores: over
  // seeds the fast / naive ratio ranged from 0.3 to 7 both ways, so fp32 keeps its fixed 1e-5
  // as the bound, loosened to 2x the naive error where the naive computation itself misses it
  // (fuzz seed 23584: 1.6e-5 against the naive's 7.7e-6) and to one fp32 unit u = 2^-24 of
  // the largest row max |m| (u |m| = 1e-5 at |m| ~ 170): an fp32 backend rounds S - m, and so
  // every weight that counts, to units of it (seed 915800: |S| to 1125, 1.16e-5 against the
  // naive's 3.3e-6; 23584: 434, 1.6e-5), up to 1e-4 either way.
  Outputs naive = make_outputs(inst, false);
  s = reference::forward(inst.q.view, inst.k.view, inst.v.view, inst.spec, naive.out.view,
                         naive.row_stat.view, {}, inst.dtype);
  if (!s.ok()) {
    r.error = "naive reference: " + s.message();
    return r;
  }
  const std::vector<double> x = fast.out.to_doubles(), y = ref.out.to_doubles();
  const double ref_norm = std::sqrt(dot(y)), mag_norm = std::sqrt(dot(out_mag));
  r.naive_err = rel_error(naive.out.to_doubles(), y);
  if (inst.dtype != DType::kF32)
    r.tol = std::min(r.tol * std::max(1.0, ref_norm > 0 ? mag_norm / ref_norm : 1.0),
                     2 * r.naive_err + 1e-6);
  else if (std::isfinite(r.naive_err))  // at most 1e-4: a regression is not forgiven
    r.tol = std::max(
        {r.tol, std::min(2 * r.naive_err + 1e-6, 1e-4), std::min(kF32Unit * top_score, 1e-4)});
  for (double e : x)
    if (std::isnan(e)) {
      r.error = "NaN in the output";
      return r;
    }
  // out relative to |ref|, beyond what storing each element in its dtype may cost (an fp16
  // output under 6e-5 keeps half the spacing of its subnormals) and, for ReLA, tol times its
  // magnitude (ReLA divides O by its own RMS, so O's error where O cancels or a score sits at
  // the kink is the output's, whatever its scale).
  const double raw = rel_error(x, y);
  const double err = excess_error(x, y, out_mag_rela, r.tol, subnormal_floor(inst.dtype));
  r.rel_err = ref_norm > 0 ? err / ref_norm : err;
  r.max_abs = max_abs_error(x, y);
  judge(r, "out", r.rel_err, r.tol, " (naive " + num(r.naive_err) + ")", raw);
  // Per-row statistics (fp32 outputs on both sides): relative to max(1, |ref|), beyond a slack
  // per row where the statistic is ill-conditioned (kernel_row_stat_slack).
  auto stat_err = [](const OwnedTensor& a, const OwnedTensor& b, const OwnedTensor* slack) {
    const std::vector<double> u = a.to_doubles(), w = b.to_doubles();
    const std::vector<double> z = slack ? slack->to_doubles() : std::vector<double>(u.size());
    double m = 0;
    for (size_t i = 0; i < u.size(); ++i) {
      if (u[i] == w[i]) continue;
      const double e = std::max(0.0, std::abs(u[i] - w[i]) - z[i]) / std::max(1.0, std::abs(w[i]));
      m = std::isnan(e) || std::isnan(u[i]) ? INFINITY : std::max(m, e);
    }
    return m;
  };
  OwnedTensor slack;
  if (inst.spec.normalizer.kind == NormalizerKind::kKernel && fast.row_stat.view.defined()) {
    slack = zeros_like(fast.row_stat, DType::kF32);
    s = kernel_row_stat_slack(inst.q.view, inst.k.view, inst.v.view, inst.spec, naive.out.view,
                              slack.view, softcap_rel);
    if (!s.ok()) {
      r.error = "kernel_row_stat_slack: " + s.message();
      return r;
    }
  }
  // The CUDA kernels take the softcap's tanh on the special-function unit (kCudaSoftcapRel):
  // scores up to the cap c move by 2^-11 c, and the LSE, P and their sums with them.
  const double stat_tol = std::max(1e-4 * std::max(1.0, opt.input_scale * opt.input_scale),
                                   2 * softcap_rel * inst.spec.mods.softcap);
  for (const auto& [name, a, b] : {std::tuple{"row_stat", &fast.row_stat, &ref.row_stat},
                                   {"row_max", &fast.row_max, &ref.row_max},
                                   {"entropy", &fast.entropy, &ref.entropy},
                                   {"col_mass", &fast.col_mass, &ref.col_mass}}) {
    if (!a->view.defined()) continue;
    if (rela && a == &fast.row_stat) {
      // ReLA's statistic is the RMS of O itself, sqrt(|O_i|^2 / dv + eps): it moves by at most
      // |dO_i| / sqrt(dv), so it is judged over all rows, beyond tol times each row's rms_mag,
      // by the dtype's fixed tolerance (where P enters P V in the input dtype, on the GPU as in
      // FlashAttention and on CPUs with bf16 dot products, the RMS carries P's rounding, which
      // the scale-free output and so the naive rule do not see).
      const std::vector<double> u = a->to_doubles(), w = b->to_doubles();
      const double tol = tolerance_for(inst.dtype), w_norm = std::sqrt(dot(w));
      const double e = excess_error(u, w, rms_mag, tol, 0) / (w_norm > 0 ? w_norm : 1);
      r.stat_err = std::max(r.stat_err, e);
      judge(r, name, e, tol, "", rel_error(u, w));
      continue;
    }
    const double e =
        stat_err(*a, *b, slack.view.defined() && a == &fast.row_stat ? &slack : nullptr);
    r.stat_err = std::max(r.stat_err, e);
    judge(r, name, e, stat_tol);
  }
  r.ok = r.error.empty();
  return r;
}

double backward_tolerance_for(DType t) {
  return t == DType::kF32 ? 2e-5 : t == DType::kBF16 ? 2e-2 : 3e-3;
}

std::vector<ExtraGrad> extra_grads(const AttentionSpec& spec) {
  std::vector<ExtraGrad> e;
  auto add = [&](const char* name, TensorView AttentionGrads::*member, const TensorView& input) {
    if (input.defined())
      e.push_back({name, member, std::vector<int64_t>(input.shape, input.shape + input.ndim)});
  };
  const ScoreMods& m = spec.mods;
  add("dbias", &AttentionGrads::dbias, m.bias);
  add("dlow_rank_u", &AttentionGrads::dlow_rank_u, m.low_rank_u);
  add("dlow_rank_w", &AttentionGrads::dlow_rank_w, m.low_rank_w);
  add("drelative_table", &AttentionGrads::drelative_table, m.relative_table);
  add("dforget_log_f", &AttentionGrads::dforget_log_f, m.forget_log_f);
  add("dalibi_slopes", &AttentionGrads::dalibi_slopes, m.alibi_slopes);
  add("dsinks", &AttentionGrads::dsinks, spec.normalizer.sinks);
  add("drela_gain", &AttentionGrads::drela_gain, spec.normalizer.rela_gain);
  add("dgate", &AttentionGrads::dgate, spec.gate);
  if (spec.normalizer.kind == NormalizerKind::kSigmoid)
    e.push_back({"dbeta", &AttentionGrads::dbeta, {1}});
  return e;
}

CheckResult check_backward(const std::string& mechanism, const CheckOptions& opt) {
  return check_named(mechanism, opt, [&](Instance& inst) { return check_backward(inst, opt); });
}

CheckResult check_backward(Instance& inst, const CheckOptions& opt) {
  CheckResult r = result_for(inst, backward_tolerance_for(inst.dtype));
  Outputs o = make_outputs(inst, false);
  const OwnedTensor go = random_tensor(
      inst.dtype, std::vector<int64_t>(o.out.view.shape, o.out.view.shape + o.out.view.ndim), 1.0,
      opt.seed + 31);
  Options op;
  op.num_threads = opt.threads;
  op.deterministic = opt.deterministic;
  const bool cuda = opt.device == Device::kCUDA;
  const std::string where = cuda ? "cuda" : "cpu";
  // On the GPU: device copies of the inputs and outputs (the forward's out and LSE stay there
  // for the backward).
  DeviceMirror dm;
  AttentionSpec spec = inst.spec;
  TensorView q = inst.q.view, k = inst.k.view, v = inst.v.view, out = o.out.view,
             row_stat = o.row_stat.view, grad_out = go.view;
  if (cuda) {
    dm.mirror_spec(spec);
    q = dm.to_device(q);
    k = dm.to_device(k);
    v = dm.to_device(v);
    out = dm.to_device(out);
    row_stat = dm.to_device(row_stat);
    grad_out = dm.to_device(grad_out);
  }
  Status verdict = can_run(q, k, v, spec, out, row_stat, {}, op);
  Status s = attention_forward(q, k, v, spec, out, row_stat, {}, op);
  if (s.ok() && cuda) s = DeviceMirror::synchronize();
  if (s.ok() && cuda) s = dm.to_host(out, o.out.view);
  if (s.ok() && cuda) s = dm.to_host(row_stat, o.row_stat.view);
  if (!s.ok() || !verdict.ok()) {
    note_status(r, where + " forward", verdict, s);
    r.not_covered = r.not_covered && cuda;
    return r;
  }
  const DType gdt = opt.input_dtype_grads ? inst.dtype : opt.f64_grads ? DType::kF64 : DType::kF32;
  // The backend's gradients (fg), the oracle's (rg) and their magnitudes (mg).
  OwnedTensor fq = zeros_like(inst.q, gdt), fk = zeros_like(inst.k, gdt),
              fv = zeros_like(inst.v, gdt);
  for (OwnedTensor* t : {&fq, &fk, &fv}) poison(*t);
  OwnedTensor rq = zeros_like(inst.q, DType::kF64), rk = zeros_like(inst.k, DType::kF64),
              rv = zeros_like(inst.v, DType::kF64);
  for (OwnedTensor* t : {&rq, &rk, &rv}) poison(*t);  // the oracle writes every element too
  OwnedTensor mq = zeros_like(inst.q, DType::kF64), mk = zeros_like(inst.k, DType::kF64),
              mv = zeros_like(inst.v, DType::kF64);
  AttentionGrads fg{fq.view, fk.view, fv.view}, rg{rq.view, rk.view, rv.view},
      mg{mq.view, mk.view, mv.view};
  AttentionGrads dg = fg;  // the views the backend writes (device copies on the GPU)
  if (cuda) {
    dg.dq = dm.to_device(fq.view, opt.grads_offset);
    dg.dk = dm.to_device(fk.view, opt.grads_offset);
    dg.dv = dm.to_device(fv.view, opt.grads_offset);
  }
  std::vector<ExtraGrad> extras = opt.extras ? extra_grads(inst.spec) : std::vector<ExtraGrad>{};
  if (cuda) {  // extras the CUDA backward does not compute yet are left out (and named)
    std::vector<ExtraGrad> kept;
    for (const ExtraGrad& e : extras) {
      const OwnedTensor t = OwnedTensor::zeros(DType::kF32, e.shape);
      AttentionGrads one = dg;
      one.*e.member = dm.to_device(t.view);
      const Status c = can_run_backward(q, k, v, out, row_stat, grad_out, spec, one, op);
      if (c.code() == StatusCode::kNotImplemented && c.message().find(e.name) != std::string::npos)
        r.extras_not_covered.push_back(e.name);
      else
        kept.push_back(e);
    }
    extras = kept;
  }
  std::vector<OwnedTensor> fx, rx, mx;
  for (const ExtraGrad& e : extras) {
    // With input_dtype_grads, dbias takes the bias's own dtype (as PyTorch gives it).
    const bool own = opt.input_dtype_grads && std::string(e.name) == "dbias";
    fx.push_back(OwnedTensor::zeros(own             ? inst.spec.mods.bias.dtype
                                    : opt.f64_grads ? DType::kF64
                                                    : DType::kF32,
                                    e.shape));
    poison(fx.back());
    rx.push_back(OwnedTensor::zeros(DType::kF64, e.shape));
    poison(rx.back());
    mx.push_back(OwnedTensor::zeros(DType::kF64, e.shape));
  }
  for (size_t i = 0; i < extras.size(); ++i) {
    fg.*extras[i].member = fx[i].view;
    dg.*extras[i].member = cuda ? dm.to_device(fx[i].view) : fx[i].view;
    rg.*extras[i].member = rx[i].view;
    mg.*extras[i].member = mx[i].view;
  }
  verdict = can_run_backward(q, k, v, out, row_stat, grad_out, spec, dg, op);
  const auto t0 = std::chrono::steady_clock::now();
  s = attention_backward(q, k, v, out, row_stat, grad_out, spec, dg, op);
  if (s.ok() && cuda) s = DeviceMirror::synchronize();
  r.ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  if (s.ok() && cuda) {
    for (TensorView AttentionGrads::*m :
         {&AttentionGrads::dq, &AttentionGrads::dk, &AttentionGrads::dv})
      if (s.ok()) s = dm.to_host(dg.*m, fg.*m);
    for (const ExtraGrad& e : extras)
      if (s.ok()) s = dm.to_host(dg.*e.member, fg.*e.member);
  }
  if (!s.ok() || !verdict.ok()) {
    note_status(r, where + " backward", verdict, s);
    return r;
  }
  s = reference_backward(inst.q.view, inst.k.view, inst.v.view, go.view, inst.spec, rg);
  if (s.ok())
    s = gradient_magnitudes(inst.q.view, inst.k.view, inst.v.view, go.view, inst.spec, r.tol, mg,
                            cuda ? kCudaSoftcapRel : 0.0);
  if (!s.ok()) {
    r.error = "reference backward: " + s.message();
    return r;
  }
  auto norm = [](const std::vector<double>& x) {
    double n = 0;
    for (double e : x) n += e * e;
    return std::sqrt(n);
  };
  // Judges got against want relative to `scale`, beyond tol times each element's magnitude and
  // what storing it in its dtype may cost (a value under fp32's range is 0 there); first checks
  // that the magnitude bounds the oracle's gradient element by element (else the bound is
  // wrong).
  auto judge_grad = [&](const std::string& name, const OwnedTensor& got, const OwnedTensor& want,
                        const OwnedTensor& magnitude, double scale) -> double {
    const std::vector<double> x = got.to_doubles(), y = want.to_doubles(),
                              m = magnitude.to_doubles();
    double n = 0;
    for (size_t i = 0; i < x.size(); ++i) {
      if (!(std::abs(y[i]) <= m[i] * (1 + 1e-9) + 1e-300)) {
        r.error += (r.error.empty() ? "" : "; ") + name + " magnitude " + num(m[i]) +
                   " below the oracle's |" + name + "| " + num(std::abs(y[i])) + " at element " +
                   std::to_string(i) + " (gradient_magnitudes is wrong)";
        return static_cast<double>(INFINITY);
      }
      n += std::isnan(x[i]) ? INFINITY : (x[i] - y[i]) * (x[i] - y[i]);
    }
    const double excess = excess_error(x, y, m, r.tol, subnormal_floor(got.view.dtype));
    const double e = scale > 0 ? excess / scale : excess;
    judge(r, name, e, r.tol,
          " (||error|| " + num(std::sqrt(n)) + ", beyond its magnitude " + num(excess) + ", ||" +
              name + "|| " + num(norm(y)) + ")",
          scale > 0 ? std::sqrt(n) / scale : std::sqrt(n));
    return e;
  };
  // Each gradient at its own scale: a dq or dk far smaller than dv (saturated sigmoid scores)
  // is judged on what it is, not hidden under dv's norm.
  r.rel_err = std::max({judge_grad("dq", fq, rq, mq, norm(rq.to_doubles())),
                        judge_grad("dk", fk, rk, mk, norm(rk.to_doubles())),
                        judge_grad("dv", fv, rv, mv, norm(rv.to_doubles()))});
  for (size_t i = 0; i < extras.size(); ++i)
    r.stat_err = std::max(
        r.stat_err, judge_grad(extras[i].name, fx[i], rx[i], mx[i], norm(rx[i].to_doubles())));
  r.ok = r.error.empty();
  return r;
}

BesideOracle run_beside_oracle(const OwnedTensor& q, const OwnedTensor& k, const OwnedTensor& v,
                               const OwnedTensor& grad_out, const AttentionSpec& spec,
                               Device device) {
  BesideOracle r;
  const bool stat = spec.normalizer.kind != NormalizerKind::kSigmoid;
  std::vector<int64_t> shape(q.view.shape, q.view.shape + q.view.ndim);
  shape.back() = v.view.shape[v.view.ndim - 1];
  const std::vector<int64_t> rows(shape.begin(), shape.end() - 1);
  std::vector<TensorView AttentionGrads::*> members = {&AttentionGrads::dq, &AttentionGrads::dk,
                                                       &AttentionGrads::dv};
  std::vector<std::vector<int64_t>> shapes = {
      std::vector<int64_t>(q.view.shape, q.view.shape + q.view.ndim),
      std::vector<int64_t>(k.view.shape, k.view.shape + k.view.ndim),
      std::vector<int64_t>(v.view.shape, v.view.shape + v.view.ndim)};
  for (const ExtraGrad& e : extra_grads(spec)) {
    members.push_back(e.member);
    shapes.push_back(e.shape);
  }
  for (int x = 0; x < 2; ++x) {  // the backend, then the oracle
    const DType gdt = x == 0 ? DType::kF32 : DType::kF64;
    OwnedTensor out = OwnedTensor::zeros(x == 0 ? q.view.dtype : DType::kF64, shape);
    OwnedTensor row_stat = OwnedTensor::zeros(DType::kF32, stat ? rows : std::vector<int64_t>{1});
    const TensorView rs = stat ? row_stat.view : TensorView{};
    std::vector<OwnedTensor> g;
    AttentionGrads a;
    for (size_t y = 0; y < members.size(); ++y) {
      g.push_back(OwnedTensor::zeros(gdt, shapes[y]));
      a.*members[y] = g.back().view;
    }
    for (OwnedTensor* t : {&out, &row_stat}) poison(*t);  // each side writes every element
    for (OwnedTensor& t : g) poison(t);
    Status s;
    if (x == 1) {
      s = reference_forward(q.view, k.view, v.view, spec, out.view, rs);
      if (!s.ok()) r.error = "oracle forward: " + s.message();
      if (s.ok()) s = reference_backward(q.view, k.view, v.view, grad_out.view, spec, a);
      if (!s.ok() && r.error.empty()) r.error = "oracle backward: " + s.message();
    } else {
      DeviceMirror dm;
      const bool cuda = device == Device::kCUDA;
      auto put = [&](const TensorView& t) { return cuda ? dm.to_device(t) : t; };
      AttentionSpec ds = spec;
      if (cuda) dm.mirror_spec(ds);
      const TensorView dq = put(q.view), dk = put(k.view), dv = put(v.view),
                       dgo = put(grad_out.view), dout = put(out.view), dstat = put(rs);
      AttentionGrads da;
      for (TensorView AttentionGrads::*m : members) da.*m = put(a.*m);
      s = attention_forward(dq, dk, dv, ds, dout, dstat);
      if (!s.ok()) r.error = "forward: " + s.message();
      if (s.ok()) s = attention_backward(dq, dk, dv, dout, dstat, dgo, ds, da);
      if (!s.ok() && r.error.empty()) r.error = "backward: " + s.message();
      if (s.ok() && cuda) s = DeviceMirror::synchronize();
      if (s.ok() && cuda) s = dm.to_host(dout, out.view);
      if (s.ok() && cuda && stat) s = dm.to_host(dstat, rs);
      for (TensorView AttentionGrads::*m : members)
        if (s.ok() && cuda) s = dm.to_host(da.*m, a.*m);
      if (!s.ok() && r.error.empty()) r.error = "copies back: " + s.message();
    }
    if (!r.error.empty()) return r;
    std::vector<std::vector<double>>& to = x == 0 ? r.got : r.want;
    to.push_back(out.to_doubles());
    if (stat) to.push_back(row_stat.to_doubles());
    for (OwnedTensor& t : g) to.push_back(t.to_doubles());
  }
  return r;
}

std::vector<RangeCase> range_cases(DType dtype, int64_t n, int64_t d) {
  struct Weights {
    const char* name;
    KernelFeature f;
    float power, shift, spread;
    bool length_scale = false;
  };
  const Weights kernels[] = {{"kernel_softplus_-150", KernelFeature::kSoftplus, 1.f, -150.f, 3.f},
                             {"kernel_softplus4_-30", KernelFeature::kSoftplus, 4.f, -30.f, 2.f},
                             {"kernel_relu8_1e5", KernelFeature::kReLU, 8.f, 1e5f, 1e3f},
                             {"kernel_relu2_scaled", KernelFeature::kReLU, 2.f, -2.5f, 1.f, true}};
  // four with a negative scale (a valid one: s = scale q . k), and the length-scaled kernel
  // under a one-key window (scale 0) with an additive -inf on every third diagonal.
  std::vector<RangeCase> cases(std::size(kernels) + 7);  // in place: specs point into extras
  const std::vector<int64_t> shape = {1, 2, n, d};
  // A tensor of `spread` N(0, 1) + shift, in the spec's extras under `name`.
  auto extra = [](Instance& inst, const char* name, DType t, std::vector<int64_t> sh, float shift,
                  float spread, uint64_t seed) {
    OwnedTensor x = random_tensor(DType::kF32, sh, spread, seed);
    for (float& e : std::span(static_cast<float*>(x.view.data), x.bytes.size() / sizeof(float)))
      e += shift;
    if (t != DType::kF32) x = OwnedTensor::from_doubles(x.to_doubles(), t, sh);
    OwnedTensor& kept = inst.extras[name] = std::move(x);
    return kept.view;
  };
  for (size_t c = 0; c < cases.size(); ++c) {
    RangeCase& rc = cases[c];
    Instance& inst = rc.inst;
    inst.dims = {1, 2, 2, n, n, d, d};
    inst.dtype = dtype;
    inst.q = random_tensor(dtype, shape, 1.0, 41);
    inst.k = random_tensor(dtype, shape, 1.0, 42);
    inst.v = random_tensor(dtype, shape, 1.0, 43);
    rc.grad_out = random_tensor(dtype, shape, 1.0, 44);
    AttentionSpec& spec = inst.spec;
    spec.mask = Mask::causal();
    if (c < std::size(kernels)) {
      const Weights& w = kernels[c];
      rc.name = w.name;
      rc.empty_rows = w.length_scale;  // rows whose every s' <= 0 (row 0: ls = 0)
      spec.mods.bias = extra(inst, "bias", DType::kF32, {1, 1, n, n}, w.shift, w.spread, 45);
      spec.normalizer.kind = NormalizerKind::kKernel;
      spec.normalizer.feature = w.f;
      spec.normalizer.power = w.power;
      spec.normalizer.length_scale = w.length_scale;
    } else if (c == std::size(kernels)) {
      rc.name = "sigmoid_beta40_gate40";
      spec.normalizer.kind = NormalizerKind::kSigmoid;
      spec.normalizer.beta = 40.0;
      spec.gate_kind = GateKind::kElementwise;
      spec.gate = extra(inst, "gate", dtype, shape, 40.f, 2.f, 46);
    } else if (c == std::size(kernels) + 1) {
      rc.name = "softmax_head_gate40";
      spec.gate_kind = GateKind::kPerHead;
      spec.gate = extra(inst, "gate", dtype, {1, 2, n}, 40.f, 2.f, 47);
    } else if (c == std::size(kernels) + 2) {
      rc.name = "softmax_scale-1";
      spec.scale = -1.f;
    } else if (c == std::size(kernels) + 3) {
      rc.name = "softmax_alibi_scale-0.7";
      spec.scale = -0.7f;
      spec.mods.alibi = AlibiMode::kCausal;
    } else if (c == std::size(kernels) + 4) {
      rc.name = "sigmoid_scale-0.3";
      spec.scale = -0.3f;
      spec.normalizer.kind = NormalizerKind::kSigmoid;
    } else if (c == std::size(kernels) + 5) {
      rc.name = "kernel_softplus_softcap_scale-1";
      spec.scale = -1.f;
      spec.mods.softcap = 5.f;
      spec.normalizer.kind = NormalizerKind::kKernel;
    } else {
      rc.name = "kernel_length_scale0_masked_diagonal";
      rc.empty_rows = true;  // the last row: alone in its chunk (scale 0), its key at -inf
      spec.mask = Mask::chunked(n - 1);
      spec.normalizer.kind = NormalizerKind::kKernel;
      spec.normalizer.length_scale = true;
      spec.mods.bias = extra(inst, "bias", DType::kF32, {1, 1, n, n}, 0.f, 1.f, 48);
      float* b = static_cast<float*>(spec.mods.bias.data);
      for (int64_t i = 0; i < n; i += 3) b[i * n + i] = -INFINITY;
      b[n * n - 1] = -INFINITY;
    }
  }
  return cases;
}

bool backward_covered(const std::string& mechanism, const Dims& dims) {
  CheckOptions opt;
  opt.dims = dims;
  Instance inst;
  if (!make_instance(mechanism, opt, inst).empty()) return false;
  Outputs o = make_outputs(inst, false);
  const OwnedTensor dq = zeros_like(inst.q, DType::kF32), dk = zeros_like(inst.k, DType::kF32),
                    dv = zeros_like(inst.v, DType::kF32);
  return can_run_backward(inst.q.view, inst.k.view, inst.v.view, o.out.view, o.row_stat.view,
                          o.out.view, inst.spec, {dq.view, dk.view, dv.view})
      .ok();
}

}  // namespace attnkit::tools
