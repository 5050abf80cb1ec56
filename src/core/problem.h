// A validated attention call, resolved to what every backend needs: per-sequence extents,
// row addressing of each operand (layout and varlen live here, not in the variants), and the
// mask's data per batch element. Built once by validate_and_resolve().
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "attnkit/attention.h"
#include "attnkit/variant/masks.h"

namespace attnkit::core {

// Rows of a [B, H, N, D]-like operand: row (b, h, n) starts at data + b*sb + h*sh + n*sn elements.
struct RowOperand {
  char* data = nullptr;
  DType dtype = DType::kF32;
  int64_t sb = 0, sh = 0, sn = 0;
  bool defined() const { return data != nullptr; }
  void* row(int64_t b, int64_t h, int64_t n) const {
    return data + (b * sb + h * sh + n * sn) * dtype_size(dtype);
  }
};

// A per-row fp32 value [B, H, N] (varlen [H, total]).
struct StatOperand {
  float* data = nullptr;
  int64_t sb = 0, sh = 0, sn = 0;
  bool defined() const { return data != nullptr; }
  float& at(int64_t b, int64_t h, int64_t n) const { return data[b * sb + h * sh + n * sn]; }
};

// One packed sequence (or one batch element): rows q_start.. of q, k_start.. of k.
struct Sequence {
  int64_t q_start = 0, nq = 0, k_start = 0, nk = 0;
  int64_t offset = 0;  // aligned query index i' = i + offset
};

struct Problem {
  int64_t batch = 0, hq = 0, hk = 0, d = 0, dv = 0, group = 1;
  int64_t max_nq = 0, max_nk = 0;
  bool varlen = false;
  std::vector<Sequence> seqs;  // one per batch element
  // gate: elementwise, addressed like out; per head, one element per row (row(b, h, n) is it)
  RowOperand q, k, v, out, gate;
  StatOperand row_stat, row_max, entropy, col_mass;
  int64_t col_q_begin = 0, col_q_end = 0;
  bool col_group_sum = false;
  float scale = 1.f;
  double scale64 = 1.0;  // the same scale in float64 (the default 1/sqrt(d) is not a float)
  const AttentionSpec* spec = nullptr;
  int num_threads = 1;
  Device device = Device::kCPU;  // where every tensor lives (q's device)
  int device_index = 0;
  void* stream = nullptr;           // CUDA: the stream to run on
  MaskCache* mask_cache = nullptr;  // CUDA: Options::mask_cache
  // Internal (the CPU backward's recompute for ReLA): out receives O before ReLA's RMS
  // normalization and before the gate.
  bool raw_output = false;

  // Mask data: SegmentIds for each batch element (batch x mask.segments.size()).
  std::vector<SegmentIds> segment_ids;
  bool mask_per_batch = false;  // the mask reads per-batch data (segment ids of shape [B, N])
  // Block maps for each (batch element, query head): (b * hq + h) x mask.block_maps.size().
  std::vector<BlockMapView> block_maps;
  bool mask_per_head = false;  // the mask reads per-head data (a block map with Hq > 1)
  MaskEval mask_eval(int64_t b, int64_t h) const {
    MaskEval e;
    e.nodes = spec->mask.nodes.data();
    e.globals = spec->mask.globals.data();
    e.segments = segment_ids.empty() ? nullptr : &segment_ids[b * spec->mask.segments.size()];
    e.maps =
        block_maps.empty() ? nullptr : &block_maps[(b * hq + h) * spec->mask.block_maps.size()];
    e.offset = seqs[b].offset;
    return e;
  }
  bool softmax_family() const {
    return spec->normalizer.kind == NormalizerKind::kSoftmax ||
           spec->normalizer.kind == NormalizerKind::kSoftmaxSink;
  }
};

// The operands of a backward call, resolved like the forward's.
struct GradOperands {
  RowOperand grad_out, dq, dk, dv;
  // The gate's gradient when asked for: elementwise, addressed like out; per head, one element
  // per row (row(b, h, n) points at it).
  RowOperand dgate;
};

// Checks grad_out and every gradient view against the forward problem `p` (already resolved):
// shapes like their inputs, fp32 or fp64, a gradient only for an input the spec has.
Status validate_grads(const Problem& p, const TensorView& q, const TensorView& k,
                      const TensorView& v, const TensorView& grad_out, const AttentionGrads& grads,
                      GradOperands* out);

// Packed rows past the last sequence (cu_seqlens may end before the tensors do) are in no
// sequence: the output does not depend on them, so their gradients (dq, dk, dv, dgate) are zero.
// Writes those zeros in host memory (the CPU backward and the oracle; CUDA's backward has its
// own); nothing without varlen.
void zero_padding_grads(const Problem& p, const AttentionGrads& grads);
// The gradients with such rows: each view, the dim its rows run along (0 for [total, H, D] and
// an elementwise dgate; 1 for a per-head dgate [Hq, total_q]) and its first padding row (every
// backend zeroes the same; empty without varlen; a view may have no row past `from`).
struct PaddingTail {
  const TensorView* grad;
  int dim;
  int64_t from;
};
std::vector<PaddingTail> padding_tails(const Problem& p, const AttentionGrads& grads);
// Zeros every element of a host tensor whose index along `dim` is `from` or more.
void zero_rows_from(const TensorView& t, int dim, int64_t from);

// Checks every rule of the call (DESIGN.md "Errors"), then fills `p`. `backend` names who asks
// ("cpu", "reference") for backend-specific limits.
Status validate_and_resolve(const TensorView& q, const TensorView& k, const TensorView& v,
                            const AttentionSpec& spec, const TensorView& out,
                            const TensorView& row_stat, const AttentionStats& stats,
                            const Options& options, bool allow_f64, Problem* p);

}  // namespace attnkit::core
