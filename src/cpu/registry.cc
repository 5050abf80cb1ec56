// The support matrix: the tier-1 mechanisms and which backend runs them. The CPU instantiation
// table of the forward kernel is normalizer x {plain, with score mods} (src/cpu/forward.cc);
// masks are run-time data (BlockMask + bits), so every mask runs on every instantiation.
#include "attnkit/registry.h"

#include <string>

#include "cpu/forward.h"

namespace attnkit {

namespace {
struct Mech {
  const char* name;
  const char* category;
};
constexpr Mech kTier1[] = {
    {"dense", "mask"},
    {"causal", "mask"},
    {"sliding_window", "mask"},
    {"global_window", "mask"},
    {"chunked", "mask"},
    {"document", "mask"},
    {"block_attention", "mask"},
    {"prefix_lm", "mask"},
    {"neighborhood", "mask"},
    {"maxvit_block", "mask"},
    {"maxvit_grid", "mask"},
    {"and", "mask"},
    {"or", "mask"},
    {"not", "mask"},
    {"scale", "score_mod"},
    {"softcap", "score_mod"},
    {"alibi", "score_mod"},
    {"bias", "score_mod"},
    {"low_rank_bias", "score_mod"},
    {"relative_buckets", "score_mod"},
    {"forget_gate", "score_mod"},
    {"softmax", "normalizer"},
    {"sink", "normalizer"},
    {"sigmoid", "normalizer"},
    {"kernel", "normalizer"},
    {"rela", "normalizer"},
    {"lse", "epilogue"},
    {"gate", "epilogue"},
    {"row_stats", "epilogue"},
    {"col_mass", "epilogue"},
    {"gqa", "layout"},
    {"bnhd", "layout"},
    {"varlen", "layout"},
    {"dv_ne_d", "layout"},
    {"block_sparse", "sparse"},
};
}  // namespace

std::vector<SupportRow> support_matrix() {
  std::vector<SupportRow> rows;
  for (const Mech& m : kTier1) {
    // The oracle computes every mask densely (no block-sparse execution), forward and backward.
    if (std::string(m.category) != "sparse")
      rows.push_back(
          {m.name, m.category, "reference", true, true, {"fp32", "bf16", "fp16", "fp64"}});
    rows.push_back({m.name, m.category, "cpu", true, false, {"fp32", "bf16", "fp16"}});
  }
  return rows;
}

std::string cpu_simd_target() { return cpu::simd_target(); }

}  // namespace attnkit
