// `attnkit bench --suite quick|full [--json FILE]`.
// quick: every tier-1 mechanism at a small shape (b 1, 4 query / 2 kv heads, N 512, d 64), fp32
//        and bf16, with the error against the float64 oracle at the same shape (under a minute).
// full:  the headline shapes (b 1, 8 heads, d 128, N 4096; 2 and 1 threads): dense,
//        causal, sliding_window (1024, causal), neighborhood_2d (64 x 64, 13 x 13), document
//        (4 equal, causal); error measured on the same mechanism at N 1024 (err_n).
// Each record also carries the square 4096 OpenBLAS sgemm rate with the same thread count.
// Cases of one thread count and the sgemm are timed round-robin (one run each per round; quick
// 9 rounds, full 5) and reported as medians, so ratios hold on a shared, noisy machine.
#include "bench.h"

#if defined(ATTNKIT_HAVE_BLAS)
#include <cblas.h>
#endif

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <memory>
#include <vector>

#include "core/block_mask.h"
#include "core/problem.h"
#include "spec_json.h"

extern "C" void openblas_set_num_threads(int);

namespace attnkit::tools {
namespace {

double now_ms() {
  return std::chrono::duration<double, std::milli>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Square 4096 sgemm rate of `reps` timed runs (median); the matrices persist across calls.
// 0 in a build without OpenBLAS (a GPU host without Debian's packages).
double sgemm_gflops(int threads, int reps) {
#if !defined(ATTNKIT_HAVE_BLAS)
  return 0 * threads * reps;
#else
  const int n = 4096;
  static std::vector<float> a, b, c;
  if (a.empty()) {
    a.resize(size_t(n) * n);
    b.resize(size_t(n) * n);
    c.resize(size_t(n) * n);
    for (size_t i = 0; i < a.size(); ++i) {
      a[i] = static_cast<float>((i * 2654435761u) % 1000) * 1e-3f - 0.5f;
      b[i] = static_cast<float>((i * 40503u) % 1000) * 1e-3f - 0.5f;
    }
  }
  openblas_set_num_threads(threads);
  std::vector<double> t;
  for (int rep = 0; rep < reps; ++rep) {
    const double t0 = now_ms();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.f, a.data(), n, b.data(), n,
                0.f, c.data(), n);
    t.push_back(now_ms() - t0);
  }
  return 2.0 * n * n * double(n) / (median(t) * 1e6);
#endif
}

struct Record {
  std::string mechanism, dtype;
  Dims d;
  int threads = 1;
  double density = 0, ms = 0, gflops = 0, rel_err = 0, sgemm = 0;
  int64_t err_n = 0;
  bool bwd = false;
};

// Allowed pairs of the instance (exact, from its BlockMasks), over all batch elements and heads.
int64_t allowed_pairs(const Instance& inst) {
  Outputs o = make_outputs(inst, false);
  core::Problem p;
  if (!core::validate_and_resolve(inst.q.view, inst.k.view, inst.v.view, inst.spec, o.out.view, {},
                                  {}, {}, false, &p)
           .ok())
    return 0;
  return core::allowed_pairs(p);
}

// One benchmark case with its inputs, timed in rounds with the others of its thread count.
struct Case {
  std::string mech;
  DType dtype = DType::kF32;
  Dims dims;
  int threads = 1;
  int64_t err_n = 0;
  bool bwd = false;  // the backward pass (the forward's out and LSE made once in prepare)
  Instance inst;
  Outputs out;
  OwnedTensor grad_out, dq, dk, dv;
  std::vector<double> t;
};

bool prepare(Case& c) {
  CheckOptions opt;
  opt.dtype = c.dtype;
  opt.dims = c.dims;
  opt.threads = c.threads;
  if (!make_instance(c.mech, opt, c.inst).empty()) return false;
  c.out = make_outputs(c.inst, false);
  if (c.bwd) {
    Options op;
    op.num_threads = c.threads;
    if (!attention_forward(c.inst.q.view, c.inst.k.view, c.inst.v.view, c.inst.spec, c.out.out.view,
                           c.out.row_stat.view, {}, op)
             .ok())
      return false;
    const Dims& d = c.dims;
    c.grad_out = random_tensor(c.dtype, {d.batch, d.hq, d.nq, d.dv}, 1.0, 5);
    c.dq = OwnedTensor::zeros(DType::kF32, {d.batch, d.hq, d.nq, d.d});
    c.dk = OwnedTensor::zeros(DType::kF32, {d.batch, d.hk, d.nk, d.d});
    c.dv = OwnedTensor::zeros(DType::kF32, {d.batch, d.hk, d.nk, d.dv});
  }
  return true;
}

bool run_once(Case& c) {
  Options op;
  op.num_threads = c.threads;
  const double t0 = now_ms();
  Status s = c.bwd ? attention_backward(c.inst.q.view, c.inst.k.view, c.inst.v.view, c.out.out.view,
                                        c.out.row_stat.view, c.grad_out.view, c.inst.spec,
                                        {c.dq.view, c.dk.view, c.dv.view}, op)
                   : attention_forward(c.inst.q.view, c.inst.k.view, c.inst.v.view, c.inst.spec,
                                       c.out.out.view, c.out.row_stat.view, {}, op);
  c.t.push_back(now_ms() - t0);
  if (!s.ok()) std::fprintf(stderr, "%s: %s\n", c.mech.c_str(), s.message().c_str());
  return s.ok();
}

Record finish(Case& c, double sgemm) {
  Record r;
  const int64_t pairs = allowed_pairs(c.inst);
  r.mechanism = c.mech;
  r.dtype = dtype_name(c.dtype);
  r.d = c.dims;
  r.threads = c.threads;
  r.ms = median(c.t);
  r.density = double(pairs) / double(c.dims.batch * c.dims.hq * c.dims.nq * c.dims.nk);
  // Backward records count 2.5x the forward FLOPs of the allowed pairs (the convention).
  r.gflops = (c.bwd ? 2.5 : 1.0) * 2.0 * pairs * double(c.dims.d + c.dims.dv) / (r.ms * 1e6);
  r.bwd = c.bwd;
  r.sgemm = sgemm;
  // Error against the oracle at the same shape, or at N = err_n (2 heads) for large shapes.
  CheckOptions eo;
  eo.dtype = c.dtype;
  eo.dims = c.dims;
  eo.threads = c.threads;
  if (c.err_n > 0 && c.err_n < c.dims.nk) {
    eo.dims.nq = eo.dims.nk = c.err_n;
    eo.dims.hq = std::min<int64_t>(eo.dims.hq, 2);
    eo.dims.hk = std::min<int64_t>(eo.dims.hk, eo.dims.hq);
  }
  eo.stats = false;
  r.rel_err = c.bwd ? check_backward(c.mech, eo).rel_err : check_mechanism(c.mech, eo).rel_err;
  r.err_n = eo.dims.nk;
  return r;
}

}  // namespace

int run_bench(const std::string& suite, const std::string& json_file, int threads_override,
              const std::vector<std::string>& only) {
  std::vector<Record> records;
  std::vector<std::tuple<std::string, DType, Dims, int, int64_t, bool>> plan;  // ..., bwd
  if (suite == "quick") {
    const int threads = threads_override > 0 ? threads_override : 2;
    const Dims dims{1, 4, 2, 512, 512, 64, 64};
    for (DType t : {DType::kF32, DType::kBF16})
      for (const std::string& m : mechanism_names())
        plan.emplace_back(m, t, dims, threads, 0, false);
    for (DType t : {DType::kF32, DType::kBF16})
      for (const char* m :
           {"dense", "causal", "sliding_window", "neighborhood_2d", "document", "sink"})
        plan.emplace_back(m, t, dims, threads, 0, true);
  } else if (suite == "full") {
    const Dims dims{1, 8, 8, 4096, 4096, 128, 128};
    std::vector<int> thread_counts = {2, 1};
    if (threads_override > 0) thread_counts = {threads_override};
    for (int th : thread_counts)
      for (DType t : {DType::kF32, DType::kBF16})
        for (bool bwd : {false, true})
          for (const char* m : {"dense", "causal", "sliding_window", "neighborhood_2d", "document"})
            plan.emplace_back(m, t, dims, th, 1024, bwd);
  } else {
    std::fprintf(stderr, "unknown suite '%s' (quick or full)\n", suite.c_str());
    return 2;
  }
  if (!only.empty())
    std::erase_if(plan, [&](const auto& e) {
      return std::find(only.begin(), only.end(), std::get<0>(e)) == only.end();
    });
  // Cases of one thread count are timed round-robin, the square sgemm among them: one run of
  // each per round, medians over the rounds, so every ratio comes from the same conditions.
  const int rounds = suite == "quick" ? 9 : 5;
  std::vector<std::pair<int, double>> sgemm;
  std::printf("%-22s %-4s %-5s %3s %5s %5s %4s %4s %3s %7s %9s %8s %9s %6s\n", "mechanism", "pass",
              "dtype", "hq", "nq", "nk", "d", "dv", "thr", "density", "ms", "GFLOP/s", "rel_err",
              "sgemm%");
  std::vector<int> thread_counts;
  for (auto& [m, t, dims, th, err_n, bwd] : plan)
    if (std::find(thread_counts.begin(), thread_counts.end(), th) == thread_counts.end())
      thread_counts.push_back(th);
  for (int th : thread_counts) {
    std::vector<std::unique_ptr<Case>> cases;
    for (auto& [m, t, dims, cth, err_n, bwd] : plan) {
      if (cth != th) continue;
      auto c = std::make_unique<Case>();
      c->mech = m;
      c->dtype = t;
      c->dims = dims;
      c->threads = th;
      c->err_n = err_n;
      c->bwd = bwd;
      if (prepare(*c) && run_once(*c)) {  // the first run warms caches and pages
        c->t.clear();
        cases.push_back(std::move(c));
      }
    }
    std::vector<double> sg;
    for (int round = 0; round < rounds; ++round) {
      std::fprintf(stderr, "[%d threads: round %d/%d]\r", th, round + 1, rounds);
      if (suite == "full" || round < 3) sg.push_back(sgemm_gflops(th, 1));
      for (auto& c : cases) run_once(*c);
    }
    const double sgemm_rate = median(sg);
    sgemm.emplace_back(th, sgemm_rate);
    for (auto& c : cases) {
      const Record r = finish(*c, sgemm_rate);
      std::printf("%-22s %-4s %-5s %3ld %5ld %5ld %4ld %4ld %3d %7.4f %9.3f %8.1f %9.2e %5.0f%%\n",
                  r.mechanism.c_str(), r.bwd ? "bwd" : "fwd", r.dtype.c_str(), long(r.d.hq),
                  long(r.d.nq), long(r.d.nk), long(r.d.d), long(r.d.dv), th, r.density, r.ms,
                  r.gflops, r.rel_err, 100.0 * r.gflops / r.sgemm);
      std::fflush(stdout);
      records.push_back(r);
    }
  }
  for (auto& [th, g] : sgemm)
    std::printf("OpenBLAS sgemm 4096^3, %d thread(s): %.1f GFLOP/s\n", th, g);
  if (!json_file.empty()) {
    json arr = json::array();
    for (const Record& r : records)
      arr.push_back({{"mechanism", r.mechanism},
                     {"backend", "cpu"},
                     {"dtype", r.dtype},
                     {"pass", r.bwd ? "bwd" : "fwd"},
                     {"b", r.d.batch},
                     {"hq", r.d.hq},
                     {"hk", r.d.hk},
                     {"nq", r.d.nq},
                     {"nk", r.d.nk},
                     {"d", r.d.d},
                     {"dv", r.d.dv},
                     {"threads", r.threads},
                     {"density", r.density},
                     {"ms", r.ms},
                     {"gflops", r.gflops},
                     {"rel_err", r.rel_err},
                     {"err_n", r.err_n},
                     {"sgemm_gflops", r.sgemm}});
    std::ofstream(json_file) << arr.dump(1) << "\n";
  }
  return 0;
}

}  // namespace attnkit::tools
