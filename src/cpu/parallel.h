// parallel_for(n, threads, [&](task, worker)): OpenMP behind one helper, dynamic scheduling;
// `worker` indexes per-thread scratch.
#pragma once
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>

namespace attnkit::cpu {

inline int resolve_threads(int requested) {
  return requested > 0 ? requested : omp_get_max_threads();
}

// An exception may not leave an OpenMP region (the program would end: a std::bad_alloc of the
// oracle's per-head matrices, say): the first is kept, the tasks not yet begun are skipped, and
// it is thrown again after the region. No more threads start than there are tasks.
template <class F>
void parallel_for(int64_t n, int threads, F&& f) {
  if (threads <= 1 || n <= 1) {
    for (int64_t t = 0; t < n; ++t) f(t, 0);
    return;
  }
  const int team = static_cast<int>(std::min<int64_t>(threads, n));
  std::exception_ptr error;
  std::atomic<bool> failed{false};
#pragma omp parallel for schedule(dynamic, 1) num_threads(team)
  for (int64_t t = 0; t < n; ++t) {
    if (failed.load(std::memory_order_relaxed)) continue;
    try {
      f(t, omp_get_thread_num());
    } catch (...) {
#pragma omp critical(attnkit_parallel_for_error)
      if (!error) error = std::current_exception();
      failed.store(true, std::memory_order_relaxed);
    }
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace attnkit::cpu
