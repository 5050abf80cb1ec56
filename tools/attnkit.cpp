// The attnkit CLI: list (support matrix), run (one mechanism and shape), check (oracle sweep),
// fuzz (random cases against the oracle), bench (timed suites).
#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <limits>

#include "attnkit/registry.h"
#include "bench.h"
#include "core/block_mask.h"
#include "fuzz.h"
#include "spec_json.h"

namespace attnkit::tools {
int run_check(bool as_json, int threads, const std::string& device);
}

using namespace attnkit;
using namespace attnkit::tools;

static int cmd_list(bool as_json) {
  const std::vector<SupportRow> rows = support_matrix();
  if (as_json) {
    json arr = json::array();
    for (const SupportRow& r : rows)
      arr.push_back({{"mechanism", r.mechanism},
                     {"category", r.category},
                     {"backend", r.backend},
                     {"forward", r.forward},
                     {"backward", r.backward},
                     {"dtypes", r.dtypes}});
    std::printf("%s\n", json{{"cpu_simd_target", cpu_simd_target()},
                             {"cpu_bf16_dot", cpu_bf16_dot()},
                             {"cuda_build", cuda_build_info()},
                             {"rows", arr}}
                            .dump(1)
                            .c_str());
    return 0;
  }
  std::printf("CPU SIMD target on this machine: %s; bf16 dot products: %s\n",
              cpu_simd_target().c_str(), cpu_bf16_dot() ? "yes" : "no");
  if (!cuda_build_info().empty())
    std::printf("CUDA kernels in this build: %s\n", cuda_build_info().c_str());
  std::printf("%-18s %-11s %-10s %-4s %-4s %s\n", "mechanism", "category", "backend", "fwd", "bwd",
              "dtypes");
  for (const SupportRow& r : rows) {
    std::string dt;
    for (const std::string& d : r.dtypes) dt += (dt.empty() ? "" : ",") + d;
    std::printf("%-18s %-11s %-10s %-4s %-4s %s\n", r.mechanism.c_str(), r.category.c_str(),
                r.backend.c_str(), r.forward ? "yes" : "-", r.backward ? "yes" : "-", dt.c_str());
  }
  return 0;
}

int main(int argc, char** argv) {
  CLI::App app{"attnkit: attention mechanisms on CPUs and NVIDIA Hopper GPUs"};
  app.require_subcommand(1);
  bool as_json = false;

  auto* list =
      app.add_subcommand("list", "the support matrix: mechanism x backend x pass x dtypes");
  list->add_flag("--json", as_json, "print JSON");

  auto* run = app.add_subcommand("run", "run one mechanism at one shape; time, GFLOP/s, error");
  std::string mech = "dense", dtype_s = "fp32";
  Dims dims{1, 8, 8, 1024, 1024, 128, 128};
  int threads = 0, reps = 5;
  bool no_check = false, bnhd = false;
  run->add_option("-m,--mechanism", mech, "mechanism name (see `attnkit run --mechanisms`)");
  run->add_option("--dtype", dtype_s, "fp32, bf16 or fp16");
  run->add_option("--b", dims.batch, "batch");
  run->add_option("--hq", dims.hq, "num_heads_q");
  run->add_option("--hk", dims.hk, "num_heads_kv");
  run->add_option("--nq", dims.nq, "seqlen_q");
  run->add_option("--nk", dims.nk, "seqlen_kv");
  run->add_option("--d", dims.d, "head_dim");
  run->add_option("--dv", dims.dv, "head_dim_v");
  run->add_option("--threads", threads, "threads (0: all)");
  run->add_option("--reps", reps, "timed repetitions (median)");
  run->add_flag("--no-check", no_check, "skip the comparison with the float64 oracle");
  run->add_flag("--bnhd", bnhd, "BNHD layout");
  bool backward = false;
  run->add_flag(
      "--backward", backward,
      "time the backward pass with every gradient (GFLOP/s count 2.5x the forward FLOPs)");
  run->add_flag("--json", as_json, "print JSON");
  bool list_mechs = false;
  run->add_flag("--mechanisms", list_mechs, "list the mechanism names and exit");

  auto* check =
      app.add_subcommand("check", "every mechanism against the float64 oracle; exit 1 on failure");
  check->add_flag("--json", as_json, "print JSON");
  check->add_option("--threads", threads, "threads (0: all)");
  std::string check_device = "cpu";
  check->add_option("--device", check_device, "cpu, or cuda (the GPU forward; inputs copied there)")
      ->check(CLI::IsMember({"cpu", "cuda"}));

  auto* fuzz = app.add_subcommand(
      "fuzz", "random cases against the float64 oracle, each from its seed; exit 1 on failure");
  FuzzOptions fuzz_opt;
  std::string fuzz_device = "cpu";
  fuzz->add_option("--seed", fuzz_opt.seed, "the first case's seed");
  auto* fuzz_cases = fuzz->add_option("--cases", fuzz_opt.cases,
                                      "how many cases at most (default 1000, none with --seconds)");
  fuzz->add_option("--seconds", fuzz_opt.seconds, "stop after this long (whichever comes first)");
  fuzz->add_option("--device", fuzz_device, "cpu, or cuda (inputs copied to the GPU)")
      ->check(CLI::IsMember({"cpu", "cuda"}));
  fuzz->add_flag("--forward-only", fuzz_opt.forward_only, "no backward pass");
  fuzz->add_flag("--verbose", fuzz_opt.verbose, "a line for every case");
  fuzz->add_flag("--invalid", fuzz_opt.invalid,
                 "each case with one thing broken: refused by a rule, or run right");

  auto* bench =
      app.add_subcommand("bench", "timed suites (quick: < 1 minute; full: the headline shapes)");
  std::string suite = "quick", json_file;
  bench->add_option("--suite", suite, "quick or full");
  bench->add_option("--json", json_file, "write the records to this file");
  bench->add_option("--threads", threads, "override the thread count");
  std::vector<std::string> only;
  bench->add_option("--only", only, "only these mechanisms of the suite")->delimiter(',');

  CLI11_PARSE(app, argc, argv);

  if (*list) return cmd_list(as_json);
  if (*check) return run_check(as_json, threads, check_device);
  if (*bench) return run_bench(suite, json_file, threads, only);
  if (*fuzz) {
    fuzz_opt.device = fuzz_device == "cuda" ? Device::kCUDA : Device::kCPU;
    if (fuzz_opt.seconds > 0 && fuzz_cases->count() == 0)
      fuzz_opt.cases = std::numeric_limits<int64_t>::max();
    return run_fuzz(fuzz_opt);
  }
  if (*run) {
    if (list_mechs) {
      for (const std::string& m : mechanism_names()) std::printf("%s\n", m.c_str());
      return 0;
    }
    bool ok = false;
    CheckOptions opt;
    opt.dtype = parse_dtype(dtype_s, &ok);
    if (!ok) {
      std::fprintf(stderr, "--dtype %s: must be fp32, bf16 or fp16\n", dtype_s.c_str());
      return 2;
    }
    opt.dims = dims;
    opt.threads = threads;
    opt.bnhd = bnhd;
    Instance inst;
    const std::string err = make_instance(mech, opt, inst);
    if (!err.empty()) {
      std::fprintf(stderr, "%s\n", err.c_str());
      return 2;
    }
    Outputs o = make_outputs(inst, false);
    if (bnhd) o.out = OwnedTensor::zeros(opt.dtype, {dims.batch, dims.nq, dims.hq, dims.dv});
    Options op;
    op.num_threads = threads;
    // For --backward: the forward's out and LSE once, then the backward is timed.
    auto like = [](const OwnedTensor& x) {
      return OwnedTensor::zeros(DType::kF32,
                                std::vector<int64_t>(x.view.shape, x.view.shape + x.view.ndim));
    };
    OwnedTensor go, dq, dk, dv;
    AttentionGrads grads;
    std::vector<OwnedTensor> extra;  // every learnable extra's gradient, as a trainer asks for
    if (backward) {
      Status s = attention_forward(inst.q.view, inst.k.view, inst.v.view, inst.spec, o.out.view,
                                   o.row_stat.view, {}, op);
      if (!s.ok()) {
        std::fprintf(stderr, "error (%s): %s\n", status_code_name(s.code()), s.message().c_str());
        return 1;
      }
      go = random_tensor(opt.dtype, std::vector<int64_t>(o.out.view.shape, o.out.view.shape + 4),
                         1.0, 5);
      dq = like(inst.q);
      dk = like(inst.k);
      dv = like(inst.v);
      grads = {dq.view, dk.view, dv.view};
      const std::vector<ExtraGrad> extras = extra_grads(inst.spec);
      extra.reserve(extras.size());
      for (const ExtraGrad& e : extras) {
        extra.push_back(OwnedTensor::zeros(DType::kF32, e.shape));
        grads.*e.member = extra.back().view;
      }
    }
    std::vector<double> t;
    for (int r = 0; r <= reps; ++r) {
      const auto t0 = std::chrono::steady_clock::now();
      Status s = backward ? attention_backward(inst.q.view, inst.k.view, inst.v.view, o.out.view,
                                               o.row_stat.view, go.view, inst.spec, grads, op)
                          : attention_forward(inst.q.view, inst.k.view, inst.v.view, inst.spec,
                                              o.out.view, o.row_stat.view, {}, op);
      if (!s.ok()) {
        std::fprintf(stderr, "error (%s): %s\n", status_code_name(s.code()), s.message().c_str());
        return 1;
      }
      if (r > 0)
        t.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0)
                        .count());
    }
    std::sort(t.begin(), t.end());
    const double ms = t[t.size() / 2];
    core::Problem p;
    (void)core::validate_and_resolve(inst.q.view, inst.k.view, inst.v.view, inst.spec, o.out.view,
                                     {}, {}, {}, false, &p)
        .ok();
    const int64_t pairs = core::allowed_pairs(p);
    const double gflops =
        (backward ? 2.5 : 1.0) * 2.0 * pairs * double(dims.d + dims.dv) / (ms * 1e6);
    double rel = -1;
    if (!no_check)
      rel = backward ? check_backward(mech, opt).rel_err : check_mechanism(mech, opt).rel_err;
    if (as_json) {
      std::printf("%s\n", json{{"mechanism", mech},
                               {"dtype", dtype_s},
                               {"b", dims.batch},
                               {"hq", dims.hq},
                               {"hk", dims.hk},
                               {"nq", dims.nq},
                               {"nk", dims.nk},
                               {"d", dims.d},
                               {"dv", dims.dv},
                               {"threads", threads},
                               {"ms", ms},
                               {"gflops", gflops},
                               {"allowed_pairs", pairs},
                               {"rel_err", rel}}
                              .dump()
                              .c_str());
    } else {
      std::printf("%s %s %s b=%ld hq=%ld hk=%ld nq=%ld nk=%ld d=%ld dv=%ld: %.3f ms, %.1f GFLOP/s",
                  mech.c_str(), backward ? "bwd" : "fwd", dtype_s.c_str(), long(dims.batch),
                  long(dims.hq), long(dims.hk), long(dims.nq), long(dims.nk), long(dims.d),
                  long(dims.dv), ms, gflops);
      if (rel >= 0) std::printf(", rel_err %.2e", rel);
      std::printf("\n");
    }
    return 0;
  }
  return 0;
}
