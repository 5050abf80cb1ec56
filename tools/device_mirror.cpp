// DeviceMirror over the CUDA runtime; without the CUDA backend every copy fails cleanly.
#include "device_mirror.h"

#if defined(ATTNKIT_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace attnkit::tools {

int64_t extent_bytes(const TensorView& t) {
  int64_t last = 0;
  for (int i = 0; i < t.ndim; ++i) last += (t.shape[i] - 1) * t.strides[i];
  return (last + 1) * dtype_size(t.dtype);
}

#if defined(ATTNKIT_WITH_CUDA)
bool cuda_device_available() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

DeviceMirror::~DeviceMirror() {
  for (void* p : buffers_) (void)cudaFree(p);
}

TensorView DeviceMirror::to_device(const TensorView& host, int64_t offset_bytes) {
  if (!host.defined() || host.device != Device::kCPU) return host;
  TensorView d = host;
  void* p = nullptr;
  const int64_t bytes = extent_bytes(host);
  if (cudaMalloc(&p, bytes + offset_bytes) != cudaSuccess) return TensorView{};
  buffers_.push_back(p);
  p = static_cast<char*>(p) + offset_bytes;
  (void)cudaMemcpy(p, host.data, bytes, cudaMemcpyHostToDevice);
  d.data = p;
  d.device = Device::kCUDA;
  d.device_index = 0;
  return d;
}

Status DeviceMirror::to_host(const TensorView& device, const TensorView& host) const {
  if (!device.defined()) return {};
  const cudaError_t e =
      cudaMemcpy(host.data, device.data, extent_bytes(host), cudaMemcpyDeviceToHost);
  if (e != cudaSuccess) return Status(StatusCode::kInternal, cudaGetErrorString(e));
  return {};
}

Status DeviceMirror::synchronize() {
  const cudaError_t e = cudaDeviceSynchronize();
  if (e != cudaSuccess) return Status(StatusCode::kInternal, cudaGetErrorString(e));
  return {};
}
#else
bool cuda_device_available() { return false; }
DeviceMirror::~DeviceMirror() = default;
TensorView DeviceMirror::to_device(const TensorView& host, int64_t) { return host; }
Status DeviceMirror::to_host(const TensorView&, const TensorView&) const {
  return Status(StatusCode::kTypeError, "this build has no CUDA backend");
}
Status DeviceMirror::synchronize() { return {}; }
#endif

void DeviceMirror::mirror_spec(AttentionSpec& s) {
  for (TensorView& t : s.mask.segments) t = to_device(t);
  for (TensorView& t : s.mask.block_maps) t = to_device(t);
  ScoreMods& m = s.mods;
  for (TensorView* t :
       {&m.alibi_slopes, &m.bias, &m.low_rank_u, &m.low_rank_w, &m.relative_table, &m.forget_log_f})
    *t = to_device(*t);
  s.normalizer.sinks = to_device(s.normalizer.sinks);
  s.normalizer.rela_gain = to_device(s.normalizer.rela_gain);
  s.gate = to_device(s.gate);
  s.cu_seqlens_q = to_device(s.cu_seqlens_q);
  s.cu_seqlens_kv = to_device(s.cu_seqlens_kv);
}

}  // namespace attnkit::tools
