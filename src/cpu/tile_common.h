// Shared, target-independent pieces of the CPU kernels: tile size, dtype row conversion,
// per-thread workspaces.
#pragma once
#include <hwy/aligned_allocator.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "attnkit/spec.h"
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

// Runs run(b0, b1) over chunks of whole batch elements [b0, b1), as many per chunk as fit the
// packing budget (at least one), with `packed` set to the workspace of `slot` and `unit_begin`
// to the first packed unit of the chunk. False when the workspace cannot be allocated.
template <class F>
bool for_each_packed_chunk(int64_t batch, int64_t units_per_batch, int64_t unit_floats, int slot,
                           float*& packed, int64_t& unit_begin, F&& run) {
  const int64_t batch_bytes = units_per_batch * unit_floats * int64_t{sizeof(float)};
  const int64_t per_chunk =
      std::max<int64_t>(1, kPackBudgetBytes / std::max<int64_t>(1, batch_bytes));
  // At least one float: no key tile anywhere (packed sequences all without keys) packs nothing.
  packed = thread_workspace(
      slot, std::max<int64_t>(1, std::min(per_chunk, batch) * units_per_batch * unit_floats));
  if (!packed) return false;
  for (int64_t b0 = 0; b0 < batch; b0 += per_chunk) {
    unit_begin = b0 * units_per_batch;
    run(b0, std::min(batch, b0 + per_chunk));
  }
  return true;
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

constexpr bool is_softmax_family(NormalizerKind k) {
  return k == NormalizerKind::kSoftmax || k == NormalizerKind::kSoftmaxSink;
}

// The runtime-to-compile-time dispatch of the CPU kernels (forward and backward): normalizer x
// (score mods present); f(integral_constant<NormalizerKind>, bool_constant). The instantiation
// table is src/cpu/registry.cc.
template <class F>
void dispatch(NormalizerKind norm, bool mods, F&& f) {
  auto with_mods = [&](auto kn) {
    if (mods)
      f(kn, std::true_type{});
    else
      f(kn, std::false_type{});
  };
  switch (norm) {
    case NormalizerKind::kSoftmax:
      with_mods(std::integral_constant<NormalizerKind, NormalizerKind::kSoftmax>{});
      break;
    case NormalizerKind::kSoftmaxSink:
      with_mods(std::integral_constant<NormalizerKind, NormalizerKind::kSoftmaxSink>{});
      break;
    case NormalizerKind::kSigmoid:
      with_mods(std::integral_constant<NormalizerKind, NormalizerKind::kSigmoid>{});
      break;
    case NormalizerKind::kKernel:
      with_mods(std::integral_constant<NormalizerKind, NormalizerKind::kKernel>{});
      break;
    case NormalizerKind::kReLA:
      with_mods(std::integral_constant<NormalizerKind, NormalizerKind::kReLA>{});
      break;
  }
}

}  // namespace attnkit::cpu
