// The support matrix: the tier-1 mechanisms and which backend runs them. The CPU instantiation
// table of the forward kernel is normalizer x {plain, with score mods} (src/cpu/forward.cc);
// masks are run-time data (BlockMask + bits), so every mask runs on every instantiation.
#include "attnkit/registry.h"

#include <string>

#include "cpu/forward.h"
#include "cpu/tile_ops_avx512.h"
#if defined(ATTNKIT_WITH_CUDA)
#include "cuda/forward.h"
#endif

namespace attnkit {

namespace {
struct Mech {
  const char* name;
  const char* category;
  bool cpu_backward;  // src/cpu/backward.cc (row_stats and col_mass: not differentiated)
};
constexpr Mech kTier1[] = {
    {"dense", "mask", true},
    {"causal", "mask", true},
    {"sliding_window", "mask", true},
    {"global_window", "mask", true},
    {"chunked", "mask", true},
    {"document", "mask", true},
    {"block_attention", "mask", true},
    {"prefix_lm", "mask", true},
    {"neighborhood", "mask", true},
    {"maxvit_block", "mask", true},
    {"maxvit_grid", "mask", true},
    {"and", "mask", true},
    {"or", "mask", true},
    {"not", "mask", true},
    {"scale", "score_mod", true},
    {"softcap", "score_mod", true},
    {"alibi", "score_mod", true},
    {"bias", "score_mod", true},
    {"low_rank_bias", "score_mod", true},
    {"relative_buckets", "score_mod", true},
    {"forget_gate", "score_mod", true},
    {"softmax", "normalizer", true},
    {"sink", "normalizer", true},
    {"sigmoid", "normalizer", true},
    {"kernel", "normalizer", true},
    {"rela", "normalizer", true},
    {"lse", "epilogue", true},
    {"gate", "epilogue", true},
    {"row_stats", "epilogue", true},
    {"col_mass", "epilogue", true},
    {"gqa", "layout", true},
    {"bnhd", "layout", true},
    {"varlen", "layout", true},
    {"dv_ne_d", "layout", true},
    {"block_sparse", "sparse", true},
    {"block_map", "sparse", true},
};
}  // namespace

std::vector<SupportRow> support_matrix() {
  std::vector<SupportRow> rows;
  for (const Mech& m : kTier1) {
    // The oracle computes every mask densely (no block-sparse execution), forward and backward.
    if (std::string(m.name) != "block_sparse")
      rows.push_back(
          {m.name, m.category, "reference", true, true, {"fp32", "bf16", "fp16", "fp64"}});
    rows.push_back({m.name, m.category, "cpu", true, m.cpu_backward, {"fp32", "bf16", "fp16"}});
#if defined(ATTNKIT_WITH_CUDA)
    // The CUDA forward (src/cuda): every tier-1 mechanism, the attention statistics included
    // (stats.cu). The backward: the same, with every extra's gradient, for every built head dim
    // up to ATTNKIT_BWD_MAX_HEAD_DIM (256 by default). Head dims: cuda::built_head_dims().
    rows.push_back({m.name, m.category, "cuda", true, true, cuda::built_dtypes()});
#endif
  }
  return rows;
}

std::string cpu_simd_target() { return cpu::simd_target(); }

bool cpu_bf16_dot() { return cpu::bf16_dot_enabled(); }

std::string cuda_build_info() {
#if defined(ATTNKIT_WITH_CUDA)
  std::string s = "sm_90a; ";
  for (const std::string& t : cuda::built_dtypes()) s += t + ", ";
  s.replace(s.size() - 2, 2, "; head dims ");
  for (const auto& [d, dv] : cuda::built_head_dims())
    s += (d == dv ? std::to_string(d) : std::to_string(d) + "x" + std::to_string(dv)) + ", ";
  return s.substr(0, s.size() - 2);
#else
  return "";
#endif
}

}  // namespace attnkit
