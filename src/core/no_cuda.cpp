// The GPU hooks of src/core/device.h in a build without the CUDA backend.
#include "core/device.h"

namespace attnkit::core {

bool cuda_backend_built() { return false; }

Status copy_device_to_host(void*, const void*, size_t, int) {
  return Status(StatusCode::kTypeError,
                "a tensor is on a CUDA device: this build has only the CPU backend");
}

}  // namespace attnkit::core
