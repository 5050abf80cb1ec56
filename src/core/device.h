// What the core needs of a GPU runtime: validation reads a few small index tensors (cu_seqlens,
// segment ids) that may live in device memory. The CUDA backend implements these when it is
// built (src/cuda/runtime.cu); otherwise src/core/no_cuda.cpp answers that there is no GPU.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "attnkit/status.h"
#include "attnkit/tensor.h"

namespace attnkit::core {

// Whether this build has the CUDA backend.
bool cuda_backend_built();

// Copies `bytes` from device memory of GPU `device` into host memory (synchronous).
Status copy_device_to_host(void* dst, const void* src, size_t bytes, int device);

// The int32 elements of a 1-D or 2-D view (any strides, either device), row-major, on the host.
Status read_int32(const TensorView& t, std::vector<int32_t>* out);

}  // namespace attnkit::core
