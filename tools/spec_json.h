// Attention problems described in the spec vocabulary of shared/golden/golden.py
// ({"mask": "sliding_window", "left": 3, ...}), with owned tensors: shared by the CLI and tests.
#pragma once
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "attnkit/attention.h"

namespace attnkit::tools {

using json = nlohmann::json;

// A tensor that owns its memory (contiguous).
struct OwnedTensor {
  std::vector<unsigned char> bytes;
  TensorView view;
  static OwnedTensor zeros(DType dtype, std::vector<int64_t> shape);
  static OwnedTensor from_doubles(const std::vector<double>& x, DType dtype,
                                  std::vector<int64_t> shape);
  static OwnedTensor from_ints(const std::vector<int32_t>& x, std::vector<int64_t> shape);
  std::vector<double> to_doubles() const;  // in logical (row-major shape) order
};

struct Dims {
  int64_t batch = 1, hq = 1, hk = 1, nq = 1, nk = 1, d = 8, dv = 8;
};

// Supplies an extra input tensor by name ("bias", "u", "w", "table", "log_f", "sinks", "gain",
// "gate") and its expected shape: from a golden case, or random.
using ExtraSource =
    std::function<OwnedTensor(const std::string& name, const std::vector<int64_t>& shape)>;

// A whole problem: spec + inputs + the tensors the spec refers to.
struct Instance {
  Dims dims;
  DType dtype = DType::kF32;
  AttentionSpec spec;
  OwnedTensor q, k, v;
  std::map<std::string, OwnedTensor> extras;  // stable addresses: the spec points into them
  bool wants_row_stat() const { return spec.normalizer.kind != NormalizerKind::kSigmoid; }
};

// Fills inst.spec (and inst.extras) from a spec JSON. q, k, v and dims must already be set.
// Returns an error message, or "" on success.
std::string build_spec(const json& spec, Instance& inst, const ExtraSource& extras);

// Random inputs (normal, times `scale`), never zeros; bf16/fp16 values are exactly representable.
OwnedTensor random_tensor(DType dtype, std::vector<int64_t> shape, double scale, uint64_t seed);
ExtraSource random_extras(uint64_t seed);
void make_random_qkv(Instance& inst, double scale, uint64_t seed);

// The spec JSON of a named mechanism of the CLI / bench at the given dims (e.g. "causal",
// "sliding_window", "neighborhood_2d", "document", "softcap", "sink", ...); empty if unknown.
json mechanism_spec(const std::string& name, const Dims& dims);
std::vector<std::string> mechanism_names();

// Output buffers and the outcome of one forward run.
struct Outputs {
  OwnedTensor out, row_stat, row_max, entropy, col_mass;
};
// Shaped by the instance: out like q with head_dim_v columns (its layout, varlen's [total, H,
// dv]), the per-row values [B, Hq, Nq] (varlen [Hq, total_q]). stats: the softmax family's row
// max, entropy (unless !entropy) and column mass (none under varlen, which refuses it).
Outputs make_outputs(const Instance& inst, bool stats, bool entropy = true);
// A zero tensor of `t`'s shape in `dtype`.
OwnedTensor zeros_like(const OwnedTensor& t, DType dtype);
// Fills every element of t with NaN: the buffers a backend writes start so, so an element it
// leaves unwritten is an error (a NaN is judged an infinite error).
void poison(OwnedTensor& t);
AttentionStats stats_views(Outputs& o);

// Relative Frobenius error ||x - ref|| / ||ref|| (ignoring entries where both are -inf).
double rel_error(const std::vector<double>& x, const std::vector<double>& ref);
double max_abs_error(const std::vector<double>& x, const std::vector<double>& ref);
// x with 3 significant digits (the checks' and the fuzzer's messages).
std::string num(double x);

}  // namespace attnkit::tools

namespace attnkit::tools {

// One mechanism at one shape and dtype, run on the CPU (or opt.device) and checked against the
// float64 oracle (on the same low-precision inputs). Tolerance: tolerance_for(dtype), and for
// bf16 / fp16 also at most 2 x the error of the naive low-precision computation + 1e-6
// (DESIGN.md's rule), on the output's error beyond its dtype's subnormal spacing (and, for ReLA,
// tol times its magnitude: magnitudes.h).
struct CheckResult {
  bool ok = false;
  std::string mechanism, dtype, error;  // error: why it failed (empty when ok)
  Dims dims;
  double rel_err = 0, max_abs = 0, stat_err = 0, tol = 0;
  double naive_err = 0;      // error of the naive low-precision computation
  bool not_covered = false;  // the backend answered kNotImplemented
  bool refused = false;      // the backend refused by a rule (is_rule_refusal), ok is false
  std::string judged;        // every quantity judged: "name err/tol", for a verbose report
  double ms = 0;             // CPU forward time of this one run
  // check_backward on a backend that does not compute some extras' gradients: their names (the
  // other gradients are still checked).
  std::vector<std::string> extras_not_covered;
};
struct CheckOptions {
  DType dtype = DType::kF32;
  Dims dims;
  double input_scale = 1.0;
  uint64_t seed = 1;
  bool bnhd = false;
  int threads = 0;
  bool stats = true;    // the softmax family's row max, entropy and column mass
  bool entropy = true;  // with stats (the CPU's bf16 softmax step on vectors runs without it)
  bool deterministic = false;      // Options::deterministic
  Device device = Device::kCPU;    // kCUDA: inputs are copied to the GPU, outputs back
  bool input_dtype_grads = false;  // check_backward: dq, dk, dv in the inputs' dtype (CUDA)
  bool f64_grads = false;          // check_backward: every gradient in fp64 (else fp32)
  // With stats: col_mass summed over query rows [col_mass_q_begin, col_mass_q_end) (-1: all),
  // per KV head with col_mass_group_sum.
  int64_t col_mass_q_begin = 0, col_mass_q_end = -1;
  bool col_mass_group_sum = false;
  bool extras = true;    // check_backward: also the gradients of the spec's tensors (dbias, ...)
  int grads_offset = 0;  // check_backward on CUDA: dq, dk, dv start this many bytes into their
                         // buffers (rows not 16-byte aligned: the kernels' unaligned paths)
  int out_offset = 0;    // the forward on CUDA: out starts this many bytes into its buffer
  json with;  // keys merged into the mechanism's spec (e.g. a score mod on a mask's mechanism)
};
double tolerance_for(DType t);
CheckResult check_mechanism(const std::string& mechanism, const CheckOptions& opt);
// The same for an instance built by the caller (any layout, varlen, spec): opt's dtype, dims,
// seed, bnhd and with are not read (the instance has them); input_scale sets the statistics'
// tolerance.
CheckResult check_forward(Instance& inst, const CheckOptions& opt);

// Whether a refusal is one by rule: a code other than kInternal and a message that names what
// broke which rule, not a failed launch, allocation or copy ("kernel launch failed", "out of
// memory", ...). A refusal that is not one is a failure.
bool is_rule_refusal(const Status& s);

// A learnable extra of a spec and its gradient: name, member of AttentionGrads, shape.
struct ExtraGrad {
  const char* name;
  TensorView AttentionGrads::*member;
  std::vector<int64_t> shape;
};
std::vector<ExtraGrad> extra_grads(const AttentionSpec& spec);

// The backward pass of a mechanism (on opt.device, after that device's forward pass) against the
// float64 backward oracle. Each gradient's error is the norm of what exceeds, element by element,
// tol times the element's magnitude (magnitudes.h: the sum of |terms| the oracle adds up to it,
// which a rounding error is proportional to where the terms cancel) plus what storing it in its
// dtype may cost; it is judged relative to the gradient's scale (dq, dk, dv: the norm of the
// three together; an extra: its own norm). rel_err holds the largest error of dq, dk, dv,
// stat_err that of the extras. Tolerance: fp32 2e-5, fp16 3e-3, bf16 2e-2 (the forward's output,
// rounded to the input dtype, enters D = dO . O).
CheckResult check_backward(const std::string& mechanism, const CheckOptions& opt);
// The same for an instance built by the caller (as check_forward); grad_out from opt.seed.
CheckResult check_backward(Instance& inst, const CheckOptions& opt);
double backward_tolerance_for(DType t);

// One spec (BHND, no varlen) forward then backward on `device` and by the float64 oracle, on the
// same inputs, for tests of values no random draw reaches: got (the backend's) and want (the
// oracle's) hold out, row_stat (none for sigmoid), dq, dk, dv, then extra_grads(spec)'s
// gradients. The backend's out is in q's dtype, its gradients in fp32; the oracle's in fp64.
struct BesideOracle {
  std::vector<std::vector<double>> got, want;
  std::string error;  // the call that failed, with its message ("" when every call ran)
};
BesideOracle run_beside_oracle(const OwnedTensor& q, const OwnedTensor& k, const OwnedTensor& v,
                               const OwnedTensor& grad_out, const AttentionSpec& spec,
                               Device device);

// Inputs that take a mechanism's fp32 intermediates out of their range, one list for every
// backend's tests (BHND [1, 2, n, d], causal): the normalized kernel's weights f(s)^p beyond
// fp32's range for whole rows (softplus at s = -150, softplus^4 at -30, ReLU^8 at 1e5) and
// ReLU^2 with the length scale, mostly negative (rows with no weight: LSE -inf); sigmoid with
// beta 40 and an elementwise gate near 40 (1 - P and 1 - sigmoid(G) are 0 in fp32 past ~17 and
// in fp64 past ~37: the gradients through them came out 0); a per-head gate near 40 on softmax;
// negative scales (valid: s = scale q . k) on softmax, with ALiBi, sigmoid and the softplus
// kernel with a softcap (CUDA's fast forward takes scale > 0; its fast backward any sign); the
// length-scaled kernel in chunks of n - 1 (the last row alone: scale log 1 = 0) with -inf on
// every third diagonal and the last (-inf * 0 is NaN: a -inf score must stay -inf).
struct RangeCase {
  std::string name;
  Instance inst;
  OwnedTensor grad_out;
  bool empty_rows = false;  // some rows have no weight (the oracle's row_stat is -inf there)
};
std::vector<RangeCase> range_cases(DType dtype, int64_t n, int64_t d);

// Whether the CPU backward differentiates this mechanism (can_run_backward says ok).
bool backward_covered(const std::string& mechanism, const Dims& dims);

// Builds an instance of a named mechanism with random inputs; "" or an error message.
std::string make_instance(const std::string& mechanism, const CheckOptions& opt, Instance& inst);

DType parse_dtype(const std::string& s, bool* ok);

}  // namespace attnkit::tools
