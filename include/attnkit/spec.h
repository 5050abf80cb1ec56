// AttentionSpec: what to compute (MECHANISMS.md, section 1): mask, score modifications,
// normalizer, epilogue, layout. Built by value, validated once by the entry points.
#pragma once
#include <cstdint>
#include <optional>
#include <vector>

#include "attnkit/tensor.h"

namespace attnkit {

// Axis order of q, k, v, out (and an elementwise gate). Varlen tensors are [total, H, D].
enum class Layout : uint8_t { kBHND, kBNHD };
// Aligned query index i' = i + (Nk - Nq) (bottom right, the default) or i' = i (top left).
enum class Alignment : uint8_t { kBottomRight, kTopLeft };

enum class MaskKind : uint8_t {
  kNone,
  kCausal,
  kSlidingWindow,
  kGlobalWindow,
  kChunked,
  kDocument,
  kBlockAttention,
  kPrefixLM,
  kNeighborhood,
  kMaxvitBlock,
  kMaxvitGrid,
  kAnd,
  kOr,
  kNot,
  kBlockMap,
};
const char* mask_kind_name(MaskKind k);
// Whether a node of kind k reads segment ids (MaskNode::seg_q, seg_k); other kinds' are not read.
constexpr bool reads_segments(MaskKind k) {
  return k == MaskKind::kDocument || k == MaskKind::kBlockAttention;
}

inline constexpr int kMaxGridDims = 3;

// One node of a mask tree; variant/masks.h evaluates it. Plain data, usable on host and device.
struct MaskNode {
  MaskKind kind = MaskKind::kNone;
  int64_t a = 0, b = 0;  // window (left, right); chunk size; prefix length; MaxViT window or grid
  bool causal = false;   // chunked, document
  // neighborhood / MaxViT grids (row-major, last dim fastest)
  int ndim = 0;
  int64_t shape[kMaxGridDims] = {1, 1, 1};
  int64_t kernel[kMaxGridDims] = {1, 1, 1};
  int64_t dilation[kMaxGridDims] = {1, 1, 1};
  bool dim_causal[kMaxGridDims] = {false, false, false};
  // global tokens: an index range into Mask::globals
  int32_t globals_begin = 0, globals_count = 0;
  // document / block-attention: indices into Mask::segments (-1: none)
  int32_t seg_q = -1, seg_k = -1;
  // block map: index into Mask::block_maps (-1: none); a = query block, b = key block
  int32_t map = -1;
  // children of and / or / not (indices into Mask::nodes)
  int32_t child0 = -1, child1 = -1;
};

// A mask: a tree of MaskNodes (nodes[0] is the root) and the data its nodes refer to.
class Mask {
 public:
  static Mask none();
  static Mask causal();
  // Window sizes (left, right >= 0) above kUnboundedWindow mean unbounded and are stored as it,
  // so that i' - left and i' + right never overflow (INT64_MAX for a side without a bound).
  static constexpr int64_t kUnboundedWindow = INT64_MAX / 4;
  static Mask sliding_window(int64_t left, int64_t right);
  static Mask global_window(int64_t left, int64_t right, std::vector<int64_t> globals);
  static Mask chunked(int64_t chunk, bool causal = false);
  // Segment ids: int32 [Nq] / [Nk], or [B, Nq] / [B, Nk].
  static Mask document(TensorView segments_q, TensorView segments_k, bool causal = false);
  static Mask document(TensorView segments, bool causal = false) {
    return document(segments, segments, causal);
  }
  static Mask block_attention(TensorView segments);
  static Mask prefix_lm(int64_t prefix);
  // Grid of 1 to 3 dims; kernel, dilation and causal per dim (NATTEN's definition).
  static Mask neighborhood(std::vector<int64_t> shape, std::vector<int64_t> kernel,
                           std::vector<int64_t> dilation = {}, std::vector<bool> causal = {});
  static Mask maxvit_block(int64_t height, int64_t width, int64_t window);
  static Mask maxvit_grid(int64_t height, int64_t width, int64_t grid);
  // A block-sparse map (MECHANISMS.md 2.1, as a selection algorithm such as MoBA or
  // SeerAttention produces it): int32 [B or 1, Hq or 1, ceil(Nq / block_q), ceil(Nk / block_k)],
  // nonzero where query block i / block_q may see key block j / block_k. Per batch element and
  // head.
  static Mask block_map(TensorView map, int64_t block_q = 64, int64_t block_k = 64);

  friend Mask operator&(const Mask& x, const Mask& y);
  friend Mask operator|(const Mask& x, const Mask& y);
  friend Mask operator!(const Mask& x);

  bool is_none() const { return nodes.size() == 1 && nodes[0].kind == MaskKind::kNone; }
  std::vector<MaskNode> nodes{MaskNode{}};
  std::vector<int64_t> globals;
  std::vector<TensorView> segments;
  std::vector<TensorView> block_maps;
};

enum class AlibiMode : uint8_t { kOff, kCausal, kSymmetric };
enum class RelativeBucketKind : uint8_t { kOff, kT5, kClipped };

// Score modifications (MECHANISMS.md 1.2), applied in this order: additive terms
// (bias, low-rank bias, ALiBi, relative buckets, forget gate), then softcap, then the mask.
struct ScoreMods {
  float softcap = 0.f;  // 0: off; else s -> c * tanh(s / c)
  AlibiMode alibi = AlibiMode::kOff;
  TensorView alibi_slopes;  // optional fp32 [Hq]; default m_h = 2^(-8(h+1)/Hq)
  TensorView bias;          // [B or 1, Hq or 1, Nq, Nk]
  TensorView low_rank_u;    // [B, Hq, Nq, r]
  TensorView low_rank_w;    // [B, Hq, Nk, r]
  RelativeBucketKind relative = RelativeBucketKind::kOff;
  bool bidirectional = true;   // T5
  int64_t num_buckets = 32;    // T5
  int64_t max_distance = 128;  // T5
  int64_t clip = 0;            // clipped distance: table has 2*clip+1 entries
  TensorView relative_table;   // fp32 [Hq, buckets]
  TensorView forget_log_f;     // fp32 [B, Hq, Nk], log f in (-inf, 0]

  bool any() const { return per_element() || low_rank_u.defined(); }
  // The mods applied element by element on the fast paths (the low-rank bias is fused as extra
  // head dims instead).
  bool per_element() const {
    return softcap != 0.f || alibi != AlibiMode::kOff || bias.defined() ||
           relative != RelativeBucketKind::kOff || forget_log_f.defined();
  }
};

enum class NormalizerKind : uint8_t { kSoftmax, kSoftmaxSink, kSigmoid, kKernel, kReLA };
enum class KernelFeature : uint8_t { kSoftplus, kReLU };
const char* normalizer_name(NormalizerKind k);

// Normalizers (MECHANISMS.md 1.3).
struct Normalizer {
  NormalizerKind kind = NormalizerKind::kSoftmax;
  TensorView sinks;                                  // kSoftmaxSink: fp32 [Hq]
  std::optional<double> beta;                        // kSigmoid: default -log(Nk) (per sequence)
  KernelFeature feature = KernelFeature::kSoftplus;  // kKernel
  float power = 1.f;                                 // kKernel, > 0
  bool length_scale = false;                         // kKernel: s -> s * log(n_i)
  TensorView rela_gain;                              // kReLA: fp32 [dv]
  float rela_eps = 1e-6f;
};

enum class GateKind : uint8_t { kNone, kElementwise, kPerHead };

struct AttentionSpec {
  Mask mask;
  Alignment alignment = Alignment::kBottomRight;
  std::optional<float> scale;  // default 1/sqrt(head_dim)
  ScoreMods mods;
  Normalizer normalizer;
  GateKind gate_kind = GateKind::kNone;
  TensorView gate;  // elementwise: like out; per head: [B, Hq, Nq] (varlen [Hq, total_q])
  Layout layout = Layout::kBHND;
  TensorView cu_seqlens_q;  // int32 [B + 1], with cu_seqlens_kv: varlen packed sequences
  TensorView cu_seqlens_kv;
};

}  // namespace attnkit
