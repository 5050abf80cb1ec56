// draw_case() (fuzz.h): one case from its seed. Every choice is drawn in a fixed order from one
// std::mt19937_64 seeded with the seed, so the seed alone replays the case (on the same build:
// the standard distributions' algorithms are the library's). Draws stay within what validation
// allows where that is known (grid masks only where seqlen_q = seqlen_kv, no segment ids under
// varlen, ...), so that most cases run; the refusals left are counted, not failed.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>

#include "core/convert.h"
#include "fuzz.h"
#ifdef ATTNKIT_WITH_CUDA
#include "cuda/forward.h"
#endif

namespace attnkit::tools {
namespace {

// Work bound of a draw, B * Hq * Nq * Nk * (d + dv): the float64 oracle takes tens of ms.
constexpr double kMaxWork = 6e6;
// Inputs q, k are N(0, s^2) with s log-uniform in [kMinInputScale, kMaxInputScale]: logits from
// nearly uniform to one-hot (their spread is about s^2 at the default scale).
constexpr double kMinInputScale = 0.1, kMaxInputScale = 8.0;

// The random choices of one case.
class Dice {
 public:
  explicit Dice(uint64_t seed) : rng_(seed) {}
  int64_t integer(int64_t lo, int64_t hi) {
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng_);
  }
  double real(double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(rng_); }
  double log_uniform(double lo, double hi) { return std::exp(real(std::log(lo), std::log(hi))); }
  bool chance(double p) { return real(0, 1) < p; }
  template <class T>
  T pick(const std::vector<T>& from) {
    return from[integer(0, static_cast<int64_t>(from.size()) - 1)];
  }
  uint64_t seed() { return rng_(); }

 private:
  std::mt19937_64 rng_;
};

template <class T>
std::string list(const std::vector<T>& x) {
  std::string s;
  for (const T& e : x) {
    if (!s.empty()) s += ' ';
    s += std::to_string(e);
  }
  return s;
}
std::vector<int64_t> divisors(int64_t n) {
  std::vector<int64_t> r;
  for (int64_t x = 1; x <= n; ++x)
    if (n % x == 0) r.push_back(x);
  return r;
}

// The head dims d of the CUDA kernels in this build, each once (a draw of 192 may take dv 128).
std::vector<int64_t> cuda_head_dims() {
  std::vector<int64_t> dims;
#ifdef ATTNKIT_WITH_CUDA
  for (const auto& [d, dv] : cuda::built_head_dims())
    if (std::find(dims.begin(), dims.end(), d) == dims.end()) dims.push_back(d);
#endif
  return dims.empty() ? std::vector<int64_t>{64, 128} : dims;
}

// A drawn mask and its description.
struct Drawn {
  Mask mask;
  std::string what;
};

// Draws one case into `c`, describing each choice as it goes.
class Drawer {
 public:
  Drawer(uint64_t seed, Device device, FuzzCase& c)
      : dice_(seed), side_dice_(seed ^ 0x9e3779b97f4a7c15), cuda_(device == Device::kCUDA), c_(c) {}

  void draw() {
    Instance& inst = c_.inst;
    shapes();
    inputs();
    if (dice_.chance(0.3)) {
      inst.spec.alignment = Alignment::kTopLeft;
      say("top_left");
    }
    Drawn mask = mask_tree(0);
    inst.spec.mask = std::move(mask.mask);
    say("mask=" + mask.what);
    if (dice_.chance(0.2)) {
      inst.spec.scale = static_cast<float>(dice_.real(0.01, 1.0));
      say("scale=" + num(*inst.spec.scale));
    }
    if (side_dice_.chance(0.05)) {  // a negative scale (valid: s = scale q . k)
      inst.spec.scale =
          -inst.spec.scale.value_or(1.f / std::sqrt(static_cast<float>(c_.inst.dims.d)));
      say("scale=" + num(*inst.spec.scale));
    }
    score_mods();
    normalizer();
    if (masking_) masking_bias(inst.spec.mods.bias);
    gate();
    options();
  }

 private:
  void say(const std::string& s) { c_.description += (c_.description.empty() ? "" : " ") + s; }
  // Keeps a tensor alive in the instance (the spec points into it).
  TensorView keep(OwnedTensor t) {
    std::string name = "t";
    name += std::to_string(c_.inst.extras.size());
    return (c_.inst.extras[name] = std::move(t)).view;
  }
  OwnedTensor random(DType dtype, std::vector<int64_t> shape, double scale) {
    return random_tensor(dtype, std::move(shape), scale, dice_.seed());
  }
  // A named extra of random_extras (log f, slopes, gain keep their ranges).
  TensorView extra(const char* name, std::vector<int64_t> shape) {
    return keep(random_extras(dice_.seed())(name, shape));
  }
  // The shape of a q-like operand (and out, an elementwise gate): varlen, BNHD or BHND.
  std::vector<int64_t> rows_shape(int64_t heads, int64_t n, int64_t dim, int64_t total) const {
    if (varlen_) return {total, heads, dim};
    return c_.inst.spec.layout == Layout::kBNHD ? std::vector<int64_t>{batch_, n, heads, dim}
                                                : std::vector<int64_t>{batch_, heads, n, dim};
  }
  int64_t size() {
    return dice_.chance(0.3) ? dice_.integer(1, 20)
                             : dice_.integer(1, dice_.chance(0.7) ? 130 : 300);
  }

  void shapes() {
    Dims& d = c_.inst.dims;
    c_.inst.dtype = cuda_ ? dice_.pick<DType>({DType::kBF16, DType::kF16})
                          : dice_.pick<DType>({DType::kF32, DType::kBF16, DType::kF16});
    d.hk = dice_.integer(1, 3);
    d.hq = d.hk * (dice_.chance(0.1) ? 8 : dice_.integer(1, 3));  // MQA / GQA up to ratio 8
    if (cuda_) {
      d.d = dice_.pick(cuda_head_dims());
      d.dv = d.d == 192 && dice_.chance(0.5) ? 128 : d.d;
    } else {
      d.d = dice_.chance(0.5) ? dice_.integer(1, 80) : dice_.pick<int64_t>({8, 16, 32, 64, 128});
      d.dv = dice_.chance(0.5) ? d.d : dice_.integer(1, 80);
    }
    batch_ = d.batch = dice_.integer(1, 3);
    d.nq = size();
    d.nk = dice_.chance(0.4) ? d.nq : size();
    while (static_cast<double>(d.batch) * d.hq * d.nq * d.nk * (d.d + d.dv) > kMaxWork) {
      d.nq = (d.nq + 1) / 2;
      d.nk = (d.nk + 1) / 2;
    }
    varlen_ = dice_.chance(0.2);
    if (varlen_) {  // sequence lengths up to nq / nk, a few empty
      cu_q_ = {0};
      cu_k_ = {0};
      int64_t max_q = 1, max_k = 1;
      for (int64_t b = 0; b < d.batch; ++b) {
        const int64_t lq = dice_.integer(dice_.chance(0.1) ? 0 : 1, d.nq);
        const int64_t lk = dice_.chance(0.4) ? lq : dice_.integer(dice_.chance(0.1) ? 0 : 1, d.nk);
        cu_q_.push_back(cu_q_.back() + static_cast<int32_t>(lq));
        cu_k_.push_back(cu_k_.back() + static_cast<int32_t>(lk));
        max_q = std::max(max_q, lq);
        max_k = std::max(max_k, lk);
      }
      d.nq = max_q;
      d.nk = max_k;
      // Packed tensors may have rows past the last sequence (padding: zero gradients; the
      // forward leaves them). Drawn from the side dice: draws added after the fuzzer's first
      // version leave the others what each seed drew.
      rows_q_ = cu_q_.back() + (side_dice_.chance(0.3) ? side_dice_.integer(1, 9) : 0);
      rows_k_ = cu_k_.back() + (side_dice_.chance(0.3) ? side_dice_.integer(1, 9) : 0);
    } else if (dice_.chance(0.5)) {
      c_.inst.spec.layout = Layout::kBNHD;
    }
    c_.description = std::string(dtype_name(c_.inst.dtype)) + " b=" + std::to_string(d.batch) +
                     " hq=" + std::to_string(d.hq) + " hk=" + std::to_string(d.hk) +
                     " nq=" + std::to_string(d.nq) + " nk=" + std::to_string(d.nk) +
                     " d=" + std::to_string(d.d) + " dv=" + std::to_string(d.dv) +
                     (c_.inst.spec.layout == Layout::kBNHD ? " bnhd" : "");
    if (varlen_)
      say("varlen cu_q=[" + list(cu_q_) + "] cu_k=[" + list(cu_k_) + "] rows " +
          std::to_string(rows_q_) + " " + std::to_string(rows_k_));
  }

  void inputs() {
    Instance& inst = c_.inst;
    const Dims& d = inst.dims;
    const double s = dice_.log_uniform(kMinInputScale, kMaxInputScale);
    c_.check.input_scale = s;
    say("in_scale=" + num(s));
    const int64_t tq = rows_q_, tk = rows_k_;
    inst.q = random(inst.dtype, rows_shape(d.hq, d.nq, d.d, tq), s);
    inst.k = random(inst.dtype, rows_shape(d.hk, d.nk, d.d, tk), s);
    inst.v = random(inst.dtype, rows_shape(d.hk, d.nk, d.dv, tk), 1.0);
    if (varlen_) {
      const int64_t n = d.batch + 1;
      inst.spec.cu_seqlens_q = keep(OwnedTensor::from_ints(cu_q_, {n}));
      inst.spec.cu_seqlens_kv = keep(OwnedTensor::from_ints(cu_k_, {n}));
    }
  }

  // An additive mask in the bias: -inf or the dtype's lowest value on a random part of its
  // elements, and on whole rows now and then (rows with no key: 0 out, -inf LSE; never NaN,
  // DESIGN.md). Side draws. A row of nothing but fp32's or bf16's lowest value is a row of
  // finite scores in the oracle (even weights) but beyond fp32's range in the exponent of CUDA's
  // kernels and in the normalized kernel's p log f(s) (masked there; design.md): the lowest
  // value is drawn for the other normalizers on the CPU, and not for an fp16 bias (-65504 is
  // an ordinary score, whose fp32 sum with s rounds by 2^-8: more than the statistics' fixed
  // tolerance allows).
  void masking_bias(const TensorView& b) {
    const bool lowest_ok =
        b.dtype != DType::kF16 && !cuda_ && c_.inst.spec.normalizer.kind != NormalizerKind::kKernel;
    const bool inf = side_dice_.chance(0.5) || !lowest_ok;
    const double lowest = b.dtype == DType::kBF16  ? -0x1.fep127
                          : b.dtype == DType::kF16 ? -65504.0
                                                   : -static_cast<double>(FLT_MAX);
    const double value = inf ? -INFINITY : lowest;
    const double share = side_dice_.real(0.1, 0.9);
    const int64_t rows = b.shape[0] * b.shape[1] * b.shape[2], cols = b.shape[3];
    int64_t whole = 0;
    for (int64_t r = 0; r < rows; ++r) {
      const bool all = side_dice_.chance(0.05);
      whole += all;
      for (int64_t c = 0; c < cols; ++c)
        if (all || side_dice_.chance(share))
          core::store_from_double(b.data, b.dtype, r * cols + c, value);
    }
    say(std::string("masked(") + (inf ? "-inf" : "lowest") + "," + num(share) + "," +
        std::to_string(whole) + " rows)");
  }

  // Segment ids 0.. in docs runs of random lengths (some empty).
  std::vector<int32_t> segments(int64_t n, int64_t docs) {
    std::vector<int64_t> cuts(docs - 1);
    for (int64_t& x : cuts) x = dice_.integer(0, n);
    std::sort(cuts.begin(), cuts.end());
    std::vector<int32_t> ids(n);
    for (int64_t i = 0; i < n; ++i)
      ids[i] = static_cast<int32_t>(std::upper_bound(cuts.begin(), cuts.end(), i) - cuts.begin());
    return ids;
  }

  // A mask tree: and / or / not of up to two levels over the leaves.
  Drawn mask_tree(int depth) {
    const double r = dice_.real(0, 1);
    if (depth == 0 && r < 0.12) return {Mask::none(), "none"};
    if (depth < 2 && r < 0.35) {
      const int64_t op = dice_.integer(0, 2);
      const Drawn a = mask_tree(depth + 1);
      if (op == 2) return {!a.mask, "!(" + a.what + ")"};
      const Drawn b = mask_tree(depth + 1);
      return {op == 0 ? (a.mask & b.mask) : (a.mask | b.mask),
              "(" + a.what + (op == 0 ? " & " : " | ") + b.what + ")"};
    }
    return leaf();
  }

  Drawn leaf() {
    const Dims& d = c_.inst.dims;
    const int64_t nq = d.nq, nk = d.nk;
    // What validation allows here: segment ids and block maps are for padded batches (varlen
    // refuses them), grid masks need seqlen_q = seqlen_kv = the grid size.
    std::vector<std::string> kinds = {"causal", "sliding_window", "global_window", "chunked",
                                      "prefix_lm"};
    if (!varlen_) kinds.insert(kinds.end(), {"document", "block_map"});
    if (!varlen_ && nq == nk)
      kinds.insert(kinds.end(), {"block_attention", "neighborhood", "maxvit_block", "maxvit_grid"});
    const std::string kind = dice_.pick(kinds);
    if (kind == "causal") {
      return {Mask::causal(), kind};
    }
    if (kind == "sliding_window") {
      auto side = [&](double zero) {
        return dice_.chance(zero)   ? 0
               : dice_.chance(0.15) ? Mask::kUnboundedWindow
                                    : dice_.integer(0, nk + 2);
      };
      const int64_t left = side(0), right = side(0.4);
      auto show = [](int64_t x) {
        return x == Mask::kUnboundedWindow ? std::string("inf") : std::to_string(x);
      };
      return {Mask::sliding_window(left, right), kind + "(" + show(left) + "," + show(right) + ")"};
    }
    if (kind == "global_window") {
      const int64_t left = dice_.integer(0, nk), right = dice_.integer(0, nk / 2);
      std::vector<int64_t> globals(dice_.integer(1, 3));
      for (int64_t& g : globals) g = dice_.integer(0, nk - 1);
      std::sort(globals.begin(), globals.end());
      globals.erase(std::unique(globals.begin(), globals.end()), globals.end());
      return {Mask::global_window(left, right, globals), kind + "(" + std::to_string(left) + "," +
                                                             std::to_string(right) + ",[" +
                                                             list(globals) + "])"};
    }
    if (kind == "chunked") {
      const int64_t chunk = dice_.integer(1, nk + 3);
      const bool causal = dice_.chance(0.5);
      return {Mask::chunked(chunk, causal),
              kind + "(" + std::to_string(chunk) + (causal ? ",causal)" : ")")};
    }
    if (kind == "prefix_lm") {
      const int64_t prefix = dice_.integer(0, nk + 1);
      return {Mask::prefix_lm(prefix), kind + "(" + std::to_string(prefix) + ")"};
    }
    if (kind == "document" || kind == "block_attention") {
      const int64_t docs = dice_.integer(1, 5);
      const bool causal = dice_.chance(0.5), per_batch = dice_.chance(0.3);
      const int64_t rows = per_batch ? d.batch : 1;
      std::vector<int32_t> sq, sk;
      for (int64_t b = 0; b < rows; ++b) {
        const std::vector<int32_t> x = segments(nq, docs), y = segments(nk, docs);
        sq.insert(sq.end(), x.begin(), x.end());
        sk.insert(sk.end(), y.begin(), y.end());
      }
      auto shaped = [&](int64_t n) {
        return per_batch ? std::vector<int64_t>{d.batch, n} : std::vector<int64_t>{n};
      };
      const TensorView q_ids = keep(OwnedTensor::from_ints(sq, shaped(nq)));
      const std::string how = "(docs=" + std::to_string(docs) + (per_batch ? ",per_batch" : "");
      if (kind == "block_attention") {
        return {Mask::block_attention(q_ids), kind + how + ")"};
      }
      return {Mask::document(q_ids, keep(OwnedTensor::from_ints(sk, shaped(nk))), causal),
              kind + how + (causal ? ",causal)" : ")")};
    }
    if (kind == "block_map") {
      const int64_t bq = dice_.integer(1, 70), bk = dice_.integer(1, 70);
      const int64_t rows = (nq + bq - 1) / bq, cols = (nk + bk - 1) / bk;
      const int64_t mb = dice_.chance(0.5) ? d.batch : 1, mh = dice_.chance(0.5) ? d.hq : 1;
      std::vector<int32_t> cells(mb * mh * rows * cols);
      for (int32_t& x : cells) x = dice_.chance(0.6);
      return {Mask::block_map(keep(OwnedTensor::from_ints(cells, {mb, mh, rows, cols})), bq, bk),
              kind + "(" + std::to_string(bq) + "x" + std::to_string(bk) + ",[" +
                  std::to_string(mb) + "," + std::to_string(mh) + "])"};
    }
    if (kind == "neighborhood") {  // 1 to 3 grid dims whose product is the sequence length
      const int64_t dims = dice_.integer(1, 3);
      std::vector<int64_t> shape, kernel, dilation;
      std::vector<bool> causal;
      int64_t rest = nk;
      for (int64_t i = 0; i < dims; ++i) {
        shape.push_back(i + 1 < dims ? dice_.pick(divisors(rest)) : rest);
        rest /= shape.back();
      }
      std::string flags;
      for (int64_t extent : shape) {
        causal.push_back(dice_.chance(0.3));
        int64_t k = dice_.integer(1, extent);
        if (!causal.back() && k % 2 == 0) --k;  // a non-causal dim takes an odd kernel
        kernel.push_back(k);
        dilation.push_back(dice_.integer(1, extent / k));
        flags += causal.back() ? "c" : "-";
      }
      return {Mask::neighborhood(shape, kernel, dilation, causal),
              kind + "(shape=[" + list(shape) + "],kernel=[" + list(kernel) + "],dilation=[" +
                  list(dilation) + "],causal=" + flags + ")"};
    }
    const int64_t h = dice_.pick(divisors(nk)), w = nk / h;  // maxvit_block / maxvit_grid
    const int64_t p = dice_.pick(divisors(std::gcd(h, w)));
    return {
        kind == "maxvit_block" ? Mask::maxvit_block(h, w, p) : Mask::maxvit_grid(h, w, p),
        kind + "(" + std::to_string(h) + "x" + std::to_string(w) + "," + std::to_string(p) + ")"};
  }

  void score_mods() {
    Instance& inst = c_.inst;
    const Dims& d = inst.dims;
    ScoreMods& m = inst.spec.mods;
    // Tensor score mods are for padded batches (varlen refuses them); the forget gate's aligned
    // query positions must be key positions.
    std::vector<std::string> kinds = {"softcap", "alibi", "relative"};
    if (!varlen_) kinds.insert(kinds.end(), {"bias", "low_rank"});
    if (!varlen_ && d.nq <= d.nk) kinds.push_back("forget_gate");
    const int64_t count = dice_.chance(0.45) ? 0 : dice_.integer(1, 2);
    for (int64_t n = 0; n < count; ++n) {
      const std::string kind = dice_.pick(kinds);
      kinds.erase(std::find(kinds.begin(), kinds.end(), kind));
      if (kind == "softcap") {
        m.softcap = static_cast<float>(dice_.real(1, 30));
        say("softcap=" + num(m.softcap));
      } else if (kind == "alibi") {
        m.alibi = dice_.chance(0.5) ? AlibiMode::kCausal : AlibiMode::kSymmetric;
        const bool slopes = dice_.chance(0.5);
        if (slopes) m.alibi_slopes = extra("slopes", {d.hq});
        say(std::string("alibi(") + (m.alibi == AlibiMode::kCausal ? "causal" : "symmetric") +
            (slopes ? ",slopes)" : ")"));
      } else if (kind == "relative" && dice_.chance(0.5)) {
        m.relative = RelativeBucketKind::kT5;
        m.bidirectional = dice_.chance(0.5);
        m.num_buckets = dice_.integer(m.bidirectional ? 4 : 2, 40);
        const int64_t half = m.bidirectional ? m.num_buckets / 2 : m.num_buckets;
        m.max_distance = dice_.integer(half / 2 + 1, 150);
        m.relative_table = keep(random(DType::kF32, {d.hq, m.num_buckets}, 1.0));
        say("t5(buckets=" + std::to_string(m.num_buckets) + ",max_distance=" +
            std::to_string(m.max_distance) + (m.bidirectional ? ",bidirectional)" : ")"));
      } else if (kind == "relative") {
        m.relative = RelativeBucketKind::kClipped;
        m.clip = dice_.integer(0, 20);
        m.relative_table = keep(random(DType::kF32, {d.hq, 2 * m.clip + 1}, 1.0));
        say("clipped(" + std::to_string(m.clip) + ")");
      } else if (kind == "bias") {
        const int64_t bb = dice_.chance(0.5) ? d.batch : 1, bh = dice_.chance(0.5) ? d.hq : 1;
        const DType t = dice_.chance(0.7) ? DType::kF32 : inst.dtype;
        m.bias = keep(random(t, {bb, bh, d.nq, d.nk}, dice_.real(0.1, 3)));
        say("bias([" + std::to_string(bb) + "," + std::to_string(bh) + "]," + dtype_name(t) + ")");
        masking_ = side_dice_.chance(0.25);  // applied once the normalizer is drawn
      } else if (kind == "low_rank") {
        const int64_t r = dice_.integer(1, 4);
        m.low_rank_u = keep(random(DType::kF32, {d.batch, d.hq, d.nq, r}, 1.0));
        m.low_rank_w = keep(random(DType::kF32, {d.batch, d.hq, d.nk, r}, 1.0));
        say("low_rank(" + std::to_string(r) + ")");
      } else {
        m.forget_log_f = extra("log_f", {d.batch, d.hq, d.nk});
        say("forget_gate");
      }
    }
  }

  void normalizer() {
    Normalizer& n = c_.inst.spec.normalizer;
    const double r = dice_.real(0, 1);
    if (r < 0.45) return;
    if (r < 0.6) {
      n.kind = NormalizerKind::kSoftmaxSink;
      n.sinks = keep(random(DType::kF32, {c_.inst.dims.hq}, dice_.real(0.5, 4)));
      say("sink");
    } else if (r < 0.73) {
      n.kind = NormalizerKind::kSigmoid;
      // Now and then saturated (1 - P is 0 in fp32 past z ~ 17, in fp64 past ~37).
      if (dice_.chance(0.5)) n.beta = dice_.chance(0.2) ? dice_.real(15, 45) : dice_.real(-6, 1);
      say("sigmoid(beta=" + (n.beta ? num(*n.beta) : std::string("-log nk")) + ")");
    } else if (r < 0.87) {
      n.kind = NormalizerKind::kKernel;
      n.feature = dice_.chance(0.5) ? KernelFeature::kReLU : KernelFeature::kSoftplus;
      // ReLU takes a power >= 1: below 1 the weight s^p has the derivative p s^(p-1), infinite
      // as s -> 0+, so a gradient with a score near the kink is ill-conditioned by construction
      // (no precision recovers it), not a finding.
      const double low = n.feature == KernelFeature::kReLU ? 1.0 : 0.3;
      n.power = static_cast<float>(dice_.chance(0.5) ? dice_.integer(1, 3) : dice_.real(low, 3));
      n.length_scale = dice_.chance(0.5);
      say(std::string("kernel(") + (n.feature == KernelFeature::kReLU ? "relu" : "softplus") +
          ",power=" + num(n.power) + (n.length_scale ? ",length_scale)" : ")"));
    } else {
      n.kind = NormalizerKind::kReLA;
      n.rela_gain = extra("gain", {c_.inst.dims.dv});
      say("rela");
    }
  }

  void gate() {
    Instance& inst = c_.inst;
    const Dims& d = inst.dims;
    const double r = dice_.real(0, 1);
    if (r >= 0.35) return;
    const DType t = dice_.chance(0.5) ? DType::kF32 : inst.dtype;
    const int64_t tq = rows_q_;
    // 12: saturated both ways (past 17 and 37), seldom past 87 (sigmoid(-G) subnormal in fp32)
    const double spread = dice_.chance(0.2) ? 12.0 : 1.0;
    if (r < 0.2) {
      inst.spec.gate_kind = GateKind::kElementwise;
      inst.spec.gate = keep(random(t, rows_shape(d.hq, d.nq, d.dv, tq), spread));
      say(std::string("gate(elementwise,") + dtype_name(t) + ",spread=" + num(spread) + ")");
    } else {
      inst.spec.gate_kind = GateKind::kPerHead;
      inst.spec.gate = keep(random(
          t, varlen_ ? std::vector<int64_t>{d.hq, tq} : std::vector<int64_t>{d.batch, d.hq, d.nq},
          spread));
      say(std::string("gate(per_head,") + dtype_name(t) + ",spread=" + num(spread) + ")");
    }
  }

  void options() {
    CheckOptions& o = c_.check;
    const Dims& d = c_.inst.dims;
    o.dtype = c_.inst.dtype;
    o.dims = d;
    o.device = cuda_ ? Device::kCUDA : Device::kCPU;
    o.seed = dice_.seed() % (uint64_t{1} << 62);  // grad_out
    o.threads = static_cast<int>(dice_.integer(1, 2));
    o.deterministic = dice_.chance(cuda_ ? 0.05 : 0.5);  // the CUDA backward refuses it (atomics)
    const NormalizerKind k = c_.inst.spec.normalizer.kind;
    o.stats =
        (k == NormalizerKind::kSoftmax || k == NormalizerKind::kSoftmaxSink) && dice_.chance(0.7);
    if (o.stats) {
      o.entropy = dice_.chance(0.8);
      o.col_mass_group_sum = !varlen_ && dice_.chance(0.3);
      if (dice_.chance(0.3)) {
        o.col_mass_q_begin = dice_.integer(0, d.nq);
        o.col_mass_q_end = dice_.integer(o.col_mass_q_begin, d.nq);
      }
      say(std::string("stats(") + (o.entropy ? "entropy" : "no_entropy") +
          (o.col_mass_group_sum ? ",group_sum" : "") + ",rows " +
          std::to_string(o.col_mass_q_begin) + ".." + std::to_string(o.col_mass_q_end) + ")");
    }
    if (cuda_) {
      o.input_dtype_grads = dice_.chance(0.3);
      // Rows not 16-byte aligned; 16-bit ones at 2 bytes also without aligned pairs.
      if (dice_.chance(0.1)) o.grads_offset = o.input_dtype_grads && dice_.chance(0.5) ? 2 : 4;
      // out not 16-byte aligned (8 bytes: whole element pairs of any output dtype).
      if (dice_.chance(0.1)) o.out_offset = 8;
    }
    o.f64_grads = !o.input_dtype_grads && dice_.chance(0.2) && !cuda_;  // CUDA: fp32 or 16-bit
    say("threads=" + std::to_string(o.threads) + (o.deterministic ? " deterministic" : "") +
        (o.input_dtype_grads ? " 16-bit_grads" : "") + (o.f64_grads ? " f64_grads" : "") +
        (o.grads_offset ? " grads_offset=" + std::to_string(o.grads_offset) : "") +
        (o.out_offset ? " out_offset=" + std::to_string(o.out_offset) : ""));
  }

  Dice dice_, side_dice_;
  bool cuda_;
  FuzzCase& c_;
  int64_t batch_ = 1;
  bool varlen_ = false;
  std::vector<int32_t> cu_q_, cu_k_;
  int64_t rows_q_ = 0, rows_k_ = 0;  // varlen: the packed tensors' rows
  bool masking_ = false;             // an additive mask in the bias (masking_bias)
};

}  // namespace

FuzzCase draw_case(uint64_t seed, Device device) {
  FuzzCase c;
  Drawer(seed, device, c).draw();
  return c;
}

}  // namespace attnkit::tools
