// Attention problems described in the spec vocabulary of shared/golden/golden.py
// ({"mask": "sliding_window", "left": 3, ...}), with owned tensors: shared by the CLI and tests.
#pragma once
#include <functional>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "attnkit/attention.h"

namespace attnkit::tools {

using json = nlohmann::json;

// A tensor that owns its memory (contiguous).
struct OwnedTensor {
  std::vector<unsigned char> bytes;
  TensorView view;
  static OwnedTensor zeros(DType dtype, std::vector<int64_t> shape);
  static OwnedTensor from_doubles(const std::vector<double>& x, DType dtype, std::vector<int64_t> shape);
  static OwnedTensor from_ints(const std::vector<int32_t>& x, std::vector<int64_t> shape);
  std::vector<double> to_doubles() const;  // in logical (row-major shape) order
};

struct Dims {
  int64_t batch = 1, hq = 1, hk = 1, nq = 1, nk = 1, d = 8, dv = 8;
};

// Supplies an extra input tensor by name ("bias", "u", "w", "table", "log_f", "sinks", "gain",
// "gate") and its expected shape: from a golden case, or random.
using ExtraSource = std::function<OwnedTensor(const std::string& name, const std::vector<int64_t>& shape)>;

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
Outputs make_outputs(const Instance& inst, bool stats);
AttentionStats stats_views(Outputs& o);

// Relative Frobenius error ||x - ref|| / ||ref|| (ignoring entries where both are -inf).
double rel_error(const std::vector<double>& x, const std::vector<double>& ref);
double max_abs_error(const std::vector<double>& x, const std::vector<double>& ref);

}  // namespace attnkit::tools
