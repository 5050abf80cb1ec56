// `attnkit fuzz --invalid` (fuzz.h): a drawn case with one thing broken, run through can_run, the
// backend and the oracle, forward and backward.
//
// Every tensor of the call (inputs, outputs, gradients, the spec's tensors) is copied into a
// buffer with as much room again after its extent, so a change that the rules allow (a broadcast
// dimension grown by one, strides swapped) stays inside memory the call may read; on CUDA those
// buffers are mirrored whole, so a broken view (a null or misaligned pointer, a shape of -1)
// points where its host twin points. A change is applied to the backend's call and the oracle's
// alike. The verdicts: a refusal names a rule (never kInternal, never empty); can_run agrees
// with the call; the backend accepts nothing the oracle refuses by a rule, nor a change that
// breaks a rule outright (must_refuse); where both accept, their results agree.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <random>
#include <tuple>

#include "core/convert.h"
#include "device_mirror.h"
#include "fuzz.h"
#include "magnitudes.h"
#include "reference/reference.h"

#if defined(ATTNKIT_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace attnkit::tools {
namespace {

// The buffers of a call: each a copy of one tensor's extent and as much room again (16-byte
// aligned), on the host; `mirror` makes device twins of them all.
class Arena {
 public:
  Arena() = default;
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;
  ~Arena() {
#if defined(ATTNKIT_WITH_CUDA)
    for (const Buffer& b : bufs_)
      if (b.device) (void)cudaFree(b.device);
#endif
  }

  TensorView place(const TensorView& t) {
    if (!t.defined()) return t;
    const int64_t bytes = t.numel() > 0 ? extent_bytes(t) : 0;
    Buffer b;
    b.host = std::make_unique<std::max_align_t[]>((2 * bytes + 256) / sizeof(std::max_align_t) + 1);
    b.bytes = 2 * bytes + 256;
    std::memset(b.host.get(), 0, b.bytes);
    if (bytes > 0) std::memcpy(b.host.get(), t.data, bytes);
    TensorView v = t;
    v.data = b.host.get();
    bufs_.push_back(std::move(b));
    return v;
  }

  // The device twin of a host view placed here (its fields kept; a pointer outside every buffer,
  // null or broken, kept as it is).
  TensorView twin(const TensorView& t) const {
    TensorView v = t;
    if (const Buffer* b = owner(t.data)) {
      v.data = b->device + (static_cast<char*>(t.data) - reinterpret_cast<char*>(b->host.get()));
      // on the device; a view whose device the change flipped, on the host
      v.device = t.device == Device::kCPU ? Device::kCUDA : Device::kCPU;
    }
    return v;
  }

  // Device copies of every buffer (false where the runtime fails).
  bool mirror() {
#if defined(ATTNKIT_WITH_CUDA)
    for (Buffer& b : bufs_) {
      void* p = nullptr;
      if (cudaMalloc(&p, b.bytes) != cudaSuccess) return false;
      b.device = static_cast<char*>(p);
      if (cudaMemcpy(p, b.host.get(), b.bytes, cudaMemcpyHostToDevice) != cudaSuccess) return false;
    }
    return true;
#else
    return false;
#endif
  }

  // Copies every device buffer back over its host original.
  bool fetch() {
#if defined(ATTNKIT_WITH_CUDA)
    for (Buffer& b : bufs_)
      if (cudaMemcpy(b.host.get(), b.device, b.bytes, cudaMemcpyDeviceToHost) != cudaSuccess)
        return false;
    return true;
#else
    return false;
#endif
  }

 private:
  struct Buffer {
    std::unique_ptr<std::max_align_t[]> host;
    char* device = nullptr;
    int64_t bytes = 0;
  };
  const Buffer* owner(const void* p) const {
    for (const Buffer& b : bufs_) {
      const char* h = reinterpret_cast<const char*>(b.host.get());
      if (p >= h && p < h + b.bytes) return &b;
    }
    return nullptr;
  }
  std::vector<Buffer> bufs_;
};

// One call's views: the forward's and the backward's.
struct Call {
  TensorView q, k, v, out, row_stat, grad_out;
  AttentionStats stats;
  AttentionSpec spec;
  AttentionGrads grads;

  // Every defined view, named, for a change to pick.
  std::vector<std::pair<std::string, TensorView*>> views() {
    std::vector<std::pair<std::string, TensorView*>> all = {
        {"q", &q},
        {"k", &k},
        {"v", &v},
        {"out", &out},
        {"row_stat", &row_stat},
        {"grad_out", &grad_out},
        {"stats.row_max", &stats.row_max},
        {"stats.entropy", &stats.entropy},
        {"stats.col_mass", &stats.col_mass},
        {"grads.dq", &grads.dq},
        {"grads.dk", &grads.dk},
        {"grads.dv", &grads.dv},
        {"grads.dbias", &grads.dbias},
        {"grads.dlow_rank_u", &grads.dlow_rank_u},
        {"grads.dlow_rank_w", &grads.dlow_rank_w},
        {"grads.drelative_table", &grads.drelative_table},
        {"grads.dforget_log_f", &grads.dforget_log_f},
        {"grads.dalibi_slopes", &grads.dalibi_slopes},
        {"grads.dsinks", &grads.dsinks},
        {"grads.dbeta", &grads.dbeta},
        {"grads.drela_gain", &grads.drela_gain},
        {"grads.dgate", &grads.dgate},
        {"gate", &spec.gate},
        {"mods.alibi_slopes", &spec.mods.alibi_slopes},
        {"mods.bias", &spec.mods.bias},
        {"mods.low_rank_u", &spec.mods.low_rank_u},
        {"mods.low_rank_w", &spec.mods.low_rank_w},
        {"mods.relative_table", &spec.mods.relative_table},
        {"mods.forget_log_f", &spec.mods.forget_log_f},
        {"normalizer.sinks", &spec.normalizer.sinks},
        {"normalizer.rela_gain", &spec.normalizer.rela_gain},
        {"cu_seqlens_q", &spec.cu_seqlens_q},
        {"cu_seqlens_kv", &spec.cu_seqlens_kv}};
    for (size_t i = 0; i < spec.mask.segments.size(); ++i)
      all.push_back({"mask.segments[" + std::to_string(i) + "]", &spec.mask.segments[i]});
    for (size_t i = 0; i < spec.mask.block_maps.size(); ++i)
      all.push_back({"mask.block_maps[" + std::to_string(i) + "]", &spec.mask.block_maps[i]});
    std::erase_if(all, [](const auto& x) { return !x.second->defined(); });
    return all;
  }

  // Every view placed in `a` (the same fields, new storage).
  void place(Arena& a) {
    for (auto& [name, t] : views()) *t = a.place(*t);
  }
};

// The call of a drawn case: its inputs, outputs as check_forward makes them, grad_out and fp32
// gradients (those of the spec's tensors too), every one in its own buffer of `a`.
Call make_call(const FuzzCase& c, Arena* a, const OwnedTensor& go, Outputs& o,
               std::vector<OwnedTensor>& grads) {
  Call call;
  call.q = c.inst.q.view;
  call.k = c.inst.k.view;
  call.v = c.inst.v.view;
  call.spec = c.inst.spec;
  call.out = o.out.view;
  call.row_stat = o.row_stat.view;
  call.stats = stats_views(o);
  call.grad_out = go.view;
  grads.clear();
  grads.reserve(3 + extra_grads(c.inst.spec).size());
  for (const OwnedTensor* t : {&c.inst.q, &c.inst.k, &c.inst.v})
    grads.push_back(zeros_like(*t, DType::kF32));
  call.grads.dq = grads[0].view;
  call.grads.dk = grads[1].view;
  call.grads.dv = grads[2].view;
  for (const ExtraGrad& e : extra_grads(c.inst.spec)) {
    grads.push_back(OwnedTensor::zeros(DType::kF32, e.shape));
    call.grads.*e.member = grads.back().view;
  }
  if (a) call.place(*a);
  return call;
}

// One change to a call.
struct Change {
  std::string what;
  bool must_refuse = false;  // a rule forbids it outright
  std::function<void(Call&)> apply;
  bool compare = true;  // false: the values read are reinterpreted bytes (judged for rules only)
  bool backward_only = false;  // a view only the backward reads (grad_out, a gradient)
};

Change tensor_change_of(const std::string& nm, const TensorView& x, std::mt19937_64& rng);

Change tensor_change(Call& call, std::mt19937_64& rng) {
  auto views = call.views();
  std::uniform_int_distribution<size_t> pick(0, views.size() - 1);
  const auto& [name, t] = views[pick(rng)];
  const TensorView& x = *t;
  const std::string nm = name;
  Change c = tensor_change_of(nm, x, rng);
  c.backward_only = nm == "grad_out" || nm.rfind("grads.", 0) == 0;
  return c;
}

Change tensor_change_of(const std::string& nm, const TensorView& x, std::mt19937_64& rng) {
  auto at = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  const int dim = x.ndim > 0 ? at(0, x.ndim - 1) : 0;
  const std::string ds = std::to_string(dim);
  // Each change finds its view again by name (the oracle's call has its own).
  auto on = [nm](std::function<void(TensorView&)> f) {
    return [nm, f](Call& c) {
      for (auto& [n, v] : c.views())
        if (n == nm) f(*v);
    };
  };
  switch (at(0, 10)) {
    case 0:
      return {nm + ".shape[" + ds + "] += 1", false, on([dim](TensorView& v) { ++v.shape[dim]; })};
    case 1:
      return {nm + ".shape[" + ds + "] = -1", true,
              on([dim](TensorView& v) { v.shape[dim] = -1; })};
    case 2:
      return {nm + ".shape[" + ds + "] = 0", false, on([dim](TensorView& v) { v.shape[dim] = 0; })};
    case 3:
      return {nm + ".ndim += 1", false, on([](TensorView& v) {
                if (v.ndim >= kMaxTensorDims) return;
                v.shape[v.ndim] = 1;
                v.strides[v.ndim] = 1;
                ++v.ndim;
              })};
    case 4:
      return {nm + ".ndim -= 1", false,
              on([](TensorView& v) { v.ndim = std::max(v.ndim - 1, 0); })};
    case 5:
      return {nm + ".strides[" + ds + "] = -strides", x.numel() > 1 && x.shape[dim] > 1,
              on([dim](TensorView& v) { v.strides[dim] = -std::max<int64_t>(v.strides[dim], 1); })};
    case 6:  // the innermost stride: 0 or 2 (twice the extent: inside the room)
    {
      const int64_t s = at(0, 1) * 2;
      const int last = std::max(x.ndim - 1, 0);
      return {nm + ".strides[last] = " + std::to_string(s), false,
              on([s, last](TensorView& v) { v.strides[last] = s; })};
    }
    case 7:
      return {nm + ".data = nullptr", x.numel() > 0, on([](TensorView& v) { v.data = nullptr; })};
    case 8:
      // Refused where the elements are wider than 2 bytes (elements aligned to their size).
      return {nm + ".data += 2 bytes", dtype_size(x.dtype) > 2,
              on([](TensorView& v) { v.data = static_cast<char*>(v.data) + 2; }), false};
    case 9: {
      const DType to[] = {DType::kF32, DType::kF64, DType::kBF16, DType::kF16, DType::kI32};
      const DType d = to[at(0, 4)];
      // A wider dtype over the same elements reads past the extent: only up to twice its width,
      // which stays in the room.
      if (dtype_size(d) > 2 * dtype_size(x.dtype))
        return {nm + ".dtype unchanged", false, [](Call&) {}};
      return {nm + ".dtype = " + dtype_name(d), false, on([d](TensorView& v) { v.dtype = d; }),
              false};
    }
    default:
      return {nm + ".device flipped", true, on([](TensorView& v) {
                v.device = v.device == Device::kCPU ? Device::kCUDA : Device::kCPU;
              })};
  }
}

Change spec_change(const Call& call, std::mt19937_64& rng) {
  auto at = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  const float nan = std::numeric_limits<float>::quiet_NaN(),
              inf = std::numeric_limits<float>::infinity();
  const AttentionSpec& s = call.spec;
  const NormalizerKind kind = s.normalizer.kind;
  switch (at(0, 9)) {
    case 0: {
      const float x[] = {nan, inf, -inf, 0.f, -1.f};
      const int i = at(0, 4);
      return {"scale = " + std::to_string(x[i]), i < 3, [v = x[i]](Call& c) { c.spec.scale = v; }};
    }
    case 1: {
      const float x[] = {nan, inf, -1.f};
      const int i = at(0, 2);
      return {"mods.softcap = " + std::to_string(x[i]), true,
              [v = x[i]](Call& c) { c.spec.mods.softcap = v; }};
    }
    case 2:
      return {"normalizer.beta = nan", kind == NormalizerKind::kSigmoid,
              [](Call& c) { c.spec.normalizer.beta = std::numeric_limits<double>::quiet_NaN(); }};
    case 3: {
      const float x[] = {0.f, -1.f, nan};
      const int i = at(0, 2);
      return {"normalizer.power = " + std::to_string(x[i]), kind == NormalizerKind::kKernel,
              [v = x[i]](Call& c) { c.spec.normalizer.power = v; }};
    }
    case 4:
      return {"normalizer.rela_eps = -1", kind == NormalizerKind::kReLA,
              [](Call& c) { c.spec.normalizer.rela_eps = -1.f; }};
    case 5: {  // an enum past its values
      const int which = at(0, 6);
      const char* names[] = {"alibi",  "relative",  "normalizer.kind",   "gate_kind",
                             "layout", "alignment", "normalizer.feature"};
      bool used = true;
      if (which == 6) used = kind == NormalizerKind::kKernel;
      return {std::string(names[which]) + " = 77 (no such value)", used, [which](Call& c) {
                switch (which) {
                  case 0:
                    c.spec.mods.alibi = static_cast<AlibiMode>(77);
                    break;
                  case 1:
                    c.spec.mods.relative = static_cast<RelativeBucketKind>(77);
                    break;
                  case 2:
                    c.spec.normalizer.kind = static_cast<NormalizerKind>(77);
                    break;
                  case 3:
                    c.spec.gate_kind = static_cast<GateKind>(77);
                    break;
                  case 4:
                    c.spec.layout = static_cast<Layout>(77);
                    break;
                  case 5:
                    c.spec.alignment = static_cast<Alignment>(77);
                    break;
                  default:
                    c.spec.normalizer.feature = static_cast<KernelFeature>(77);
                }
              }};
    }
    case 6: {
      const bool on = s.mods.relative != RelativeBucketKind::kOff;
      const int which = at(0, 2);
      const char* names[] = {"num_buckets = 0", "max_distance = -3", "clip = -1"};
      return {std::string("mods.") + names[which],
              on && (which != 2 || s.mods.relative == RelativeBucketKind::kClipped) &&
                  (which == 2 || s.mods.relative == RelativeBucketKind::kT5),
              [which](Call& c) {
                if (which == 0) c.spec.mods.num_buckets = 0;
                if (which == 1) c.spec.mods.max_distance = -3;
                if (which == 2) c.spec.mods.clip = -1;
              }};
    }
    case 7: {  // cu_seqlens' contents (the oracle's and the backend's copies alike)
      if (!s.cu_seqlens_q.defined())
        return {"cu_seqlens untouched (not varlen)", false, [](Call&) {}};
      const int which = at(0, 2);
      const char* names[] = {"cu_seqlens_q[0] = 1", "cu_seqlens_kv[last] = rows + 1",
                             "cu_seqlens_q[1] = -1"};
      return {names[which], true, [which](Call& c) {
                const TensorView& t = which == 1 ? c.spec.cu_seqlens_kv : c.spec.cu_seqlens_q;
                int32_t* x = static_cast<int32_t*>(t.data);
                const int64_t n = t.shape[0], st = t.strides[0];
                if (which == 0) x[0] = 1;
                if (which == 1) x[(n - 1) * st] = static_cast<int32_t>(c.k.shape[0] + 1);
                if (which == 2) x[st] = -1;
              }};
    }
    default: {  // a mask node
      const int node = at(0, static_cast<int>(s.mask.nodes.size()) - 1);
      const int which = at(0, 9);
      const char* names[] = {"kind = 99", "child0 = itself", "child0 = 1000",
                             "a = -5",    "ndim = 4",        "shape[0] = 0",
                             "seg_q = 9", "nodes cleared",   "globals_begin = 1000",
                             "map = 7"};
      const MaskNode& n = s.mask.nodes[node];
      const bool tree =
          n.kind == MaskKind::kAnd || n.kind == MaskKind::kOr || n.kind == MaskKind::kNot;
      const bool grid = n.kind == MaskKind::kNeighborhood;
      const bool windowed = n.kind == MaskKind::kSlidingWindow || n.kind == MaskKind::kChunked ||
                            n.kind == MaskKind::kPrefixLM || n.kind == MaskKind::kGlobalWindow;
      const bool seg = reads_segments(n.kind);
      const bool must[] = {true,
                           tree,
                           tree,
                           windowed,
                           grid,
                           grid,
                           seg,
                           true,
                           n.kind == MaskKind::kGlobalWindow && n.globals_count > 0,
                           n.kind == MaskKind::kBlockMap};
      return {"mask.nodes[" + std::to_string(node) + "]." + names[which], must[which],
              [node, which](Call& c) {
                if (which == 7) {
                  c.spec.mask.nodes.clear();
                  return;
                }
                MaskNode& m = c.spec.mask.nodes[node];
                switch (which) {
                  case 0:
                    m.kind = static_cast<MaskKind>(99);
                    break;
                  case 1:
                    m.child0 = node;
                    break;
                  case 2:
                    m.child0 = 1000;
                    break;
                  case 3:
                    m.a = -5;
                    break;
                  case 4:
                    m.ndim = 4;
                    break;
                  case 5:
                    m.shape[0] = 0;
                    break;
                  case 6:
                    m.seg_q = 9;
                    break;
                  case 8:
                    m.globals_begin = 1000;
                    break;
                  default:
                    m.map = 7;
                }
              }};
    }
  }
}

// Values of a view in logical order (empty where the view cannot be walked).
std::vector<double> values(const TensorView& t) {
  if (!t.defined() || t.ndim < 0) return {};
  OwnedTensor w;
  w.view = t;
  return w.to_doubles();
}

std::vector<int64_t> shape_of(const TensorView& t) {
  return std::vector<int64_t>(t.shape, t.shape + std::max(t.ndim, 0));
}

double norm(const std::vector<double>& x) {
  double n = 0;
  for (double e : x)
    if (!std::isnan(e) && !std::isinf(e)) n += e * e;
  return std::sqrt(n);
}

// The change of a seed to a call (the same for every call of one case).
Change pick_change(Call& call, uint64_t seed) {
  std::mt19937_64 rng(seed ^ 0x5bd1e9955bd1e995ULL);
  std::uniform_int_distribution<int> coin(0, 1);
  return coin(rng) ? tensor_change(call, rng) : spec_change(call, rng);
}

// The grad_out of a case (shaped like out).
OwnedTensor grad_out_of(const FuzzCase& c, const Outputs& o, uint64_t seed) {
  const TensorView& out = o.out.view;
  return random_tensor(c.inst.dtype, std::vector<int64_t>(out.shape, out.shape + out.ndim), 1.0,
                       seed + 31);
}

}  // namespace

std::string invalid_change(const FuzzCase& c, uint64_t seed) {
  Outputs o = make_outputs(c.inst, c.check.stats, c.check.entropy);
  const OwnedTensor go = grad_out_of(c, o, seed);
  std::vector<OwnedTensor> g;
  Call call = make_call(c, nullptr, go, o, g);
  return pick_change(call, seed).what;
}

InvalidOutcome run_invalid_case(FuzzCase& c, uint64_t seed, Device device) {
  InvalidOutcome r;
  Outputs ob = make_outputs(c.inst, c.check.stats, c.check.entropy),
          oo = make_outputs(c.inst, c.check.stats, c.check.entropy);
  const OwnedTensor grad_out = grad_out_of(c, ob, seed);
  std::vector<OwnedTensor> gb, goo;
  Arena ab, ao;
  Call b = make_call(c, &ab, grad_out, ob, gb), o = make_call(c, &ao, grad_out, oo, goo);
  const Change ch = pick_change(b, seed);
  r.what = ch.what;
  ch.apply(b);
  ch.apply(o);

  const bool cuda = device == Device::kCUDA;
  Call run = b;  // the backend's views: b's, or their device twins
  if (cuda) {
    if (!ab.mirror()) {
      r.failed = true;
      r.detail = "could not copy the case to the device";
      return r;
    }
    for (auto& [name, t] : run.views()) *t = ab.twin(*t);
  }
  Options opt;
  opt.num_threads = c.check.threads;
  std::string detail;
  // Judges one pass: `verdict` from can_run*, `got` the call's status, `want` the oracle's.
  auto judge = [&](const char* pass, const Status& verdict, const Status& got, const Status& want) {
    const std::string p = std::string(pass) + ": ";
    if (!got.ok() && !is_rule_refusal(got))
      return p + "a refusal that names no rule (code " + std::to_string(int(got.code())) +
             "): " + got.message();
    if (verdict.ok() != got.ok())
      return p + "can_run said " + (verdict.ok() ? "ok" : verdict.message()) + ", the call " +
             (got.ok() ? "ran" : got.message());
    if (got.ok() && ch.must_refuse && (ch.backward_only == (pass[0] == 'b')))
      return p + "accepted although a rule forbids it";
    if (got.ok() && !want.ok() && want.code() != StatusCode::kNotImplemented)
      return p + "accepted what the oracle refuses: " + want.message();
    return std::string();
  };

  Status vf = can_run(run.q, run.k, run.v, run.spec, run.out, run.row_stat, run.stats, opt);
  Status sf =
      attention_forward(run.q, run.k, run.v, run.spec, run.out, run.row_stat, run.stats, opt);
  if (cuda && sf.ok()) sf = DeviceMirror::synchronize();
  const Status of = reference_forward(o.q, o.k, o.v, o.spec, o.out, o.row_stat, o.stats);
  detail = judge("forward", vf, sf, of);
  if (detail.empty() && sf.ok() && of.ok() && ch.compare) {
    if (cuda && !ab.fetch()) detail = "forward: could not copy the results back";
    // 10x the fixed tolerance, of |P||V| where O = P V cancels (as check_forward's rule).
    const std::vector<double> want = values(o.out);
    OwnedTensor mag = OwnedTensor::zeros(DType::kF64, shape_of(o.out));
    const Status ms = output_magnitude(o.q, o.k, o.v, o.spec, INFINITY, mag.view);
    const double ratio = norm(mag.to_doubles()) / std::max(norm(want), 1e-300);
    const double tol = 10 * tolerance_for(b.q.dtype) * std::max(1.0, ratio);
    const double e = rel_error(values(b.out), want);
    if (detail.empty() && ms.ok() && !(e <= tol))
      detail = "forward: out differs from the oracle's by " + num(e) + " > " + num(tol);
  }
  if (!detail.empty() || !sf.ok()) {
    r.failed = !detail.empty();
    r.refused = !r.failed;
    r.detail = r.failed ? detail : "forward refused: " + sf.message();
    return r;
  }
  Status vb = can_run_backward(run.q, run.k, run.v, run.out, run.row_stat, run.grad_out, run.spec,
                               run.grads, opt);
  Status sb = attention_backward(run.q, run.k, run.v, run.out, run.row_stat, run.grad_out, run.spec,
                                 run.grads, opt);
  if (cuda && sb.ok()) sb = DeviceMirror::synchronize();
  const Status obs = reference_backward(o.q, o.k, o.v, o.grad_out, o.spec, o.grads);
  detail = judge("backward", vb, sb, obs);
  if (detail.empty() && sb.ok() && obs.ok() && ch.compare) {
    if (cuda && !ab.fetch()) detail = "backward: could not copy the results back";
    // Beyond 4x the tolerance of each element's magnitude (the terms the oracle adds up), relative
    // to the gradient's norm (as check_backward's rule, 4x looser).
    const double tol = 4 * backward_tolerance_for(b.q.dtype);
    OwnedTensor mq = OwnedTensor::zeros(DType::kF64, shape_of(o.q)),
                mk = OwnedTensor::zeros(DType::kF64, shape_of(o.k)),
                mv = OwnedTensor::zeros(DType::kF64, shape_of(o.v));
    AttentionGrads mg;
    mg.dq = mq.view, mg.dk = mk.view, mg.dv = mv.view;
    const Status ms = gradient_magnitudes(o.q, o.k, o.v, o.grad_out, o.spec, tol, mg,
                                          cuda ? kCudaSoftcapRel : 0.0);
    for (const auto& [name, x, y, m] : {std::tuple{"dq", b.grads.dq, o.grads.dq, &mq},
                                        {"dk", b.grads.dk, o.grads.dk, &mk},
                                        {"dv", b.grads.dv, o.grads.dv, &mv}}) {
      const std::vector<double> got = values(x), want = values(y), mag = m->to_doubles();
      double excess = got.size() == want.size() ? 0 : INFINITY;
      for (size_t i = 0; i < got.size() && i < want.size(); ++i) {
        const double over = std::abs(got[i] - want[i]) - tol * mag[i] - 0x1p-149;
        if (std::isnan(got[i]) != std::isnan(want[i])) excess = INFINITY;
        if (over > 0) excess += over * over;
      }
      const double e = std::sqrt(excess) / std::max(norm(want), 1e-300);
      if (detail.empty() && ms.ok() && !(e <= tol))
        detail = std::string("backward: ") + name + " differs from the oracle's by " + num(e) +
                 " > " + num(tol) + " beyond its magnitude";
    }
  }
  r.failed = !detail.empty();
  r.refused = !r.failed && !sb.ok();
  r.detail = r.failed ? detail : sb.ok() ? "ran" : "backward refused: " + sb.message();
  return r;
}

}  // namespace attnkit::tools
