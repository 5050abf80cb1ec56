// `attnkit check`: every mechanism x dtype against the float64 oracle on random small shapes.
#include <cstdio>
#include <string>

#include "spec_json.h"

namespace attnkit::tools {

int run_check(bool as_json, int threads) {
  const Dims shapes[] = {
      {2, 4, 2, 97, 97, 40, 40}, {1, 2, 1, 33, 70, 64, 48}, {1, 3, 3, 64, 64, 72, 72}};
  json results = json::array();
  int failures = 0, total = 0, not_covered = 0;
  // Forward, then backward (the mechanisms the CPU backward does not differentiate yet answer
  // kNotImplemented: counted as not covered, never as passed).
  for (const bool backward : {false, true})
    for (const std::string& m : mechanism_names())
      for (DType t : {DType::kF32, DType::kBF16, DType::kF16})
        for (const Dims& d : shapes) {
          if (mechanism_spec(m, d).is_null()) continue;
          CheckOptions opt;
          opt.dtype = t;
          opt.dims = d;
          opt.threads = threads;
          opt.seed = 7 + total;
          const CheckResult r = backward ? check_backward(m, opt) : check_mechanism(m, opt);
          if (r.not_covered) {
            ++not_covered;
            continue;
          }
          ++total;
          failures += !r.ok;
          const char* pass = backward ? "bwd" : "fwd";
          if (as_json) {
            results.push_back({{"mechanism", m},
                               {"pass", pass},
                               {"dtype", r.dtype},
                               {"ok", r.ok},
                               {"rel_err", r.rel_err},
                               {"tol", r.tol},
                               {"stat_err", r.stat_err},
                               {"nq", d.nq},
                               {"nk", d.nk},
                               {"d", d.d},
                               {"dv", d.dv},
                               {"hq", d.hq},
                               {"hk", d.hk},
                               {"error", r.error}});
          } else if (!r.ok) {
            std::printf("FAIL %s %-22s %-5s nq=%ld nk=%ld d=%ld: %s\n", pass, m.c_str(),
                        r.dtype.c_str(), long(d.nq), long(d.nk), long(d.d), r.error.c_str());
          }
        }
  if (as_json) {
    std::printf("%s\n", json{{"passed", total - failures},
                             {"failed", failures},
                             {"backward_not_implemented", not_covered},
                             {"results", results}}
                            .dump(1)
                            .c_str());
  } else {
    std::printf("(the cpu backward does not cover %d of the cases yet)\n", not_covered);
    std::printf("%d passed, %d failed\n", total - failures, failures);
  }
  return failures ? 1 : 0;
}

}  // namespace attnkit::tools
