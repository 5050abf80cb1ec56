// The kernels' synchronization patterns in isolation, for compute-sanitizer
// racecheck: (1) a shared-memory buffer handed between warp groups with named barriers
// (bar.arrive by the writers, bar.sync by the readers, and back); (2) a bulk copy into shared
// memory completing on an mbarrier, read by the threads that waited on it, then refilled after
// they arrive on an "empty" mbarrier; (3) the same ring where the readers also overwrite the
// stage before arriving on "empty" (the d128 backward writes its dQ tile into the stage whose
// Q/dO it has consumed); (4) a slot that one thread stores (st.shared) and hands over by an
// mbarrier arrive, its readers arriving on an "empty" mbarrier (the persistent forward's work
// item, fwd_kernel.cuh's sSched); (5) a buffer written by 128 threads and stored by one through
// the copy engine (the forward's O staging). All are the PTX producer/consumer forms; if
// racecheck reports hazards here, it reports them for the kernels too.
// Build and run: nvcc -arch=sm_90a -o /tmp/rp bench/gpu/racecheck_patterns.cu &&
//   compute-sanitizer --tool racecheck /tmp/rp
#include <cstdio>
#include <cstdint>

__device__ uint32_t smem_u32(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

__global__ void named_handoff(float* out, int iters) {
  __shared__ float buf[256];
  const int t = threadIdx.x;  // 0..63 writers (2 warps), 64..127 readers (2 warps)
  float acc = 0.f;
  for (int it = 0; it < iters; ++it) {
    if (t < 64) {
      if (it > 0) asm volatile("bar.sync 2, 128;" ::: "memory");  // buffer free
      buf[t] = it + t;
      buf[t + 64] = it - t;
      asm volatile("bar.arrive 1, 128;" ::: "memory");  // buffer ready
    } else {
      asm volatile("bar.sync 1, 128;" ::: "memory");
      acc += buf[t - 64] + buf[t];
      asm volatile("bar.arrive 2, 128;" ::: "memory");
    }
  }
  if (t < 64 && iters > 0) asm volatile("bar.sync 2, 128;" ::: "memory");
  out[t] = acc;
}

// Two full barriers (one arrival) and two empty ones (two reader warps), initialized by thread 0.
__device__ void init_ring(uint64_t (&full)[2], uint64_t (&empty)[2]) {
  if (threadIdx.x == 0)
    for (int s = 0; s < 2; ++s) {
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_u32(&full[s])));
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 2;" ::"r"(smem_u32(&empty[s])));
    }
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  __syncthreads();
}

__device__ void wait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  while (!done)
    asm volatile("{.reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p;}"
                 : "=r"(done) : "r"(smem_u32(bar)), "r"(parity) : "memory");
}

__global__ void bulk_ring(const float* src, float* out, int iters, bool reuse) {
  __shared__ alignas(128) float stage[2][64];
  __shared__ alignas(8) uint64_t full[2], empty[2];
  const int t = threadIdx.x;  // thread 0 of warp 0 copies; warps 1..2 read
  init_ring(full, empty);
  float acc = 0.f;
  for (int it = 0; it < iters; ++it) {
    const int s = it % 2;
    const uint32_t ph = (it / 2) & 1;
    if (t == 0) {
      wait(&empty[s], ph ^ 1);
      asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], 256;" ::"r"(smem_u32(&full[s])) : "memory");
      asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], 256, [%2];"
                   ::"r"(smem_u32(stage[s])), "l"(src + it * 64), "r"(smem_u32(&full[s])) : "memory");
    } else if (t >= 32) {
      wait(&full[s], ph);
      acc += stage[s][t - 32] + stage[s][t - 0 - 32 + 0];
      if (reuse) {  // the stage now holds this step's result (for a copy engine to read)
        stage[s][t - 32] = acc;
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
      }
      __syncwarp();
      if (t % 32 == 0) asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(&empty[s])) : "memory");
    }
  }
  out[t] = acc;
}

__global__ void thread_slot(int* out, int iters) {
  __shared__ int slot[2];
  __shared__ alignas(8) uint64_t full[2], empty[2];
  const int t = threadIdx.x;  // thread 0 writes; warps 1..2 read
  init_ring(full, empty);
  int acc = 0;
  for (int it = 0; it < iters; ++it) {
    const int s = it % 2;
    const uint32_t ph = (it / 2) & 1;
    if (t == 0) {
      wait(&empty[s], ph ^ 1);
      asm volatile("st.shared.s32 [%0], %1;" ::"r"(smem_u32(&slot[s])), "r"(it) : "memory");
      asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(&full[s])) : "memory");
    } else if (t >= 32) {
      wait(&full[s], ph);
      int v;
      asm volatile("ld.shared.s32 %0, [%1];" : "=r"(v) : "r"(smem_u32(&slot[s])) : "memory");
      acc += v;
      __syncwarp();
      if (t % 32 == 0) asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(&empty[s])) : "memory");
    }
  }
  if (t >= 32) out[t - 32] = acc;
}

// (5) The forward's O staging (FwdParams::tma_out): 128 threads write a buffer, fence it to the
// async proxy, meet at a named barrier; one thread stores it by the copy engine and, before the
// buffer's next use, waits for the store's read (wait_group.read), then the barrier again.
__global__ void store_staging(float* dst, int iters) {
  __shared__ alignas(128) float buf[128];
  const int t = threadIdx.x;  // 128 threads
  for (int it = 0; it < iters; ++it) {
    if (t == 0) asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
    asm volatile("bar.sync 3, 128;" ::: "memory");
    buf[t] = static_cast<float>(it * 128 + t);
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    asm volatile("bar.sync 3, 128;" ::: "memory");
    if (t == 0) {
      asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], 512;"
                   ::"l"(dst + it * 128), "r"(smem_u32(buf)) : "memory");
      asm volatile("cp.async.bulk.commit_group;" ::: "memory");
    }
  }
  if (t == 0) asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}

int main() {
  float *src, *out;
  cudaMalloc(&src, 64 * 64 * sizeof(float));
  cudaMalloc(&out, 128 * sizeof(float));
  cudaMemset(src, 0, 64 * 64 * sizeof(float));
  named_handoff<<<1, 128>>>(out, 8);
  bulk_ring<<<1, 96>>>(src, out, 16, false);
  bulk_ring<<<1, 96>>>(src, out, 16, true);
  int* sums;
  cudaMalloc(&sums, 64 * sizeof(int));
  thread_slot<<<1, 96>>>(sums, 16);
  int host[64];
  cudaMemcpy(host, sums, sizeof(host), cudaMemcpyDeviceToHost);
  bool right = true;
  for (int x : host) right = right && x == 16 * 15 / 2;  // every reader saw 0..15
  float* staged;
  cudaMalloc(&staged, 8 * 128 * sizeof(float));
  store_staging<<<1, 128>>>(staged, 8);
  static float back[8 * 128];
  cudaMemcpy(back, staged, sizeof(back), cudaMemcpyDeviceToHost);
  bool stored = true;
  for (int x = 0; x < 8 * 128; ++x) stored = stored && back[x] == static_cast<float>(x);
  const cudaError_t e = cudaDeviceSynchronize();
  std::printf("%s; thread_slot sums %s; staged stores %s\n", cudaGetErrorString(e),
              right ? "right" : "WRONG", stored ? "right" : "WRONG");
  return e != cudaSuccess || !right || !stored;
}
