// parallel_for(n, threads, [&](task, worker)): OpenMP behind one helper, dynamic scheduling;
// `worker` indexes per-thread scratch.
#pragma once
#include <omp.h>

#include <cstdint>

namespace attnkit::cpu {

inline int resolve_threads(int requested) {
  return requested > 0 ? requested : omp_get_max_threads();
}

template <class F>
void parallel_for(int64_t n, int threads, F&& f) {
  if (threads <= 1 || n <= 1) {
    for (int64_t t = 0; t < n; ++t) f(t, 0);
    return;
  }
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t t = 0; t < n; ++t) f(t, omp_get_thread_num());
}

}  // namespace attnkit::cpu
