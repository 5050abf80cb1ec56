// `attnkit bench`: timed forward runs, records as in the foundation issue.
#pragma once
#include <string>

namespace attnkit::tools {
int run_bench(const std::string& suite, const std::string& json_file, int threads_override);
}
