// Host reads of small index tensors that may live on either device.
#include "core/device.h"

#include <cstring>

namespace attnkit::core {

Status read_int32(const TensorView& t, std::vector<int32_t>* out) {
  const int64_t rows = t.ndim == 2 ? t.shape[0] : 1, cols = t.shape[t.ndim - 1];
  const int64_t sr = t.ndim == 2 ? t.strides[0] : 0, sc = t.strides[t.ndim - 1];
  out->resize(rows * cols);
  const int32_t* src = static_cast<const int32_t*>(t.data);
  std::vector<int32_t> staged;
  if (t.device == Device::kCUDA) {
    // One copy of the whole strided extent, then a host gather.
    const int64_t extent = (rows - 1) * sr + (cols - 1) * sc + 1;
    staged.resize(extent);
    Status s = copy_device_to_host(staged.data(), src, extent * sizeof(int32_t), t.device_index);
    if (!s.ok()) return s;
    src = staged.data();
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) (*out)[r * cols + c] = src[r * sr + c * sc];
  return {};
}

}  // namespace attnkit::core
