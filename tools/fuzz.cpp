// run_fuzz() (fuzz.h): the cases of a campaign in child processes, judged by check_forward /
// check_backward.
//
// Process model: the parent forks a child for a batch of consecutive seeds (one seed on the CPU,
// where a fork costs less than a case; a batch on CUDA, where each child pays for a context,
// ended early by a failed case, whose fault may have lost the context).
// The child writes "start SEED DESCRIPTION" before a case and "done SEED OUTCOME DETAIL" after
// it through a pipe; a child that dies (a signal, or SIGALRM after kCaseSeconds) leaves its last
// started seed unfinished, and the parent reports that seed as crashed and goes on after it. The
// parent never touches the GPU: a CUDA context does not survive fork.
#include "fuzz.h"

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstring>

#include "device_mirror.h"

namespace attnkit::tools {
namespace {

// A case that runs longer than this is reported as hung (the largest draws take about a second).
constexpr unsigned kCaseSeconds = 120;

double seconds_now() {  // a clock that parent and children share (fork keeps it)
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// What a case came to, on one line.
struct Outcome {
  enum Kind { kRan, kRefused, kFailed } kind = kRan;
  std::string detail;
};

Outcome run_case(FuzzCase& c, uint64_t seed, const FuzzOptions& opt) {
  if (opt.invalid) {
    const InvalidOutcome v = run_invalid_case(c, seed, opt.device);
    const Outcome::Kind k = v.failed    ? Outcome::kFailed
                            : v.refused ? Outcome::kRefused
                                        : Outcome::kRan;
    return {k, v.detail};
  }
  const CheckResult f = check_forward(c.inst, c.check);
  if (f.refused) return {Outcome::kRefused, "forward refused: " + f.error};
  if (!f.ok) return {Outcome::kFailed, "forward: " + f.error};
  if (opt.forward_only) return {Outcome::kRan, "forward " + f.judged};
  const CheckResult b = check_backward(c.inst, c.check);
  if (b.refused) return {Outcome::kRefused, "backward refused: " + b.error};
  if (!b.ok) return {Outcome::kFailed, "backward: " + b.error};
  return {Outcome::kRan, "forward " + f.judged + "; backward " + b.judged};
}

std::string one_line(std::string s) {
  std::replace(s.begin(), s.end(), '\n', ' ');
  return s;
}

// The child: cases [first, end) until the deadline, a line before and after each.
[[noreturn]] void run_child(int fd, uint64_t first, uint64_t end, double deadline,
                            const FuzzOptions& opt) {
  FILE* out = fdopen(fd, "w");
  if (opt.device == Device::kCUDA && !cuda_device_available()) {
    std::fprintf(out, "nodevice\n");
    std::fflush(out);
    _exit(0);
  }
  for (uint64_t seed = first; seed < end && seconds_now() < deadline; ++seed) {
    FuzzCase c = draw_case(seed, opt.device);
    if (opt.invalid) c.description += " | broken: " + invalid_change(c, seed);
    std::fprintf(out, "start %llu %s\n", static_cast<unsigned long long>(seed),
                 one_line(c.description).c_str());
    std::fflush(out);
    alarm(kCaseSeconds);
    const Outcome o = run_case(c, seed, opt);
    alarm(0);
    std::fprintf(out, "done %llu %d %s\n", static_cast<unsigned long long>(seed),
                 static_cast<int>(o.kind), one_line(o.detail).c_str());
    std::fflush(out);
    // A kernel's fault leaves the context unusable: the cases after a failure get a new child.
    if (opt.device == Device::kCUDA && o.kind == Outcome::kFailed) break;
  }
  _exit(0);
}

// What the parent knows of a campaign: the counts, and the case a child has open.
struct Tally {
  int64_t cases = 0, ran = 0, refused = 0, failed = 0, crashed = 0;
  uint64_t last_done = 0, open_seed = 0;
  bool open = false;
  std::string open_what;

  // A child's "start SEED DESCRIPTION" or "done SEED OUTCOME DETAIL" line.
  void take(const std::string& l, bool verbose) {
    const bool starts = l.rfind("start ", 0) == 0;
    char* rest = nullptr;
    const uint64_t seed = std::strtoull(l.c_str() + (starts ? 6 : 5), &rest, 10);
    std::string text = rest && *rest ? rest + 1 : "";
    if (starts) {
      open = true;
      open_seed = seed;
      open_what = text;
      return;
    }
    open = false;
    last_done = seed;
    ++cases;
    const int kind = text.empty() ? Outcome::kFailed : text[0] - '0';
    text = text.size() > 2 ? text.substr(2) : "";
    ran += kind == Outcome::kRan;
    refused += kind == Outcome::kRefused;
    failed += kind == Outcome::kFailed;
    if (kind == Outcome::kFailed || verbose)
      std::printf("%s seed=%llu %s | %s\n",
                  kind == Outcome::kFailed ? "FAIL"
                  : kind == Outcome::kRan  ? "ok"
                                           : "refused",
                  static_cast<unsigned long long>(seed), open_what.c_str(), text.c_str());
  }

  // The child died (wait status): in its open case, or drawing the one after its last.
  void crash(int status) {
    if (!open) {
      open_seed = last_done + 1;
      open_what = "(while drawing the case)";
    }
    const int sig = WIFSIGNALED(status) ? WTERMSIG(status) : 0;
    const std::string why = sig == SIGALRM
                                ? "hung: no result after " + std::to_string(kCaseSeconds) + " s"
                            : sig ? std::string("signal ") + strsignal(sig)
                                  : "exit status " + std::to_string(WEXITSTATUS(status));
    std::printf("CRASH seed=%llu %s | %s\n", static_cast<unsigned long long>(open_seed),
                open_what.c_str(), why.c_str());
    ++cases;
    ++crashed;
    last_done = open_seed;
    open = false;
  }
};

}  // namespace

int run_fuzz(const FuzzOptions& opt) {
  const double start = seconds_now();
  const double deadline = opt.seconds > 0 ? start + opt.seconds : INFINITY;
  const uint64_t end =
      opt.seed + std::min(static_cast<uint64_t>(std::max<int64_t>(opt.cases, 0)), ~opt.seed);
  const uint64_t batch = opt.device == Device::kCUDA ? 64 : 1;
  Tally t;
  std::fflush(stdout);
  for (uint64_t next = opt.seed; next < end && seconds_now() < deadline;) {
    int fds[2];
    if (pipe(fds) != 0) {
      std::perror("fuzz: pipe");
      return 1;
    }
    const pid_t pid = fork();
    if (pid < 0) {
      std::perror("fuzz: fork");
      return 1;
    }
    if (pid == 0) {
      close(fds[0]);
      run_child(fds[1], next, std::min(end, next + batch), deadline, opt);
    }
    close(fds[1]);
    FILE* in = fdopen(fds[0], "r");
    t.last_done = next - 1;
    char* line = nullptr;
    size_t cap = 0;
    bool no_device = false;
    for (ssize_t n; (n = getline(&line, &cap, in)) > 0;) {
      const std::string l(line, line[n - 1] == '\n' ? n - 1 : n);
      no_device = no_device || l == "nodevice";
      if (!no_device) t.take(l, opt.verbose);
      std::fflush(stdout);
    }
    free(line);
    fclose(in);
    int status = 0;
    waitpid(pid, &status, 0);
    if (no_device) {
      std::printf("fuzz: no CUDA device (or a build without the CUDA backend)\n");
      return 1;
    }
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) t.crash(status);
    std::fflush(stdout);
    if (t.last_done + 1 == next) break;  // the deadline came before the child's first case
    next = t.last_done + 1;
  }
  std::printf(
      "fuzz %s%s: %lld cases (seeds %llu..%llu) in %.1f s: %lld ran, %lld refused, %lld failed, "
      "%lld crashed\n",
      opt.device == Device::kCUDA ? "cuda" : "cpu", opt.invalid ? " --invalid" : "",
      static_cast<long long>(t.cases), static_cast<unsigned long long>(opt.seed),
      static_cast<unsigned long long>(opt.seed + std::max<int64_t>(t.cases, 1) - 1),
      seconds_now() - start, static_cast<long long>(t.ran), static_cast<long long>(t.refused),
      static_cast<long long>(t.failed), static_cast<long long>(t.crashed));
  if (t.failed + t.crashed > 0)
    std::printf("one case again: attnkit fuzz --seed SEED --cases 1 --verbose%s%s%s\n",
                opt.device == Device::kCUDA ? " --device cuda" : "",
                opt.forward_only ? " --forward-only" : "", opt.invalid ? " --invalid" : "");
  return t.failed + t.crashed > 0 ? 1 : 0;
}

}  // namespace attnkit::tools
