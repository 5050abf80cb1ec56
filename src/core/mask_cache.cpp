// MaskCache's host side (the CUDA backend fills it: cuda/setup.cu).
#include "core/mask_cache.h"

#include <string>

namespace attnkit {

MaskCache::MaskCache() : impl_(std::make_unique<Impl>()) {}
MaskCache::~MaskCache() = default;
void MaskCache::clear() { impl_->clear(); }
int64_t MaskCache::entries() const { return static_cast<int64_t>(impl_->entries.size()); }
int64_t MaskCache::bytes() const {
  int64_t n = 0;
  for (const Impl::Entry& e : impl_->entries) n += e.bytes;
  return n;
}

namespace core {
namespace {

// Appends x and a separator (append, not a chain of operator+: g++ 12 warns on those).
void put(std::string* s, int64_t x, char sep = ',') {
  s->append(std::to_string(x));
  s->push_back(sep);
}

void add_view(std::string* s, const TensorView& t) {
  s->push_back('(');
  put(s, static_cast<int64_t>(reinterpret_cast<uintptr_t>(t.data)));
  put(s, static_cast<int64_t>(t.dtype));
  put(s, t.device_index);
  for (int i = 0; i < t.ndim; ++i) {
    put(s, t.shape[i], ':');
    put(s, t.strides[i]);
  }
  s->push_back(')');
}

}  // namespace

std::string mask_fingerprint(const AttentionSpec& spec) {
  const Mask& m = spec.mask;
  std::string s = "align";
  put(&s, static_cast<int64_t>(spec.alignment), '|');
  for (const MaskNode& n : m.nodes) {
    for (int64_t x : {static_cast<int64_t>(n.kind), n.a, n.b, int64_t{n.causal}, int64_t{n.ndim}})
      put(&s, x);
    for (int x = 0; x < kMaxGridDims; ++x)
      for (int64_t y : {n.shape[x], n.kernel[x], n.dilation[x], int64_t{n.dim_causal[x]}})
        put(&s, y);
    for (int32_t v :
         {n.globals_begin, n.globals_count, n.seg_q, n.seg_k, n.map, n.child0, n.child1})
      put(&s, v);
    s.push_back('|');
  }
  s.append("globals");
  for (int64_t g : m.globals) put(&s, g);
  s.append("|segments");
  for (const TensorView& t : m.segments) add_view(&s, t);
  s.append("|maps");
  for (const TensorView& t : m.block_maps) add_view(&s, t);
  return s;
}

}  // namespace core
}  // namespace attnkit
