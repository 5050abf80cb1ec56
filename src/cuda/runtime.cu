// The GPU hooks of src/core/device.h for a build with the CUDA backend.
#include <cuda_runtime.h>

#include <string>

#include "core/device.h"
#include "cuda/setup.h"

namespace attnkit::core {

bool cuda_backend_built() { return true; }

Status copy_device_to_host(void* dst, const void* src, size_t bytes, int device) {
  cudaError_t e = cudaSuccess;
  {
    cuda::DeviceScope scope(device);
    e = cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost);
  }
  if (e != cudaSuccess)
    return Status(StatusCode::kInvalidArgument,
                  std::string("reading an index tensor from the GPU failed: ") +
                      cudaGetErrorString(e));
  return {};
}

}  // namespace attnkit::core
