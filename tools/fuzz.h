// `attnkit fuzz`: a differential fuzzer of a backend against the float64 oracle. Each case is
// drawn from its seed alone (dtype, shapes, GQA, layout, varlen, alignment, a mask tree, score
// mods, normalizer, gate, statistics, threads) and judged forward and backward by check_forward
// and check_backward: the tolerances of DESIGN.md, each gradient against its magnitude. Cases run
// in child processes (POSIX fork), so a crash or a hang is reported with its seed.
#pragma once
#include <cstdint>
#include <string>

#include "spec_json.h"

namespace attnkit::tools {

struct FuzzOptions {
  uint64_t seed = 1;     // the first case's seed; the cases after it take the next ones
  int64_t cases = 1000;  // how many cases at most (the CLI: no bound when only --seconds is given)
  double seconds = 0;    // stop starting cases after this long (0: no limit)
  Device device = Device::kCPU;
  bool forward_only = false;
  bool verbose = false;  // a line for every case, with every quantity judged
  bool invalid = false;  // each case with one thing broken (run_invalid_case)
};

// One drawn problem: the instance, how check_forward / check_backward run it, and a readable
// description of everything drawn.
struct FuzzCase {
  Instance inst;
  CheckOptions check;
  std::string description;
};
// The case of a seed for a device (CUDA draws what its backend takes: 16-bit inputs, the head
// dims of the build).
FuzzCase draw_case(uint64_t seed, Device device);

// --invalid: the case of a seed with one thing broken, chosen from the seed (a view's shape,
// ndim, stride, pointer, dtype or device, of an input, output, gradient or the spec's tensors; a
// scale, softcap, beta, kernel power, ReLA eps or bucket count out of range; an enum past its
// values; cu_seqlens out of order; a mask node's kind, child, side, grid dims, segment, globals
// or map index), through can_run, the backend and the oracle, forward then backward. It fails
// where a refusal names no rule, can_run and the call disagree, the backend accepts what the
// oracle refuses by a rule or what a rule forbids outright, or where both accept and their
// results differ (out within 10x the tolerance; dq, dk, dv 4x beyond each element's magnitude).
// A crash or a hang fails as ever.
struct InvalidOutcome {
  bool failed = false, refused = false;
  std::string what, detail;  // the change; the verdict
};
InvalidOutcome run_invalid_case(FuzzCase& c, uint64_t seed, Device device);
// The change run_invalid_case makes to the case of `seed`, in words.
std::string invalid_change(const FuzzCase& c, uint64_t seed);

// Runs the cases, prints a line for each failure or crash (seed, case, what missed by how much
// against which tolerance) and a summary line; returns 1 on any failure or crash, else 0.
int run_fuzz(const FuzzOptions& opt);

}  // namespace attnkit::tools
