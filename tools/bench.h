// `attnkit bench`: timed forward runs, records as in the foundation issue.
#pragma once
#include <string>
#include <vector>

namespace attnkit::tools {
// `only`: keep just these mechanisms of the suite (empty: all).
int run_bench(const std::string& suite, const std::string& json_file, int threads_override,
              const std::vector<std::string>& only = {});
}  // namespace attnkit::tools
