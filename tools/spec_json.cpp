#include "spec_json.h"

#include <cmath>
#include <cstdio>
#include <random>

#include "core/convert.h"

namespace attnkit::tools {

OwnedTensor OwnedTensor::zeros(DType dtype, std::vector<int64_t> shape) {
  OwnedTensor t;
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  t.bytes.assign(n * dtype_size(dtype), 0);
  t.view.data = t.bytes.data();
  t.view.dtype = dtype;
  t.view.ndim = static_cast<int>(shape.size());
  int64_t stride = 1;
  for (int i = t.view.ndim - 1; i >= 0; --i) {
    t.view.shape[i] = shape[i];
    t.view.strides[i] = stride;
    stride *= shape[i];
  }
  return t;
}

OwnedTensor OwnedTensor::from_doubles(const std::vector<double>& x, DType dtype,
                                      std::vector<int64_t> shape) {
  OwnedTensor t = zeros(dtype, std::move(shape));
  for (size_t i = 0; i < x.size(); ++i) core::store_from_double(t.bytes.data(), dtype, i, x[i]);
  return t;
}

OwnedTensor OwnedTensor::from_ints(const std::vector<int32_t>& x, std::vector<int64_t> shape) {
  OwnedTensor t = zeros(DType::kI32, std::move(shape));
  std::copy(x.begin(), x.end(), reinterpret_cast<int32_t*>(t.bytes.data()));
  return t;
}

std::vector<double> OwnedTensor::to_doubles() const {
  // Walks the logical shape through the strides.
  const int64_t n = view.numel();
  std::vector<double> out(n);
  for (int64_t flat = 0; flat < n; ++flat) {
    int64_t rem = flat, off = 0;
    for (int d = view.ndim - 1; d >= 0; --d) {
      off += (rem % view.shape[d]) * view.strides[d];
      rem /= view.shape[d];
    }
    out[flat] = core::load_as_double(view.data, view.dtype, off);
  }
  return out;
}

OwnedTensor random_tensor(DType dtype, std::vector<int64_t> shape, double scale, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  std::vector<double> x(n);
  for (double& v : x) {
    do v = nd(rng) * scale;
    while (v == 0.0);
  }
  return OwnedTensor::from_doubles(x, dtype, std::move(shape));
}

void make_random_qkv(Instance& inst, double scale, uint64_t seed) {
  const Dims& d = inst.dims;
  inst.q = random_tensor(inst.dtype, {d.batch, d.hq, d.nq, d.d}, scale, seed);
  inst.k = random_tensor(inst.dtype, {d.batch, d.hk, d.nk, d.d}, scale, seed + 1);
  inst.v = random_tensor(inst.dtype, {d.batch, d.hk, d.nk, d.dv}, 1.0, seed + 2);
}

ExtraSource random_extras(uint64_t seed) {
  return [seed](const std::string& name, const std::vector<int64_t>& shape) {
    uint64_t h = seed;
    for (char c : name) h = h * 131 + static_cast<unsigned char>(c);
    if (name == "log_f" || name == "slopes") {  // log f, f in [0.5, 1); slopes in [0.05, 1)
      std::mt19937_64 rng(h);
      std::uniform_real_distribution<double> u(name == "log_f" ? 0.5 : 0.05, 1.0);
      int64_t n = 1;
      for (int64_t s : shape) n *= s;
      std::vector<double> x(n);
      for (double& v : x) v = name == "log_f" ? std::log(u(rng)) : u(rng);
      return OwnedTensor::from_doubles(x, DType::kF32, shape);
    }
    if (name == "gain") {
      OwnedTensor t = random_tensor(DType::kF32, shape, 0.1, h);
      float* p = reinterpret_cast<float*>(t.bytes.data());
      for (int64_t i = 0; i < t.view.numel(); ++i) p[i] += 1.f;
      return t;
    }
    return random_tensor(DType::kF32, shape, 1.0, h);
  };
}

namespace {

std::vector<int64_t> ints(const json& j) { return j.get<std::vector<int64_t>>(); }

OwnedTensor& put(Instance& inst, const std::string& name, OwnedTensor t) {
  return inst.extras[name] = std::move(t);
}

OwnedTensor& segments(Instance& inst, const std::string& name, const json& ids) {
  std::vector<int32_t> v = ids.get<std::vector<int32_t>>();
  const int64_t n = static_cast<int64_t>(v.size());
  return put(inst, name, OwnedTensor::from_ints(v, {n}));
}

// Mask from a spec item: the full spec dict, a name ("causal"), or {"name": args}.
Mask parse_mask(const json& m, Instance& inst, std::string& err, const json* whole) {
  if (m.is_string()) {
    const std::string kind = m.get<std::string>();
    if (kind == "none") return Mask::none();
    if (kind == "causal") return Mask::causal();
    if (whole) {
      const json& s = *whole;
      if (kind == "sliding_window") return Mask::sliding_window(s.at("left"), s.at("right"));
      if (kind == "global_window")
        return Mask::global_window(s.at("left"), s.at("right"), ints(s.at("globals")));
      if (kind == "chunked") return Mask::chunked(s.at("chunk"), s.value("causal", false));
      if (kind == "document") {
        const std::string tag = std::to_string(inst.extras.size());
        if (s.contains("segments")) {
          OwnedTensor& t = segments(inst, "segments" + tag, s.at("segments"));
          return Mask::document(t.view, s.value("causal", false));
        }
        OwnedTensor& tq = segments(inst, "segments_q" + tag, s.at("segments_q"));
        OwnedTensor& tk = segments(inst, "segments_k" + tag, s.at("segments_k"));
        return Mask::document(tq.view, tk.view, s.value("causal", false));
      }
      if (kind == "block_map") {  // a random half of the blocks, per batch element and head
        const int64_t bq = s.value("block_q", 64), bk = s.value("block_k", 64);
        const Dims& d = inst.dims;
        const int64_t rows = (d.nq + bq - 1) / bq, cols = (d.nk + bk - 1) / bk;
        std::mt19937 rng(static_cast<uint32_t>(s.value("seed", 1234)));
        std::vector<int32_t> cells(d.batch * d.hq * rows * cols);
        for (int32_t& c : cells) c = static_cast<int32_t>(rng() & 1);
        OwnedTensor& t =
            put(inst, "block_map", OwnedTensor::from_ints(cells, {d.batch, d.hq, rows, cols}));
        return Mask::block_map(t.view, bq, bk);
      }
      if (kind == "block_attention") {
        OwnedTensor& t =
            segments(inst, "segments" + std::to_string(inst.extras.size()), s.at("segments"));
        return Mask::block_attention(t.view);
      }
      if (kind == "prefix_lm") return Mask::prefix_lm(s.at("prefix"));
      if (kind == "neighborhood") {
        std::vector<bool> causal;
        for (const json& c : s.at("causal")) causal.push_back(c.get<bool>());
        return Mask::neighborhood(ints(s.at("shape")), ints(s.at("kernel")), ints(s.at("dilation")),
                                  causal);
      }
      if (kind == "maxvit_block") {
        auto sh = ints(s.at("shape"));
        return Mask::maxvit_block(sh[0], sh[1], s.at("window"));
      }
      if (kind == "maxvit_grid") {
        auto sh = ints(s.at("shape"));
        return Mask::maxvit_grid(sh[0], sh[1], s.at("grid"));
      }
      if (kind == "and" || kind == "or") {
        const json& of = s.at("of");
        Mask acc = parse_mask(of.at(0), inst, err, nullptr);
        for (size_t i = 1; i < of.size(); ++i) {
          Mask next = parse_mask(of.at(i), inst, err, nullptr);
          acc = kind == "and" ? (acc & next) : (acc | next);
        }
        return acc;
      }
      if (kind == "not") return !parse_mask(s.at("of"), inst, err, nullptr);
    }
    err = "unknown mask '" + kind + "'";
    return Mask::none();
  }
  if (m.is_object() && m.size() == 1) {
    const std::string kind = m.begin().key();
    const json& a = m.begin().value();
    if (kind == "document") {
      OwnedTensor& t = segments(inst, "segments" + std::to_string(inst.extras.size()), a);
      return Mask::document(t.view, false);
    }
    if (kind == "sliding_window") return Mask::sliding_window(a.at(0), a.at(1));
    if (kind == "chunked") return Mask::chunked(a.get<int64_t>(), false);
    if (kind == "prefix_lm") return Mask::prefix_lm(a.get<int64_t>());
    json whole = a.is_object() ? a : json::object();
    whole["mask"] = kind;
    return parse_mask(json(kind), inst, err, &whole);
  }
  err = "cannot read mask " + m.dump();
  return Mask::none();
}

}  // namespace

std::string build_spec(const json& s, Instance& inst, const ExtraSource& extras) {
  const Dims& d = inst.dims;
  AttentionSpec& spec = inst.spec;
  std::string err;
  spec.mask = parse_mask(s.value("mask", json("none")), inst, err, &s);
  if (!err.empty()) return err;
  if (s.value("alignment", "bottom_right") == "top_left") spec.alignment = Alignment::kTopLeft;
  if (s.contains("scale")) spec.scale = s.at("scale").get<float>();
  if (s.contains("layout") && s.at("layout") == "bnhd") spec.layout = Layout::kBNHD;

  if (s.contains("score_mod")) {
    const json& m = s.at("score_mod");
    ScoreMods& mods = spec.mods;
    if (m.is_string() && m == "bias") {
      std::vector<int64_t> shape = {d.batch, d.hq, d.nq, d.nk};
      if (s.contains("bias_shape")) shape = ints(s.at("bias_shape"));
      OwnedTensor t = extras("bias", shape);
      // "bias_dtype": "input" rounds the (fp32) bias to the inputs' dtype.
      if (s.value("bias_dtype", "fp32") == "input" && t.view.dtype == DType::kF32) {
        const float* x = reinterpret_cast<const float*>(t.bytes.data());
        t = OwnedTensor::from_doubles(std::vector<double>(x, x + t.view.numel()), inst.dtype,
                                      shape);
      }
      mods.bias = put(inst, "bias", std::move(t)).view;
    } else if (m.is_string() && m == "low_rank_bias") {
      const int64_t r = s.value("rank", 3);
      mods.low_rank_u = put(inst, "u", extras("u", {d.batch, d.hq, d.nq, r})).view;
      mods.low_rank_w = put(inst, "w", extras("w", {d.batch, d.hq, d.nk, r})).view;
    } else if (m.is_string() && m == "forget_gate") {
      mods.forget_log_f = put(inst, "log_f", extras("log_f", {d.batch, d.hq, d.nk})).view;
    } else if (m.is_object() && m.contains("softcap")) {
      mods.softcap = m.at("softcap").get<float>();
    } else if (m.is_object() && m.contains("alibi")) {
      mods.alibi = m.value("symmetric", false) ? AlibiMode::kSymmetric : AlibiMode::kCausal;
      if (m.at("alibi") == "tensor")  // learnable slopes, one per query head
        mods.alibi_slopes = put(inst, "slopes", extras("slopes", {d.hq})).view;
    } else if (m.is_object() && m.contains("relative_buckets")) {
      if (m.at("relative_buckets") == "t5") {
        mods.relative = RelativeBucketKind::kT5;
        mods.bidirectional = m.value("bidirectional", true);
        mods.num_buckets = m.value("num_buckets", 32);
        mods.max_distance = m.value("max_distance", 128);
        mods.relative_table = put(inst, "table", extras("table", {d.hq, mods.num_buckets})).view;
      } else {
        mods.relative = RelativeBucketKind::kClipped;
        mods.clip = m.value("max", 8);
        mods.relative_table = put(inst, "table", extras("table", {d.hq, 2 * mods.clip + 1})).view;
      }
    } else {
      return "unknown score_mod " + m.dump();
    }
  }
  // "softcap" beside a score_mod: the softcap after its additive term (MECHANISMS.md: order of
  // operations).
  if (s.contains("softcap")) spec.mods.softcap = s.at("softcap").get<float>();
  if (s.contains("normalizer")) {
    const json& n = s.at("normalizer");
    Normalizer& norm = spec.normalizer;
    if (n == "softmax") {
    } else if (n == "sink") {
      norm.kind = NormalizerKind::kSoftmaxSink;
      norm.sinks = put(inst, "sinks", extras("sinks", {d.hq})).view;
    } else if (n == "sigmoid") {
      norm.kind = NormalizerKind::kSigmoid;
      if (s.contains("beta")) norm.beta = s.at("beta").get<float>();
    } else if (n == "rela") {
      norm.kind = NormalizerKind::kReLA;
      norm.rela_gain = put(inst, "gain", extras("gain", {d.dv})).view;
    } else if (n.is_object() && n.contains("kernel")) {
      norm.kind = NormalizerKind::kKernel;
      norm.feature = n.at("kernel") == "relu" ? KernelFeature::kReLU : KernelFeature::kSoftplus;
      norm.power = n.value("power", 1.0f);
      norm.length_scale = n.value("length_scale", false);
    } else {
      return "unknown normalizer " + n.dump();
    }
  }
  if (s.contains("gate")) {
    if (s.at("gate") == "elementwise") {
      spec.gate_kind = GateKind::kElementwise;
      spec.gate = put(inst, "gate", extras("gate", {d.batch, d.hq, d.nq, d.dv})).view;
    } else {
      spec.gate_kind = GateKind::kPerHead;
      spec.gate = put(inst, "gate", extras("gate", {d.batch, d.hq, d.nq})).view;
    }
  }
  return "";
}

std::vector<std::string> mechanism_names() {
  return {"dense",
          "causal",
          "causal_top_left",
          "sliding_window",
          "global_window",
          "chunked",
          "document",
          "block_attention",
          "prefix_lm",
          "neighborhood_1d",
          "neighborhood_2d",
          "neighborhood_3d",
          "maxvit_block",
          "maxvit_grid",
          "and_causal_document",
          "and_window_document",
          "or_window_chunked",
          "not_causal",
          "block_map",
          "softcap",
          "alibi",
          "alibi_symmetric",
          "alibi_slopes",
          "bias",
          "bias_broadcast",
          "low_rank_bias",
          "relative_t5",
          "relative_clipped",
          "forget_gate",
          "sink",
          "sigmoid",
          "kernel_softplus",
          "kernel_relu_length_scale",
          "rela",
          "gate",
          "gate_per_head"};
}

namespace {
// Largest divisor of n that is <= sqrt(n).
int64_t grid_rows(int64_t n) {
  int64_t r = 1;
  for (int64_t x = 1; x * x <= n; ++x)
    if (n % x == 0) r = x;
  return r;
}
int64_t odd_at_most(int64_t k, int64_t limit) {
  k = std::min(k, limit);
  return k % 2 ? k : k - 1;
}
json segments_json(int64_t n, int64_t docs) {
  std::vector<int32_t> ids(n);
  for (int64_t i = 0; i < n; ++i) ids[i] = static_cast<int32_t>(i * docs / n);
  return ids;
}
}  // namespace

json mechanism_spec(const std::string& name, const Dims& d) {
  const int64_t n = d.nk;
  const int64_t window = std::max<int64_t>(1, std::min<int64_t>(1024, n / 4));
  if (name == "dense") return {{"mask", "none"}};
  if (name == "causal") return {{"mask", "causal"}};
  if (name == "causal_top_left") return {{"mask", "causal"}, {"alignment", "top_left"}};
  if (name == "sliding_window") return {{"mask", "sliding_window"}, {"left", window}, {"right", 0}};
  if (name == "global_window")
    return {{"mask", "global_window"},
            {"left", window / 2},
            {"right", window / 2},
            {"globals", std::vector<int64_t>{0, n / 2}}};
  if (name == "chunked") return {{"mask", "chunked"}, {"chunk", window}, {"causal", true}};
  if (name == "document" || name == "block_attention") {
    if (d.nq != d.nk) return {};
    return {{"mask", name}, {"segments", segments_json(n, 4)}, {"causal", true}};
  }
  if (name == "prefix_lm") return {{"mask", "prefix_lm"}, {"prefix", n / 3}};
  if (name.rfind("neighborhood", 0) == 0 || name.rfind("maxvit", 0) == 0) {
    if (d.nq != d.nk) return {};
    if (name == "neighborhood_1d")
      return {{"mask", "neighborhood"},
              {"shape", {n}},
              {"kernel", {odd_at_most(13, n)}},
              {"dilation", {1}},
              {"causal", {false}}};
    const int64_t rows = grid_rows(n), cols = n / rows;
    if (name == "neighborhood_2d")
      return {{"mask", "neighborhood"},
              {"shape", {rows, cols}},
              {"kernel", {odd_at_most(13, rows), odd_at_most(13, cols)}},
              {"dilation", {1, 1}},
              {"causal", {false, false}}};
    if (name == "neighborhood_3d") {
      const int64_t a = grid_rows(rows), b = rows / a;
      return {{"mask", "neighborhood"},
              {"shape", {a, b, cols}},
              {"kernel", {odd_at_most(5, a), odd_at_most(5, b), odd_at_most(5, cols)}},
              {"dilation", {1, 1, 1}},
              {"causal", {false, false, false}}};
    }
    if (name == "maxvit_block")
      return {{"mask", "maxvit_block"}, {"shape", {rows, cols}}, {"window", 8}};
    if (name == "maxvit_grid") {
      int64_t g = 1;
      for (int64_t x = 1; x <= 8; ++x)
        if (rows % x == 0 && cols % x == 0) g = x;
      return {{"mask", "maxvit_grid"}, {"shape", {rows, cols}}, {"grid", g}};
    }
  }
  if (name == "and_causal_document") {  // (Mask's & folds it into one causal document node)
    if (d.nq != d.nk) return {};
    return {{"mask", "and"}, {"of", {"causal", {{"document", segments_json(n, 3)}}}}};
  }
  if (name == "and_window_document") {  // a tree with a segment node (causal & document folds)
    if (d.nq != d.nk) return {};
    return {{"mask", "and"},
            {"of", {{{"sliding_window", {window, 0}}}, {{"document", segments_json(n, 3)}}}}};
  }
  if (name == "or_window_chunked")
    return {{"mask", "or"},
            {"of", {{{"sliding_window", {window / 4, window / 4}}}, {{"chunked", window}}}}};
  if (name == "not_causal") return {{"mask", "not"}, {"of", "causal"}};
  if (name == "block_map")  // per-head block-sparse map, 16 x 32 token blocks (not tile-aligned)
    return {{"mask", "block_map"}, {"block_q", 16}, {"block_k", 32}};
  if (name == "softcap") return {{"mask", "causal"}, {"score_mod", {{"softcap", 5.0}}}};
  if (name == "alibi") return {{"mask", "causal"}, {"score_mod", {{"alibi", "default"}}}};
  if (name == "alibi_symmetric")
    return {{"mask", "none"}, {"score_mod", {{"alibi", "default"}, {"symmetric", true}}}};
  if (name == "alibi_slopes") return {{"mask", "causal"}, {"score_mod", {{"alibi", "tensor"}}}};
  if (name == "bias") return {{"mask", "none"}, {"score_mod", "bias"}};
  if (name == "bias_broadcast")  // one [Nq, Nk] bias shared by every batch element and head
    return {{"mask", "causal"}, {"score_mod", "bias"}, {"bias_shape", {1, 1, d.nq, d.nk}}};
  if (name == "low_rank_bias") return {{"mask", "causal"}, {"score_mod", "low_rank_bias"}};
  if (name == "relative_t5")
    return {{"mask", "none"},
            {"score_mod",
             {{"relative_buckets", "t5"},
              {"bidirectional", true},
              {"num_buckets", 32},
              {"max_distance", 128}}}};
  if (name == "relative_clipped")  // no mask: every one of the 33 buckets is reached
    return {{"mask", "none"}, {"score_mod", {{"relative_buckets", "clipped"}, {"max", 16}}}};
  if (name == "forget_gate") {
    if (d.nq > d.nk) return {};
    return {{"mask", "causal"}, {"score_mod", "forget_gate"}};
  }
  if (name == "sink") return {{"mask", "causal"}, {"normalizer", "sink"}};
  if (name == "sigmoid") return {{"mask", "causal"}, {"normalizer", "sigmoid"}};
  if (name == "kernel_softplus")
    return {{"mask", "none"},
            {"normalizer", {{"kernel", "softplus"}, {"power", 1.5}, {"length_scale", false}}}};
  if (name == "kernel_relu_length_scale")
    return {{"mask", "causal"},
            {"normalizer", {{"kernel", "relu"}, {"power", 2.0}, {"length_scale", true}}}};
  if (name == "rela") return {{"mask", "causal"}, {"normalizer", "rela"}};
  if (name == "gate") return {{"mask", "causal"}, {"gate", "elementwise"}};
  if (name == "gate_per_head") return {{"mask", "none"}, {"gate", "per_head"}};
  return {};
}

OwnedTensor zeros_like(const OwnedTensor& t, DType dtype) {
  return OwnedTensor::zeros(dtype, std::vector<int64_t>(t.view.shape, t.view.shape + t.view.ndim));
}

void poison(OwnedTensor& t) {
  const size_t n = t.bytes.size() / dtype_size(t.view.dtype);
  for (size_t i = 0; i < n; ++i) core::store_from_double(t.bytes.data(), t.view.dtype, i, NAN);
}

Outputs make_outputs(const Instance& inst, bool stats, bool entropy) {
  const Dims& d = inst.dims;
  const bool varlen = inst.spec.cu_seqlens_q.defined();
  Outputs o;
  std::vector<int64_t> out_shape = {d.batch, d.hq, d.nq, d.dv};
  if (inst.q.view.defined()) {  // q's shape (layout, varlen) with head_dim_v columns
    out_shape.assign(inst.q.view.shape, inst.q.view.shape + inst.q.view.ndim);
    out_shape.back() = d.dv;
  }
  o.out = OwnedTensor::zeros(inst.dtype, out_shape);
  const std::vector<int64_t> rows =
      varlen ? std::vector<int64_t>{d.hq, out_shape[0]} : std::vector<int64_t>{d.batch, d.hq, d.nq};
  if (inst.wants_row_stat()) o.row_stat = OwnedTensor::zeros(DType::kF32, rows);
  const bool softmax = inst.spec.normalizer.kind == NormalizerKind::kSoftmax ||
                       inst.spec.normalizer.kind == NormalizerKind::kSoftmaxSink;
  if (stats && softmax) {
    o.row_max = OwnedTensor::zeros(DType::kF32, rows);
    if (entropy) o.entropy = OwnedTensor::zeros(DType::kF32, rows);
    if (!varlen) o.col_mass = OwnedTensor::zeros(DType::kF32, {d.batch, d.hq, d.nk});
  }
  return o;
}

AttentionStats stats_views(Outputs& o) {
  AttentionStats s;
  s.row_max = o.row_max.view;
  s.entropy = o.entropy.view;
  s.col_mass = o.col_mass.view;
  return s;
}

std::string num(double x) {
  char b[32];
  std::snprintf(b, sizeof b, "%.3g", x);
  return b;
}

double rel_error(const std::vector<double>& x, const std::vector<double>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    if (std::isinf(ref[i]) && x[i] == ref[i]) continue;
    const double e = x[i] - ref[i];
    num += e * e;
    den += ref[i] * ref[i];
  }
  if (den == 0) return std::sqrt(num);
  return std::sqrt(num / den);
}

double max_abs_error(const std::vector<double>& x, const std::vector<double>& ref) {
  double m = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    if (std::isinf(ref[i]) && x[i] == ref[i]) continue;
    const double e = std::abs(x[i] - ref[i]);
    m = std::isnan(e) ? INFINITY : std::max(m, e);
  }
  return m;
}

}  // namespace attnkit::tools
