// sm_90a building blocks of the CUDA kernels: shared-memory tiles in the 128-byte swizzled layout
// that wgmma reads (the layout TMA writes with CU_TENSOR_MAP_SWIZZLE_128B), their descriptors, the
// warpgroup MMA fences, mbarriers, TMA copies, register reallocation and named barriers.
//
// A tile of R rows x C columns of 16-bit elements is stored as C/64 panels of R rows x 128 bytes;
// within a panel the 16-byte chunk c of row r sits at r * 128 + ((c ^ (r % 8)) * 16). Each panel
// starts on a 1024-byte boundary. For wgmma this is the canonical 128B-swizzle layout: K-major
// (rows = M or N, columns = K) with SBO = 1024 bytes between 8-row groups, and MN-major (rows =
// K, columns = N) with LBO = the panel stride between 64-column groups.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#ifdef ATTNKIT_DEBUG_MBAR_TIMEOUT
#include <cstdio>
#endif

#include "cuda/wgmma_ops.cuh"

namespace attnkit::cuda {

#ifdef ATTNKIT_DEBUG_MBAR_TIMEOUT
// Set by the first mbar_wait that times out; from then on every wait of the module (this
// process's) returns at once.
static __device__ int debug_mbar_abort = 0;
#endif

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// A shared-memory matrix descriptor for the 128B-swizzled layout.
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr, uint32_t lbo_bytes,
                                              uint32_t sbo_bytes) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) |
         (static_cast<uint64_t>((lbo_bytes >> 4) & 0x3FFF) << 16) |
         (static_cast<uint64_t>((sbo_bytes >> 4) & 0x3FFF) << 32) | (uint64_t{1} << 62);
}

// A descriptor moved by `bytes` within shared memory: the start address (bits 0-13, in 16-byte
// units) grows; addresses stay below 256 KiB, so the low word takes no carry out of its field
// (one add, where smem_desc of the moved address costs four).
__device__ __forceinline__ uint64_t desc_add(uint64_t desc, uint32_t bytes) {
  const uint32_t lo = static_cast<uint32_t>(desc) + (bytes >> 4);
  return (desc & 0xFFFFFFFF00000000ull) | lo;
}

// D (+)= A B^T over kK columns, A and B K-major in the 128B-swizzled layout: 64-column panels
// (128 bytes a row) of kRowsA rows (A, from descriptor a0) and kRowsB rows (B, from b0). The
// first k-step overwrites D. Issue between wgmma_fence() and wgmma_commit().
template <int kN, class Tag, int kK, int kRowsA, int kRowsB>
__device__ __forceinline__ void wgmma_ss_panels(float (&d)[kN / 2], uint64_t a0, uint64_t b0) {
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk)
    Wgmma<kN, Tag>::ss(d, desc_add(a0, (kk / 4) * (kRowsA * 128) + (kk % 4) * 32),
                       desc_add(b0, (kk / 4) * (kRowsB * 128) + (kk % 4) * 32), kk > 0);
}

__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accesses of accumulator registers across the async MMA.
template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

template <int N>
__device__ __forceinline__ void fence_regs_u(uint32_t (&r)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int x = 0; x < 4; ++x) asm volatile("" : "+r"(r[i][x])::"memory");
}

// mbarriers (shared::cta, 8 bytes each): the copy engine completes transactions on them, warps
// arrive on them, and waiters spin on a phase's parity.
__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Makes the initialized barriers visible to the copy engine (then a CTA barrier).
__device__ __forceinline__ void mbar_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Waits until the phase of parity `parity` has completed (a fresh barrier counts parity 1 as done).
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
#ifdef ATTNKIT_DEBUG_MBAR_TIMEOUT  // a hang's diagnosis: which barrier, parity and thread
  const long long t0 = clock64();
#endif
  do {
#ifdef ATTNKIT_DEBUG_MBAR_TIMEOUT
    // Past about 2 s: named, then every wait of the module gives up, so that the kernel ends
    // (with wrong values) and the host's synchronization prints what was named (a trap would
    // lose it).
    if (*static_cast<volatile int*>(&debug_mbar_abort)) return;
    if (clock64() - t0 > (1ll << 32)) {
      if (threadIdx.x % 32 == 0)
        printf("mbar_wait stuck: block (%d,%d,%d) warp %d bar %% 1024 = %u parity %u\n",
               blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x / 32, bar % 1024, parity);
      atomicExch(&debug_mbar_abort, 1);
      return;
    }
#endif
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}

// A 4-D tile of a tensor map (coordinates innermost first) into shared memory, completing on `bar`.
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const void* map, uint32_t bar, int c0,
                                            int c1, int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
      : "memory");
}
// The same for a 5-D tensor map (the grid tiles of a 2-D neighborhood: column, grid column,
// grid row, head, batch).
__device__ __forceinline__ void tma_load_5d(uint32_t dst, const void* map, uint32_t bar, int c0,
                                            int c1, int c2, int c3, int c4) {
  asm volatile(
      "cp.async.bulk.tensor.5d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4, %5, %6}], [%7];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(c4), "r"(bar)
      : "memory");
}
// A 4-D tile from shared memory into a tensor map's tensor (the part inside its extents), in
// this thread's bulk group (see bulk_reduce_add_f32).
__device__ __forceinline__ void tma_store_4d(const void* map, uint32_t src, int c0, int c1, int c2,
                                             int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.global.shared::cta.tile.bulk_group [%0, {%1, %2, %3, %4}], [%5];\n" ::"l"(
          reinterpret_cast<uint64_t>(map)),
      "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(src)
      : "memory");
}
// Four 8 x 8 matrices of 16-bit elements into shared memory: thread t gives row t % 8 of matrix
// t / 8 its address, and v[i] holds its pair of matrix i (row t / 4, columns 2 (t % 4) + {0, 1},
// the layout of an accumulator's 8-column chunk).
__device__ __forceinline__ void stmatrix_x4(uint32_t addr, const uint32_t (&v)[4]) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr),
               "r"(v[0]), "r"(v[1]), "r"(v[2]), "r"(v[3])
               : "memory");
}
// A contiguous copy of `bytes` (a multiple of 16, 16-byte aligned ends) into shared memory,
// completing on `bar`.
__device__ __forceinline__ void bulk_load(uint32_t dst, const void* src, uint32_t bytes,
                                          uint32_t bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(src)), "r"(bytes), "r"(bar)
      : "memory");
}
// dst[0, bytes) += the fp32 elements at shared src, by the copy engine (16-byte aligned ends, a
// multiple of 16 bytes), in this thread's bulk group: bulk_commit() closes the group,
// bulk_wait_read<N>() waits until at most N groups still read shared memory, bulk_wait<N>()
// until their writes are done.
__device__ __forceinline__ void bulk_reduce_add_f32(float* dst, uint32_t src, uint32_t bytes) {
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(
                   dst),
               "r"(src), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void bulk_commit() {
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
}
template <int N>
__device__ __forceinline__ void bulk_wait() {
  asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(N) : "memory");
}
// Orders this thread's copy-engine accesses of global memory with its generic ones: completed
// reduce-adds (bulk_wait) before a release that hands them to another CTA, or an acquire before
// the copy engine reads what other CTAs added.
__device__ __forceinline__ void fence_proxy_async_global() {
  asm volatile("fence.proxy.async.global;\n" ::: "memory");
}
// Makes this thread's generic writes of shared memory visible to the copy engine (before a
// bulk or tensor store reads them).
__device__ __forceinline__ void fence_proxy_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// A 4-D tile of a tensor map into L2 only (no shared memory, no barrier): a later load of it
// then hits L2.
__device__ __forceinline__ void tma_prefetch_l2_4d(const void* map, int c0, int c1, int c2,
                                                   int c3) {
  asm volatile("cp.async.bulk.prefetch.tensor.4d.L2.global.tile [%0, {%1, %2, %3, %4}];\n" ::"l"(
                   reinterpret_cast<uint64_t>(map)),
               "r"(c0), "r"(c1), "r"(c2), "r"(c3)
               : "memory");
}
__device__ __forceinline__ void tma_prefetch_l2_5d(const void* map, int c0, int c1, int c2, int c3,
                                                   int c4) {
  asm volatile(
      "cp.async.bulk.prefetch.tensor.5d.L2.global.tile [%0, {%1, %2, %3, %4, %5}];\n" ::"l"(
          reinterpret_cast<uint64_t>(map)),
      "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(c4)
      : "memory");
}
__device__ __forceinline__ void tma_prefetch_map(const void* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// Register budget of a warpgroup (sm_90a; the kernel needs a register cap at entry).
template <int N>
__device__ __forceinline__ void regs_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void regs_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}

// Named barriers (id 0 is __syncthreads): `threads` counts the arrivals of a phase.
__device__ __forceinline__ void named_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// The 16-bit element types and their packing.
template <class T>
struct ElemTraits;
template <>
struct ElemTraits<__nv_bfloat16> {
  using Tag = Elem_bf16;
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ float to_float(unsigned short bits) {
    return __bfloat162float(__ushort_as_bfloat16(bits));
  }
};
template <>
struct ElemTraits<__half> {
  using Tag = Elem_f16;
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ float to_float(unsigned short bits) {
    return __half2float(__ushort_as_half(bits));
  }
};

// A warpgroup's 64 accumulator rows of kCols columns (row r of the thread's two times mul[r]),
// in T, into 64-column panels of 64 rows x 128 bytes at buf + panel * 8192 whose 16-byte chunks
// are swizzled by row % 8 (a tensor map's 128-byte swizzle): four 8 x 8 matrices an stmatrix.
template <class T, int kCols>
__device__ __forceinline__ void stage_rows(uint32_t buf, const float (&acc)[kCols / 2],
                                           const float (&mul)[2], int warp, int lane) {
  static_assert(kCols % 64 == 0, "whole 64-column panels");
#pragma unroll
  for (int c = 0; c < kCols / 8; c += 2) {
    uint32_t v[4];
#pragma unroll
    for (int x = 0; x < 4; ++x) {
      const int r = x & 1, cc = c + x / 2;
      v[x] = ElemTraits<T>::pack(acc[cc * 4 + 2 * r] * mul[r], acc[cc * 4 + 2 * r + 1] * mul[r]);
    }
    // Row mr of matrix x: + 8 (x & 1), chunk c + x / 2 (c is even: both in panel c / 8).
    const int mr = lane % 8, x = lane / 8;
    stmatrix_x4(buf + (c / 8) * 8192 + (warp * 16 + mr + 8 * (x & 1)) * 128 +
                    ((((c % 8) + x / 2) ^ mr) * 16),
                v);
  }
}

}  // namespace attnkit::cuda
