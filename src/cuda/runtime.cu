// The GPU hooks of src/core/device.h for a build with the CUDA backend.
#include <cuda_runtime.h>

#include <string>

#include "core/device.h"

namespace attnkit::core {

bool cuda_backend_built() { return true; }

Status copy_device_to_host(void* dst, const void* src, size_t bytes, int device) {
  int previous = 0;
  (void)cudaGetDevice(&previous);
  if (previous != device) (void)cudaSetDevice(device);
  const cudaError_t e = cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost);
  if (previous != device) (void)cudaSetDevice(previous);
  if (e != cudaSuccess)
    return Status(StatusCode::kInvalidArgument,
                  std::string("reading an index tensor from the GPU failed: ") +
                      cudaGetErrorString(e));
  return {};
}

}  // namespace attnkit::core
