// Device copies of host tensors for the CLI and tests (a build with the CUDA backend): a
// mirror owns its GPU buffers and keeps every copy's strides, so a spec's views can be swapped
// for device views one by one.
#pragma once
#include <vector>

#include "attnkit/attention.h"

namespace attnkit::tools {

// The bytes from a view's first element to the end of its last (non-negative strides).
int64_t extent_bytes(const TensorView& t);

// Whether a CUDA device is present (false in a build without the CUDA backend).
bool cuda_device_available();

class DeviceMirror {
 public:
  DeviceMirror() = default;
  DeviceMirror(const DeviceMirror&) = delete;
  DeviceMirror& operator=(const DeviceMirror&) = delete;
  ~DeviceMirror();
  // A device copy of `host` (undefined views stay undefined), starting offset_bytes into its
  // buffer (a misaligned copy for the kernels' unaligned paths).
  TensorView to_device(const TensorView& host, int64_t offset_bytes = 0);
  // Copies a device view made by to_device() back into its host original.
  Status to_host(const TensorView& device, const TensorView& host) const;
  // Every tensor the spec refers to, swapped for a device copy.
  void mirror_spec(AttentionSpec& spec);
  // Waits for the device's work; reports a kernel's asynchronous error.
  static Status synchronize();

 private:
  std::vector<void*> buffers_;
};

}  // namespace attnkit::tools
