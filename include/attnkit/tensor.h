// TensorView: a non-owning view of a strided tensor (pointer, dtype, device, shape, strides).
// Strides count elements, not bytes. attnkit never takes ownership of the memory it is given.
#pragma once
#include <cstdint>
#include <initializer_list>

namespace attnkit {

enum class DType : uint8_t { kF32, kBF16, kF16, kF64, kI32 };
enum class Device : uint8_t { kCPU, kCUDA };

inline constexpr int kMaxTensorDims = 4;

const char* dtype_name(DType t);
int dtype_size(DType t);

// data is aligned to the element's size, as every PyTorch tensor's: a call refuses a view that
// is not.
struct TensorView {
  void* data = nullptr;
  DType dtype = DType::kF32;
  Device device = Device::kCPU;
  int device_index = 0;
  int ndim = 0;
  int64_t shape[kMaxTensorDims] = {0, 0, 0, 0};
  int64_t strides[kMaxTensorDims] = {0, 0, 0, 0};

  bool defined() const { return ndim > 0; }
  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= shape[i];
    return ndim > 0 ? n : 0;
  }
  // A contiguous (row-major) view of `shape`.
  static TensorView contiguous(void* data, DType dtype, std::initializer_list<int64_t> shape,
                               Device device = Device::kCPU) {
    TensorView t;
    t.data = data;
    t.dtype = dtype;
    t.device = device;
    t.ndim = static_cast<int>(shape.size());
    int i = 0;
    for (int64_t s : shape) t.shape[i++] = s;
    int64_t stride = 1;
    for (int j = t.ndim - 1; j >= 0; --j) {
      t.strides[j] = stride;
      stride *= t.shape[j];
    }
    return t;
  }
};

}  // namespace attnkit
