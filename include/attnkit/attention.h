// The attnkit entry points.
//
//   Status s = attnkit::attention_forward(q, k, v, spec, out, lse);
//
// q [B, Hq, Nq, d], k [B, Hk, Nk, d], v [B, Hk, Nk, dv], out [B, Hq, Nq, dv] in BHND
// (BNHD: [B, N, H, D]; varlen with cu_seqlens: [total, H, D]). Any strides with a unit inner one.
// Varlen: cu_seqlens start at 0, never decrease, and may end before the packed tensors do; rows
// past the last sequence are padding: the forward leaves them unwritten (as FlashAttention does)
// and the backward writes zeros in their gradients (dq, dk, dv, dgate).
#pragma once
#include <cstdint>
#include <memory>

#include "attnkit/spec.h"
#include "attnkit/status.h"
#include "attnkit/tensor.h"

namespace attnkit {

inline constexpr int64_t kMaxHeadDim = 256;

// Attention statistics without materializing P (MECHANISMS.md 1.4), softmax family only.
// Each view is optional. row_max, entropy: fp32 [B, Hq, Nq]. col_mass: fp32 [B, Hq, Nk]
// (or [B, Hk, Nk] with col_mass_group_sum), summed over query rows [q_begin, q_end).
struct AttentionStats {
  TensorView row_max;
  TensorView entropy;
  TensorView col_mass;
  int64_t col_mass_q_begin = 0;
  int64_t col_mass_q_end = -1;  // -1: all rows
  bool col_mass_group_sum = false;
  bool any() const { return row_max.defined() || entropy.defined() || col_mass.defined(); }
};

// A mask's block tables for the CUDA kernels, built by the first call that uses the cache and
// reused by the calls after it, as FlexAttention's BlockMask or FlashInfer's plan are: which key
// tiles each query tile visits and the element bits of its partial tiles, one entry per tile
// shape and problem shape (the forward and the backward have their own; 16 at most, the oldest
// dropped first). Without a cache every
// CUDA call with a mask that is not a band builds them again. The caller promises that the
// mask's tensors (segment ids, block maps) and cu_seqlens keep their contents while the cache is
// used; a call with another mask (other nodes, parameters or tensors) is refused. The CPU backend
// ignores it. One cache serves one stream of calls at a time; destroy it before its CUDA context.
// Under CUDA graph capture it can only be read: build its tables before capturing, and keep it
// (without clear()) while the graph is replayed.
class MaskCache {
 public:
  MaskCache();
  ~MaskCache();
  MaskCache(const MaskCache&) = delete;
  MaskCache& operator=(const MaskCache&) = delete;
  void clear();             // frees the tables; the next call builds them again, for any mask
  int64_t entries() const;  // tables held
  int64_t bytes() const;    // device memory held
  struct Impl;
  Impl& impl() { return *impl_; }

 private:
  std::unique_ptr<Impl> impl_;
};

struct Options {
  int num_threads = 0;  // CPU: 0 uses every available thread
  bool deterministic = false;
  void* stream = nullptr;           // CUDA stream (cudaStream_t)
  MaskCache* mask_cache = nullptr;  // CUDA: the mask's tables kept across calls (above)
};

// The per-row value the backward pass needs (row_stat): fp32 [B, Hq, Nq] (varlen: [Hq, total_q]).
// Softmax family: LSE. Normalized kernel: log of the row sum (the LSE of the log weights
// p log f(s)). ReLA: the output RMS. Sigmoid: none.
Status attention_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                         const AttentionSpec& spec, const TensorView& out,
                         const TensorView& row_stat = {}, const AttentionStats& stats = {},
                         const Options& options = {});

// The same checks as attention_forward, without running: says why a call cannot run.
Status can_run(const TensorView& q, const TensorView& k, const TensorView& v,
               const AttentionSpec& spec, const TensorView& out, const TensorView& row_stat = {},
               const AttentionStats& stats = {}, const Options& options = {});

// Gradients of attention (the backward pass). dq, dk, dv are required and shaped like q, k, v
// (dk, dv summed over the query heads of a KV group); each other view is optional and shaped like
// the input it differentiates (dbias: like spec.mods.bias, summed over its broadcast dims;
// dbeta: [1] for the sigmoid normalizer's beta). Gradient dtypes: fp32 or fp64, and on CUDA
// dq, dk, dv and dbias also their inputs' 16-bit dtype. Gradient views must not overlap.
struct AttentionGrads {
  TensorView dq, dk, dv;
  TensorView dbias, dlow_rank_u, dlow_rank_w, drelative_table, dforget_log_f, dalibi_slopes;
  TensorView dsinks, dbeta, drela_gain, dgate;
};

// The backward pass: gradients of out (given grad_out) for q, k, v and the extras in `grads`.
// `out` and `row_stat` are the forward's: row_stat is required for the softmax family (LSE) and
// the normalized kernel (log row sum); sigmoid has none and ReLA recomputes what it needs (its RMS
// row_stat may be omitted). CPU backend: every tier-1 mechanism (masks, score mods, normalizers,
// gates), GQA/MQA, varlen, dv != d, both layouts, fp32/bf16/fp16 inputs; the attention
// statistics (row_max, entropy, col_mass) are outputs, not differentiated. Gradients are
// bit-identical for any thread count (Options::deterministic costs nothing).
Status attention_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                          const TensorView& out, const TensorView& row_stat,
                          const TensorView& grad_out, const AttentionSpec& spec,
                          const AttentionGrads& grads, const Options& options = {});

// The same checks as attention_backward, without running (kNotImplemented names what the
// backend does not differentiate yet).
Status can_run_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                        const TensorView& out, const TensorView& row_stat,
                        const TensorView& grad_out, const AttentionSpec& spec,
                        const AttentionGrads& grads, const Options& options = {});

// The float64 oracle of the backward pass (src/reference): recomputes the forward from q, k, v
// and returns every gradient asked for in `grads`, given grad_out (shaped like out).
Status reference_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                          const TensorView& grad_out, const AttentionSpec& spec,
                          const AttentionGrads& grads);

// The float64 oracle (src/reference): same contract, full N x N matrices, any dtype in,
// computes in float64. For tests and tools, never a fast path.
Status reference_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                         const AttentionSpec& spec, const TensorView& out,
                         const TensorView& row_stat = {}, const AttentionStats& stats = {});

}  // namespace attnkit
