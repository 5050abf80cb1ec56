// `attnkit check`: every mechanism x dtype against the float64 oracle on random small shapes.
#include <cstdio>
#include <string>

#include "device_mirror.h"
#include "spec_json.h"

namespace attnkit::tools {

int run_check(bool as_json, int threads, const std::string& device) {
  const bool cuda = device == "cuda";
  if (cuda && !cuda_device_available()) {
    std::printf("no CUDA device (or a build without the CUDA backend)\n");
    return 1;
  }
  const std::vector<Dims> shapes =
      cuda ? std::vector<Dims>{{2, 4, 2, 197, 197, 64, 64},
                               {1, 2, 1, 77, 301, 128, 128},
                               {1, 3, 3, 300, 130, 64, 64}}
           : std::vector<Dims>{
                 {2, 4, 2, 97, 97, 40, 40}, {1, 2, 1, 33, 70, 64, 48}, {1, 3, 3, 64, 64, 72, 72}};
  const std::vector<DType> dtypes =
      cuda ? std::vector<DType>{DType::kBF16, DType::kF16}
           : std::vector<DType>{DType::kF32, DType::kBF16, DType::kF16};
  json results = json::array();
  int failures = 0, total = 0, not_covered = 0;
  // Forward, then backward (the mechanisms the CPU backward does not differentiate yet answer
  // kNotImplemented: counted as not covered, never as passed).
  for (const bool backward : {false, true})
    for (const std::string& m : mechanism_names())
      for (DType t : dtypes)
        for (const Dims& d : shapes) {
          if (mechanism_spec(m, d).is_null()) continue;
          CheckOptions opt;
          opt.dtype = t;
          opt.dims = d;
          opt.threads = threads;
          opt.seed = 7 + total;
          opt.device = cuda ? Device::kCUDA : Device::kCPU;
          const CheckResult r = backward ? check_backward(m, opt) : check_mechanism(m, opt);
          if (r.not_covered) {
            ++not_covered;
            if (!as_json && t == dtypes[0] && &d == &shapes[0])
              std::printf("not covered: %s (%s)\n", m.c_str(), r.error.c_str());
            continue;
          }
          ++total;
          failures += !r.ok;
          if (!r.extras_not_covered.empty() && !as_json && t == dtypes[0] && &d == &shapes[0]) {
            std::string names;
            for (const std::string& x : r.extras_not_covered) names += " " + x;
            std::printf("checked without%s (not computed by the %s backend yet): %s\n",
                        names.c_str(), device.c_str(), m.c_str());
          }
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
                               {"extras_not_covered", r.extras_not_covered},
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
    std::printf("(the %s backend does not cover %d of the cases yet)\n", device.c_str(),
                not_covered);
    std::printf("%d passed, %d failed\n", total - failures, failures);
  }
  return failures ? 1 : 0;
}

}  // namespace attnkit::tools
