// Shared, target-independent pieces of the CPU kernels: tile size, dtype row conversion,
// per-thread workspaces.
#pragma once
#include <hwy/aligned_allocator.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "core/block_mask.h"
#include "core/convert.h"

namespace attnkit::cpu {

constexpr int64_t kTile = core::kTileTokens;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Packed K/V are built for at most this many bytes of units at a time.
constexpr int64_t kPackBudgetBytes = int64_t{256} << 20;

// A workspace of the calling thread, one per slot (0: forward packing, 1: backward packing),
// kept between calls (at most the packing budget, 256 MiB, per slot and calling thread), so
// repeated calls do not fault in fresh pages.
inline float* thread_workspace(int slot, int64_t floats) {
  static thread_local hwy::AlignedFreeUniquePtr<float[]> buf[2];
  static thread_local int64_t size[2] = {0, 0};
  if (floats > size[slot]) {
    buf[slot] = hwy::AllocateAligned<float>(floats);
    size[slot] = buf[slot] ? floats : 0;
  }
  return buf[slot].get();
}

// Converts n elements of a row to fp32, times mul.
inline void load_row(const void* src, DType t, int64_t n, float mul, float* dst) {
  switch (t) {
    case DType::kF32: {
      const float* s = static_cast<const float*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = s[i] * mul;
      break;
    }
    case DType::kBF16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = core::bf16_to_float(s[i]) * mul;
      break;
    }
    case DType::kF16: {
      const _Float16* s = static_cast<const _Float16*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(s[i]) * mul;
      break;
    }
    default:
      for (int64_t i = 0; i < n; ++i)
        dst[i] = static_cast<float>(core::load_as_double(src, t, i)) * mul;
  }
}
inline void store_row(const float* src, int64_t n, DType t, void* dst) {
  switch (t) {
    case DType::kF32:
      std::memcpy(dst, src, n * sizeof(float));
      break;
    case DType::kBF16: {
      uint16_t* d = static_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) d[i] = core::float_to_bf16(src[i]);
      break;
    }
    case DType::kF16: {
      _Float16* d = static_cast<_Float16*>(dst);
      for (int64_t i = 0; i < n; ++i) d[i] = static_cast<_Float16>(src[i]);
      break;
    }
    default:
      for (int64_t i = 0; i < n; ++i) core::store_from_double(dst, t, i, src[i]);
  }
}

}  // namespace attnkit::cpu
