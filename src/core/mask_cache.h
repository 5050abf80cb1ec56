// What a MaskCache (attention.h) holds: the fingerprint of the mask it serves and its entries,
// each a device allocation of one tile shape's and problem shape's block tables. The CUDA backend
// fills and reads them (cuda/setup.cu); entries free through the function it registers.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "attnkit/attention.h"

namespace attnkit {

struct MaskCache::Impl {
  struct Entry {
    std::string key;  // the backend's: tile shape, device, problem shape
    int device = 0;
    void* data = nullptr;  // one device allocation
    int64_t bytes = 0;
  };
  std::string mask_key;  // the mask of the first call (mask_fingerprint), empty when clear
  std::vector<Entry> entries;
  void (*free_entry)(const Entry&) = nullptr;  // set by the backend that made the entries

  ~Impl() { clear(); }
  void clear() {
    for (const Entry& e : entries)
      if (free_entry) free_entry(e);
    entries.clear();
    mask_key.clear();
  }
  Entry* find(const std::string& key) {
    for (Entry& e : entries)
      if (e.key == key) return &e;
    return nullptr;
  }
};

namespace core {

// Every field of the mask tree and of the data it refers to (tensor addresses, dtypes, shapes,
// strides) with the spec's alignment: equal strings for masks a cache may serve alike.
std::string mask_fingerprint(const AttentionSpec& spec);

}  // namespace core
}  // namespace attnkit
