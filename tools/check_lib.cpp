// check_mechanism(): one mechanism, shape and dtype through the CPU path and the float64 oracle.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>

#include "attnkit/registry.h"
#include "device_mirror.h"
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

// A BNHD copy of a BHND tensor (same values, other strides).
static OwnedTensor to_bnhd(const OwnedTensor& t) {
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

CheckResult check_mechanism(const std::string& mechanism, const CheckOptions& opt) {
  CheckResult r;
  r.mechanism = mechanism;
  r.dtype = dtype_name(opt.dtype);
  r.dims = opt.dims;
  r.tol = tolerance_for(opt.dtype);
  Instance inst;
  std::string err = make_instance(mechanism, opt, inst);
  if (!err.empty()) {
    r.error = err;
    return r;
  }
  const bool cuda = opt.device == Device::kCUDA;
  const bool stats = opt.stats;
  Outputs fast = make_outputs(inst, stats, opt.entropy),
          ref = make_outputs(inst, stats, opt.entropy);
  if (opt.bnhd) {
    fast.out = to_bnhd(fast.out);
    ref.out = to_bnhd(ref.out);
  }
  Options o;
  o.num_threads = opt.threads;
  const auto t0 = std::chrono::steady_clock::now();
  Status s;
  if (cuda) {
    DeviceMirror dm;
    AttentionSpec spec = inst.spec;
    dm.mirror_spec(spec);
    const TensorView out = dm.to_device(fast.out.view), rs = dm.to_device(fast.row_stat.view);
    const AttentionStats host_stats = stats_views(fast);
    AttentionStats dev_stats;
    dev_stats.row_max = dm.to_device(host_stats.row_max);
    dev_stats.entropy = dm.to_device(host_stats.entropy);
    dev_stats.col_mass = dm.to_device(host_stats.col_mass);
    s = attention_forward(dm.to_device(inst.q.view), dm.to_device(inst.k.view),
                          dm.to_device(inst.v.view), spec, out, rs, dev_stats, o);
    if (s.ok()) s = DeviceMirror::synchronize();
    if (s.ok()) s = dm.to_host(out, fast.out.view);
    if (s.ok()) s = dm.to_host(rs, fast.row_stat.view);
    for (const auto& [d, h] : {std::pair{dev_stats.row_max, host_stats.row_max},
                               {dev_stats.entropy, host_stats.entropy},
                               {dev_stats.col_mass, host_stats.col_mass}})
      if (s.ok() && d.defined()) s = dm.to_host(d, h);
  } else {
    s = attention_forward(inst.q.view, inst.k.view, inst.v.view, inst.spec, fast.out.view,
                          fast.row_stat.view, stats_views(fast), o);
  }
  r.ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  if (!s.ok()) {
    r.not_covered = cuda && s.code() == StatusCode::kNotImplemented;
    r.error = (cuda ? "cuda: " : "cpu: ") + s.message();
    return r;
  }
  ref.out =
      OwnedTensor::zeros(DType::kF64, {opt.dims.batch, opt.dims.hq, opt.dims.nq, opt.dims.dv});
  if (opt.bnhd) ref.out = to_bnhd(ref.out);
  s = reference_forward(inst.q.view, inst.k.view, inst.v.view, inst.spec, ref.out.view,
                        ref.row_stat.view, stats_views(ref));
  if (!s.ok()) {
    r.error = "reference: " + s.message();
    return r;
  }
  // DESIGN.md's rule: at most 2x the error of a naive computation in the input dtype, plus a
  // floor of 1e-6; never looser than the fixed per-dtype tolerance. Applied to bf16 and fp16,
  // where the naive error is the sum of many roundings of S and P and so is stable. In fp32 at
  // large logits (|s| ~ 1e3) one run's error is one or two roundings of the top scores: over
  // seeds the fast / naive ratio ranged from 0.3 to 7 both ways, so fp32 keeps its fixed 1e-5.
  Outputs naive = make_outputs(inst, false);
  if (opt.bnhd) naive.out = to_bnhd(naive.out);
  s = reference::forward(inst.q.view, inst.k.view, inst.v.view, inst.spec, naive.out.view,
                         naive.row_stat.view, {}, opt.dtype);
  if (!s.ok()) {
    r.error = "naive reference: " + s.message();
    return r;
  }
  const std::vector<double> x = fast.out.to_doubles(), y = ref.out.to_doubles();
  r.naive_err = rel_error(naive.out.to_doubles(), y);
  if (opt.dtype != DType::kF32) r.tol = std::min(r.tol, 2 * r.naive_err + 1e-6);
  for (double v : x)
    if (std::isnan(v)) {
      r.error = "NaN in the output";
      return r;
    }
  r.rel_err = rel_error(x, y);
  r.max_abs = max_abs_error(x, y);
  // Per-row statistics (fp32 outputs on both sides): relative to max(1, |ref|).
  auto stat_err = [](const OwnedTensor& a, const OwnedTensor& b) {
    if (!a.view.defined()) return 0.0;
    const std::vector<double> u = a.to_doubles(), w = b.to_doubles();
    double m = 0;
    for (size_t i = 0; i < u.size(); ++i) {
      if (u[i] == w[i]) continue;
      const double e = std::abs(u[i] - w[i]) / std::max(1.0, std::abs(w[i]));
      m = std::isnan(e) ? INFINITY : std::max(m, e);
    }
    return m;
  };
  r.stat_err =
      std::max({stat_err(fast.row_stat, ref.row_stat), stat_err(fast.row_max, ref.row_max),
                stat_err(fast.entropy, ref.entropy), stat_err(fast.col_mass, ref.col_mass)});
  double stat_tol = 1e-4 * std::max(1.0, opt.input_scale * opt.input_scale);
  // ReLA's statistic is the RMS of O itself: where P enters P V in the input dtype (on the GPU,
  // as in FlashAttention, and on CPUs with bf16 dot products), it carries O's error and is
  // judged by O's tolerance.
  const bool p_in_dtype = cuda || (opt.dtype == DType::kBF16 && cpu_bf16_dot());
  if (p_in_dtype && inst.spec.normalizer.kind == NormalizerKind::kReLA)
    stat_tol = std::max(stat_tol, r.tol);
  r.ok = r.rel_err <= r.tol && r.stat_err <= stat_tol;
  if (!r.ok)
    r.error = "rel_err " + std::to_string(r.rel_err) + " (tol " + std::to_string(r.tol) +
              ", naive " + std::to_string(r.naive_err) + "), stat_err " +
              std::to_string(r.stat_err) + " (tol " + std::to_string(stat_tol) + ")";
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

double ExtraGrad::magnitude(Instance& inst, const Outputs& o, const OwnedTensor& grad_out) const {
  // dsink_h = -sum_i exp(sink_h - LSE_i) D_i: M_h = sum_i exp(sink_h - LSE_i) |D_i| with
  // D_i = dO_i . O_i from this run (BHND layout).
  if (std::string(name) != "dsinks" || inst.spec.layout != Layout::kBHND) return 0;
  const Dims& d = inst.dims;
  const std::vector<double> ov = o.out.to_doubles(), gv = grad_out.to_doubles();
  const std::vector<double> lv = o.row_stat.to_doubles(), sv = inst.extras["sinks"].to_doubles();
  double m2 = 0;
  for (int64_t h = 0; h < d.hq; ++h) {
    double m = 0;
    for (int64_t b = 0; b < d.batch; ++b)
      for (int64_t i = 0; i < d.nq; ++i) {
        const int64_t row = (b * d.hq + h) * d.nq + i;
        double di = 0;
        for (int64_t c = 0; c < d.dv; ++c) di += ov[row * d.dv + c] * gv[row * d.dv + c];
        if (std::isfinite(lv[row])) m += std::exp(sv[h] - lv[row]) * std::abs(di);
      }
    m2 += m * m;
  }
  return std::sqrt(m2);
}

CheckResult check_backward(const std::string& mechanism, const CheckOptions& opt) {
  CheckResult r;
  r.mechanism = mechanism;
  r.dtype = dtype_name(opt.dtype);
  r.dims = opt.dims;
  r.tol = backward_tolerance_for(opt.dtype);
  Instance inst;
  std::string err = make_instance(mechanism, opt, inst);
  if (!err.empty()) {
    r.error = err;
    return r;
  }
  const Dims& d = opt.dims;
  const std::vector<int64_t> out_shape = opt.bnhd ? std::vector<int64_t>{d.batch, d.nq, d.hq, d.dv}
                                                  : std::vector<int64_t>{d.batch, d.hq, d.nq, d.dv};
  Outputs o = make_outputs(inst, false);
  o.out = OwnedTensor::zeros(opt.dtype, out_shape);
  const OwnedTensor go = random_tensor(opt.dtype, out_shape, 1.0, opt.seed + 31);
  Options op;
  op.num_threads = opt.threads;
  const bool cuda = opt.device == Device::kCUDA;
  const std::string where = cuda ? "cuda" : "cpu";
  // On the GPU: device copies of the inputs and outputs (the forward's out and LSE stay there
  // for the backward, and come back for the dsinks magnitude).
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
  Status s = attention_forward(q, k, v, spec, out, row_stat, {}, op);
  if (s.ok() && cuda) s = DeviceMirror::synchronize();
  if (s.ok() && cuda) s = dm.to_host(out, o.out.view);
  if (s.ok() && cuda) s = dm.to_host(row_stat, o.row_stat.view);
  if (!s.ok()) {
    r.not_covered = cuda && s.code() == StatusCode::kNotImplemented;
    r.error = where + " forward: " + s.message();
    return r;
  }
  auto like = [](const OwnedTensor& t, DType dt) {
    return OwnedTensor::zeros(dt, std::vector<int64_t>(t.view.shape, t.view.shape + t.view.ndim));
  };
  const DType gdt = opt.input_dtype_grads ? opt.dtype : DType::kF32;
  OwnedTensor fq = like(inst.q, gdt), fk = like(inst.k, gdt), fv = like(inst.v, gdt);
  OwnedTensor rq = like(inst.q, DType::kF64), rk = like(inst.k, DType::kF64),
              rv = like(inst.v, DType::kF64);
  AttentionGrads fg{fq.view, fk.view, fv.view}, rg{rq.view, rk.view, rv.view};
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
  std::vector<OwnedTensor> fx, rx;
  for (const ExtraGrad& e : extras) {
    // With input_dtype_grads, dbias takes the bias's own dtype (as PyTorch gives it).
    const bool own = opt.input_dtype_grads && std::string(e.name) == "dbias";
    fx.push_back(OwnedTensor::zeros(own ? inst.spec.mods.bias.dtype : DType::kF32, e.shape));
    rx.push_back(OwnedTensor::zeros(DType::kF64, e.shape));
  }
  for (size_t i = 0; i < extras.size(); ++i) {
    fg.*extras[i].member = fx[i].view;
    dg.*extras[i].member = cuda ? dm.to_device(fx[i].view) : fx[i].view;
    rg.*extras[i].member = rx[i].view;
  }
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
  if (!s.ok()) {
    r.not_covered = s.code() == StatusCode::kNotImplemented;
    r.error = where + " backward: " + s.message();
    return r;
  }
  s = reference_backward(inst.q.view, inst.k.view, inst.v.view, go.view, inst.spec, rg);
  if (!s.ok()) {
    r.error = "reference backward: " + s.message();
    return r;
  }
  auto norm2 = [](const std::vector<double>& x) {
    double n = 0;
    for (double e : x) n += e * e;
    return n;
  };
  // The error of x against y relative to `scale` (NaN: infinite).
  auto error_of = [](const std::vector<double>& x, const std::vector<double>& y, double scale) {
    double n = 0;
    for (size_t i = 0; i < x.size(); ++i) {
      if (std::isnan(x[i])) return static_cast<double>(INFINITY);
      n += (x[i] - y[i]) * (x[i] - y[i]);
    }
    return scale > 0 ? std::sqrt(n) / scale : std::sqrt(n);
  };
  const std::vector<double> aq = fq.to_doubles(), ak = fk.to_doubles(), av = fv.to_doubles();
  const std::vector<double> bq = rq.to_doubles(), bk = rk.to_doubles(), bv = rv.to_doubles();
  const double scale = std::sqrt(norm2(bq) + norm2(bk) + norm2(bv));
  r.rel_err = std::max({error_of(aq, bq, scale), error_of(ak, bk, scale), error_of(av, bv, scale)});
  // Each extra against its own norm, or against the magnitude of the terms it sums where that
  // is larger (dsinks, dslopes, dtable, dbeta, ... sum terms of both signs over many pairs).
  std::string worst;
  for (size_t i = 0; i < extras.size(); ++i) {
    const std::vector<double> a = fx[i].to_doubles(), b = rx[i].to_doubles();
    const double e =
        error_of(a, b, std::max(std::sqrt(norm2(b)), extras[i].magnitude(inst, o, go)));
    if (e > r.stat_err || worst.empty()) worst = extras[i].name;
    r.stat_err = std::max(r.stat_err, e);
  }
  r.ok = r.rel_err <= r.tol && r.stat_err <= r.tol;
  if (!r.ok)
    r.error = "gradient error " + std::to_string(r.rel_err) + ", " +
              (extras.empty() ? std::string("no extras") : worst) + " error " +
              std::to_string(r.stat_err) + " (tol " + std::to_string(r.tol) + ")";
  return r;
}

bool backward_covered(const std::string& mechanism, const Dims& dims) {
  CheckOptions opt;
  opt.dims = dims;
  Instance inst;
  if (!make_instance(mechanism, opt, inst).empty()) return false;
  Outputs o = make_outputs(inst, false);
  auto like = [](const OwnedTensor& t) {
    return OwnedTensor::zeros(DType::kF32,
                              std::vector<int64_t>(t.view.shape, t.view.shape + t.view.ndim));
  };
  const OwnedTensor dq = like(inst.q), dk = like(inst.k), dv = like(inst.v);
  return can_run_backward(inst.q.view, inst.k.view, inst.v.view, o.out.view, o.row_stat.view,
                          o.out.view, inst.spec, {dq.view, dk.view, dv.view})
      .ok();
}

}  // namespace attnkit::tools
