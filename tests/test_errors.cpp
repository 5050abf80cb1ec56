// Bad inputs: every call below breaks one rule of validation (src/core/validate.cpp). Each test
// passes the same invalid call to can_run() and to attention_forward() and checks that both
// (1) fail, (2) with the expected StatusCode, and (3) with a message that names the argument.
// A few control tests show that the same fixtures, made valid, return ok, so the negative
// tests fail when a rule stops being enforced rather than passing vacuously.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <deque>
#include <functional>
#include <initializer_list>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "attnkit/attention.h"

namespace attnkit {
namespace {

// One attention call: owns every buffer its views point to.
class Call {
 public:
  // Dense call: q [B, Hq, Nq, d], k [B, Hk, Nk, d], v [B, Hk, Nk, dv], out [B, Hq, Nq, dv] (BHND).
  Call(int64_t b, int64_t hq, int64_t hk, int64_t nq, int64_t nk, int64_t d, int64_t dv) {
    q = f32({b, hq, nq, d});
    k = f32({b, hk, nk, d});
    v = f32({b, hk, nk, dv});
    out = f32({b, hq, nq, dv});
  }
  // The default dense call: B = 1, Hq = Hk = 2, Nq = Nk = 4, d = dv = 8.
  Call() : Call(1, 2, 2, 4, 4, 8, 8) {}

  // Varlen call: q [total_q, Hq, d], k and v [total_k, Hk, d], out [total_q, Hq, d], with
  // cu_seqlens_q / cu_seqlens_kv (empty vector: not given).
  static Call varlen(int64_t total_q, int64_t total_k, int64_t h, int64_t d,
                     const std::vector<int32_t>& cu_q, const std::vector<int32_t>& cu_kv) {
    Call c(Tag{});
    c.q = c.f32({total_q, h, d});
    c.k = c.f32({total_k, h, d});
    c.v = c.f32({total_k, h, d});
    c.out = c.f32({total_q, h, d});
    if (!cu_q.empty()) c.spec.cu_seqlens_q = c.i32(cu_q, {static_cast<int64_t>(cu_q.size())});
    if (!cu_kv.empty()) c.spec.cu_seqlens_kv = c.i32(cu_kv, {static_cast<int64_t>(cu_kv.size())});
    return c;
  }

  // A contiguous fp32 tensor of `shape` backed by a buffer this call owns (at least one
  // element, so that a zero-sized dim still has a non-null pointer). Values are small and
  // deterministic so that valid calls compute finite results.
  TensorView f32(std::initializer_list<int64_t> shape) {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    std::vector<float>& buf = floats_.emplace_back(static_cast<size_t>(n > 0 ? n : 1));
    for (size_t i = 0; i < buf.size(); ++i) buf[i] = 0.01f * static_cast<float>(i % 17) - 0.05f;
    return TensorView::contiguous(buf.data(), DType::kF32, shape);
  }
  // A contiguous int32 tensor holding `values`.
  TensorView i32(std::vector<int32_t> values, std::initializer_list<int64_t> shape) {
    std::vector<int32_t>& buf = ints_.emplace_back(std::move(values));
    if (buf.empty()) buf.push_back(0);
    return TensorView::contiguous(buf.data(), DType::kI32, shape);
  }

  Status check() const { return can_run(q, k, v, spec, out, row_stat, stats, options); }
  Status forward() const { return attention_forward(q, k, v, spec, out, row_stat, stats, options); }

  TensorView q, k, v, out;
  AttentionSpec spec;
  TensorView row_stat;
  AttentionStats stats;
  Options options;

 private:
  struct Tag {};
  explicit Call(Tag) {}
  std::deque<std::vector<float>> floats_;  // deque: element addresses stay put on growth
  std::deque<std::vector<int32_t>> ints_;
};

bool contains(const std::string& s, const std::string& sub) {
  return s.find(sub) != std::string::npos;
}

void expect_status(const Status& s, const char* entry, StatusCode code, const std::string& arg) {
  EXPECT_FALSE(s.ok()) << entry << " accepted an invalid call";
  EXPECT_STREQ(status_code_name(s.code()), status_code_name(code))
      << entry << " message: " << s.message();
  EXPECT_TRUE(contains(s.message(), arg))
      << entry << " message does not name \"" << arg << "\": " << s.message();
}

// Both entry points must reject `c` with `code` and a message naming `arg`.
void expect_rejected(const Call& c, StatusCode code, const std::string& arg) {
  const Status checked = c.check();
  expect_status(checked, "can_run", code, arg);
  // If validation wrongly accepted the call, running it could read past the (deliberately
  // inconsistent) buffers: record the failure instead of running the kernel.
  ASSERT_FALSE(checked.ok()) << "attention_forward not called: can_run accepted the call";
  const Status ran = c.forward();
  expect_status(ran, "attention_forward", code, arg);
  EXPECT_EQ(ran.message(), checked.message()) << "can_run and attention_forward disagree";
}

#define EXPECT_REJECTED(call, code, arg)              \
  do {                                                \
    SCOPED_TRACE(std::string("expecting ") + (arg));  \
    expect_rejected((call), StatusCode::code, (arg)); \
  } while (0)

void expect_ok(const Call& c) {
  const Status checked = c.check();
  EXPECT_TRUE(checked.ok()) << "can_run: " << checked.message();
  ASSERT_TRUE(checked.ok());
  const Status ran = c.forward();
  EXPECT_TRUE(ran.ok()) << "attention_forward: " << ran.message();
}

#define EXPECT_ACCEPTED(call)     \
  do {                            \
    SCOPED_TRACE("expecting ok"); \
    expect_ok((call));            \
  } while (0)

// ---------------------------------------------------------------- controls (must be ok)

TEST(Errors, ValidCallIsOk) {
  Call c;
  EXPECT_ACCEPTED(c);
  // The output was written and is finite.
  const float* o = static_cast<const float*>(c.out.data);
  for (int64_t i = 0; i < c.out.numel(); ++i)
    ASSERT_TRUE(std::isfinite(o[i])) << "out[" << i << "]";
}

TEST(Errors, ValidVarlenIsOk) { EXPECT_ACCEPTED(Call::varlen(6, 6, 2, 8, {0, 2, 6}, {0, 3, 6})); }

TEST(Errors, ValidFeatureConfigsAreOk) {
  {
    Call c(1, 4, 2, 4, 4, 8, 8);  // GQA 4:2, row_stat, stats, col_mass over all rows
    c.row_stat = c.f32({1, 4, 4});
    c.stats.row_max = c.f32({1, 4, 4});
    c.stats.col_mass = c.f32({1, 4, 4});
    c.stats.col_mass_q_begin = 0;
    c.stats.col_mass_q_end = 4;
    EXPECT_ACCEPTED(c);
  }
  {
    Call c;
    c.spec.normalizer.kind = NormalizerKind::kSoftmaxSink;
    c.spec.normalizer.sinks = c.f32({2});
    c.spec.mods.bias = c.f32({1, 1, 4, 4});
    c.spec.mods.softcap = 30.f;
    c.spec.gate_kind = GateKind::kElementwise;
    c.spec.gate = c.f32({1, 2, 4, 8});
    EXPECT_ACCEPTED(c);
  }
  {
    Call c;
    c.spec.normalizer.kind = NormalizerKind::kReLA;
    c.spec.normalizer.rela_gain = c.f32({8});
    EXPECT_ACCEPTED(c);
  }
  {
    Call c;
    c.spec.normalizer.kind = NormalizerKind::kKernel;
    c.spec.normalizer.power = 2.f;
    EXPECT_ACCEPTED(c);
  }
  {
    Call c(1, 2, 2, 9, 9, 8, 8);
    c.spec.mask = Mask::neighborhood({3, 3}, {3, 3});
    EXPECT_ACCEPTED(c);
  }
  {
    Call c(1, 2, 2, 8, 8, 8, 8);
    c.spec.mask = Mask::maxvit_grid(4, 2, 2);
    EXPECT_ACCEPTED(c);
  }
  {
    Call c(1, 2, 2, 4, 6, 8, 8);
    c.spec.mods.forget_log_f = c.f32({1, 2, 6});
    for (int i = 0; i < 12; ++i)  // log f <= 0
      static_cast<float*>(c.spec.mods.forget_log_f.data)[i] = -0.01f * static_cast<float>(i % 5);
    c.spec.mods.low_rank_u = c.f32({1, 2, 4, 2});
    c.spec.mods.low_rank_w = c.f32({1, 2, 6, 2});
    c.spec.mods.relative = RelativeBucketKind::kClipped;
    c.spec.mods.clip = 2;
    c.spec.mods.relative_table = c.f32({2, 5});
    EXPECT_ACCEPTED(c);
  }
  {
    Call c;
    c.spec.mask = Mask::document(c.i32({0, 0, 1, 1}, {4}));
    c.spec.mask = c.spec.mask & Mask::sliding_window(2, 0);
    EXPECT_ACCEPTED(c);
  }
}

// ---------------------------------------------------------------- operand shapes

TEST(Errors, KAndVLengthsDiffer) {
  Call c;
  c.v = c.f32({1, 2, 5, 8});  // k has Nk = 4
  EXPECT_REJECTED(c, kInvalidArgument, "v.seqlen");
}

TEST(Errors, QAndKHeadDimsDiffer) {
  Call c;
  c.k = c.f32({1, 2, 4, 16});  // q has d = 8
  EXPECT_REJECTED(c, kInvalidArgument, "k.head_dim");
}

TEST(Errors, OutSeqlenWrong) {
  Call c;
  c.out = c.f32({1, 2, 3, 8});
  EXPECT_REJECTED(c, kInvalidArgument, "out.seqlen");
}

TEST(Errors, OutHeadDimWrong) {
  Call c;
  c.out = c.f32({1, 2, 4, 7});
  EXPECT_REJECTED(c, kInvalidArgument, "out.head_dim");
}

TEST(Errors, OutHeadsWrong) {
  Call c;
  c.out = c.f32({1, 3, 4, 8});
  EXPECT_REJECTED(c, kInvalidArgument, "out has 3 heads");
}

TEST(Errors, OutWrongRank) {
  Call c;
  c.out = c.f32({2, 4, 8});
  EXPECT_REJECTED(c, kInvalidArgument, "out.ndim");
}

TEST(Errors, BatchSizesDiffer) {
  Call c;
  c.k = c.f32({2, 2, 4, 8});
  c.v = c.f32({2, 2, 4, 8});
  EXPECT_REJECTED(c, kInvalidArgument, "batch sizes differ");
}

TEST(Errors, GqaRatioNotInteger) {
  Call c(1, 3, 2, 4, 4, 8, 8);  // Hq = 3, Hk = 2
  EXPECT_REJECTED(c, kInvalidArgument, "num_heads_q");
}

TEST(Errors, HeadDimZero) {
  Call c(1, 2, 2, 4, 4, 0, 8);
  EXPECT_REJECTED(c, kInvalidArgument, "q.shape[3]");
}

TEST(Errors, HeadDim257) {
  Call c(1, 1, 1, 2, 2, 257, 8);
  EXPECT_REJECTED(c, kInvalidArgument, "head_dim = 257");
}

TEST(Errors, HeadDimV257) {
  Call c(1, 1, 1, 2, 2, 8, 257);
  EXPECT_REJECTED(c, kInvalidArgument, "head_dim_v = 257");
}

TEST(Errors, SeqlenOver2Pow31Minus1) {
  // q and out claim 2^31 rows; validation must reject the length before touching memory, so
  // their data pointer may address a small buffer (validate.cpp checks seqlen <= INT32_MAX
  // right after the shape checks, before reading any tensor).
  Call c;
  const int64_t n = int64_t{1} << 31;
  void* small = c.q.data;
  c.q = TensorView::contiguous(small, DType::kF32, {1, 1, n, 8});
  c.out = TensorView::contiguous(small, DType::kF32, {1, 1, n, 8});
  c.k = c.f32({1, 1, 4, 8});
  c.v = c.f32({1, 1, 4, 8});
  EXPECT_REJECTED(c, kInvalidArgument, "seqlen = 2147483648");
}

// ---------------------------------------------------------------- dtypes, strides, memory

TEST(Errors, KDtypeDiffersFromQ) {
  Call c;
  c.k.dtype = DType::kBF16;  // q fp32
  EXPECT_REJECTED(c, kTypeError, "k.dtype");
}

TEST(Errors, Int32Q) {
  Call c;
  c.q.dtype = DType::kI32;
  EXPECT_REJECTED(c, kTypeError, "q.dtype");
}

TEST(Errors, OutDtypeInt32) {
  Call c;
  c.out.dtype = DType::kI32;
  EXPECT_REJECTED(c, kTypeError, "out.dtype");
}

TEST(Errors, NonUnitInnerStride) {
  Call c;
  TensorView wide = c.f32({1, 2, 4, 16});
  c.q = wide;
  c.q.shape[3] = 8;
  c.q.strides[3] = 2;  // every other element of a [1, 2, 4, 16] buffer
  EXPECT_REJECTED(c, kInvalidArgument, "q.strides[3]");
}

TEST(Errors, NegativeStride) {
  Call c;
  c.k.strides[2] = -8;
  EXPECT_REJECTED(c, kInvalidArgument, "k.strides[2]");
}

TEST(Errors, NullDataPointer) {
  Call c;
  c.k.data = nullptr;
  EXPECT_REJECTED(c, kInvalidArgument, "k.data");
}

// Elements at an address not a multiple of their size (a float view 2 bytes into its buffer):
// refused by the rule, on every device (a CUDA store of such a float faults).
TEST(Errors, MisalignedElements) {
  Call c;
  c.k.data = static_cast<char*>(c.k.data) + 2;
  EXPECT_REJECTED(c, kInvalidArgument, "k.data is not 4-byte aligned");
}

TEST(Errors, MissingQ) {
  Call c;
  c.q = TensorView{};
  EXPECT_REJECTED(c, kInvalidArgument, "q is missing");
}

TEST(Errors, CudaDeviceTensor) {
  Call c;
  c.v.device = Device::kCUDA;  // "v is on cuda:0 but q is on cpu" (or: no CUDA backend built)
  EXPECT_REJECTED(c, kTypeError, "v is on ");
}

// ---------------------------------------------------------------- masks

TEST(Errors, NegativeSlidingWindow) {
  Call c;
  c.spec.mask = Mask::sliding_window(-1, 0);
  EXPECT_REJECTED(c, kInvalidArgument, "window");
}

TEST(Errors, NegativeSlidingWindowInsideAnd) {
  Call c;
  c.spec.mask = Mask::causal() & Mask::sliding_window(2, -3);
  EXPECT_REJECTED(c, kInvalidArgument, "window");
}

// The builders store a side above Mask::kUnboundedWindow as it (unbounded); a node built by hand
// with a larger side would overflow i' - left: named.
TEST(Errors, HandBuiltWindowBeyondUnbounded) {
  Call c;
  c.spec.mask = Mask::causal() & Mask::sliding_window(2, 3);
  for (MaskNode& n : c.spec.mask.nodes)
    if (n.kind == MaskKind::kSlidingWindow) n.a = INT64_MAX;
  EXPECT_REJECTED(c, kInvalidArgument, "kUnboundedWindow");
}

// The forget gate's f is in (0, 1]: a log f of -inf (NaN differences of the prefix sums, read as
// masked scores), +inf or NaN is named (host tensors).
TEST(Errors, ForgetGateOutsideItsRange) {
  for (const float bad : {-INFINITY, INFINITY, NAN}) {
    Call c;
    std::vector<float> lf(2 * 4, -0.1f);  // [B = 1, Hq = 2, Nk = 4]
    lf[5] = bad;
    c.spec.mods.forget_log_f = TensorView::contiguous(lf.data(), DType::kF32, {1, 2, 4});
    EXPECT_REJECTED(c, kInvalidArgument, "forget_log_f[0, 1, 1]");
  }
}

TEST(Errors, GlobalTokenOutOfRange) {
  Call c;
  c.spec.mask = Mask::global_window(1, 1, {0, 4});  // Nk = 4
  EXPECT_REJECTED(c, kInvalidArgument, "global token 4");
}

TEST(Errors, ChunkZero) {
  Call c;
  c.spec.mask = Mask::chunked(0);
  EXPECT_REJECTED(c, kInvalidArgument, "chunk");
}

TEST(Errors, NegativePrefix) {
  Call c;
  c.spec.mask = Mask::prefix_lm(-1);
  EXPECT_REJECTED(c, kInvalidArgument, "prefix");
}

TEST(Errors, DocumentSegmentsWrongShape) {
  Call c;
  c.spec.mask = Mask::document(c.i32({0, 0, 1, 1, 1}, {5}));  // Nq = Nk = 4
  EXPECT_REJECTED(c, kInvalidArgument, "segments_q.shape");
}

TEST(Errors, DocumentSegmentsNotInt32) {
  Call c;
  c.spec.mask = Mask::document(c.f32({4}));
  EXPECT_REJECTED(c, kTypeError, "segments_q.dtype");
}

TEST(Errors, NeighborhoodEvenKernelNonCausal) {
  Call c(1, 2, 2, 8, 8, 8, 8);
  c.spec.mask = Mask::neighborhood({8}, {2});
  EXPECT_REJECTED(c, kInvalidArgument, "neighborhood kernel[0]");
}

TEST(Errors, NeighborhoodKernelTimesDilationExceedsExtent) {
  Call c(1, 2, 2, 8, 8, 8, 8);
  c.spec.mask = Mask::neighborhood({8}, {3}, {3});  // 3 * 3 > 8
  EXPECT_REJECTED(c, kInvalidArgument, "dilation[0]");
}

TEST(Errors, NeighborhoodGridSizeNotSeqlen) {
  Call c(1, 2, 2, 8, 8, 8, 8);
  c.spec.mask = Mask::neighborhood({3, 3}, {3, 3});  // 9 tokens, seqlen 8
  EXPECT_REJECTED(c, kInvalidArgument, "neighborhood grid");
}

TEST(Errors, NeighborhoodKernelRankMismatch) {
  Call c(1, 2, 2, 9, 9, 8, 8);
  c.spec.mask = Mask::neighborhood({3, 3}, {3});
  EXPECT_REJECTED(c, kInvalidArgument, "neighborhood kernel");
}

TEST(Errors, MaxvitGridNotDividing) {
  Call c(1, 2, 2, 8, 8, 8, 8);
  c.spec.mask = Mask::maxvit_grid(4, 2, 3);
  EXPECT_REJECTED(c, kInvalidArgument, "maxvit_grid G");
}

// ---------------------------------------------------------------- varlen

TEST(Errors, CuSeqlensNonMonotonic) {
  Call c = Call::varlen(6, 6, 2, 8, {0, 4, 2, 6}, {0, 2, 4, 6});
  EXPECT_REJECTED(c, kInvalidArgument, "cu_seqlens_q[2]");
}

TEST(Errors, CuSeqlensOutOfRange) {
  Call c = Call::varlen(6, 6, 2, 8, {0, 3, 6}, {0, 3, 7});  // total_k = 6
  EXPECT_REJECTED(c, kInvalidArgument, "cu_seqlens_kv[2]");
}

TEST(Errors, CuSeqlensQWithoutKv) {
  Call c = Call::varlen(6, 6, 2, 8, {0, 3, 6}, {});
  EXPECT_REJECTED(c, kInvalidArgument, "cu_seqlens_q and cu_seqlens_kv");
}

TEST(Errors, CuSeqlensFirstEntryNotZero) {
  Call c = Call::varlen(6, 6, 2, 8, {1, 3, 6}, {0, 3, 6});
  EXPECT_REJECTED(c, kInvalidArgument, "cu_seqlens_q[0]");
}

TEST(Errors, CuSeqlensLengthsDiffer) {
  Call c = Call::varlen(6, 6, 2, 8, {0, 3, 6}, {0, 2, 4, 6});
  EXPECT_REJECTED(c, kInvalidArgument, "cu_seqlens_kv.shape");
}

TEST(Errors, CuSeqlensNotInt32) {
  Call c = Call::varlen(6, 6, 2, 8, {0, 3, 6}, {0, 3, 6});
  c.spec.cu_seqlens_q.dtype = DType::kF32;
  EXPECT_REJECTED(c, kTypeError, "cu_seqlens_q.dtype");
}

TEST(Errors, VarlenWithDenseRank) {
  Call c;  // 4-d operands
  c.spec.cu_seqlens_q = c.i32({0, 4}, {2});
  c.spec.cu_seqlens_kv = c.i32({0, 4}, {2});
  EXPECT_REJECTED(c, kInvalidArgument, "q.ndim");
}

TEST(Errors, DocumentMaskWithVarlenNotImplemented) {
  Call c = Call::varlen(6, 6, 2, 8, {0, 3, 6}, {0, 3, 6});
  c.spec.mask = Mask::document(c.i32({0, 0, 0, 1, 1, 1}, {6}));
  EXPECT_REJECTED(c, kNotImplemented, "document");
}

TEST(Errors, BiasWithVarlenNotImplemented) {
  Call c = Call::varlen(6, 6, 2, 8, {0, 3, 6}, {0, 3, 6});
  c.spec.mods.bias = c.f32({1, 2, 3, 3});
  EXPECT_REJECTED(c, kNotImplemented, "bias");
}

TEST(Errors, ColMassWithVarlenNotImplemented) {
  Call c = Call::varlen(6, 6, 2, 8, {0, 3, 6}, {0, 3, 6});
  c.stats.col_mass = c.f32({1, 2, 6});
  EXPECT_REJECTED(c, kNotImplemented, "col_mass");
}

// ---------------------------------------------------------------- score modifications

TEST(Errors, BiasWrongBroadcastShape) {
  Call c;
  c.spec.mods.bias = c.f32({1, 1, 4, 1});  // broadcasting over keys is not allowed
  EXPECT_REJECTED(c, kInvalidArgument, "bias.shape");
}

TEST(Errors, BiasDtypeInt) {
  Call c;
  c.spec.mods.bias = c.i32(std::vector<int32_t>(32, 0), {1, 2, 4, 4});
  EXPECT_REJECTED(c, kTypeError, "bias.dtype");
}

TEST(Errors, SoftcapNegative) {
  Call c;
  c.spec.mods.softcap = -1.f;
  EXPECT_REJECTED(c, kInvalidArgument, "softcap");
}

TEST(Errors, SoftcapNaN) {
  Call c;
  c.spec.mods.softcap = std::numeric_limits<float>::quiet_NaN();
  EXPECT_REJECTED(c, kInvalidArgument, "softcap");
}

TEST(Errors, AlibiSlopesWrongShape) {
  Call c;
  c.spec.mods.alibi = AlibiMode::kCausal;
  c.spec.mods.alibi_slopes = c.f32({3});  // Hq = 2
  EXPECT_REJECTED(c, kInvalidArgument, "alibi_slopes.shape");
}

TEST(Errors, LowRankUWithoutW) {
  Call c;
  c.spec.mods.low_rank_u = c.f32({1, 2, 4, 2});
  EXPECT_REJECTED(c, kInvalidArgument, "low_rank_w");
}

TEST(Errors, LowRankWWrongRank) {
  Call c;
  c.spec.mods.low_rank_u = c.f32({1, 2, 4, 2});
  c.spec.mods.low_rank_w = c.f32({1, 2, 4, 3});  // r differs from u's
  EXPECT_REJECTED(c, kInvalidArgument, "low_rank_w.shape");
}

// The low-rank bias's rank counts against the head dim: head_dim + r <= kMaxHeadDim (256).
TEST(Errors, LowRankBiasWiderThanAHead) {
  Call c(1, 2, 2, 4, 4, 254, 8);
  c.spec.mods.low_rank_u = c.f32({1, 2, 4, 3});
  c.spec.mods.low_rank_w = c.f32({1, 2, 4, 3});
  EXPECT_REJECTED(c, kInvalidArgument, "head_dim + r must be <= 256");
}

TEST(Errors, RelativeBucketsWithoutTable) {
  Call c;
  c.spec.mods.relative = RelativeBucketKind::kClipped;
  c.spec.mods.clip = 2;
  EXPECT_REJECTED(c, kInvalidArgument, "relative_table");
}

TEST(Errors, RelativeTableWrongShape) {
  Call c;
  c.spec.mods.relative = RelativeBucketKind::kT5;
  c.spec.mods.num_buckets = 32;
  c.spec.mods.relative_table = c.f32({2, 31});
  EXPECT_REJECTED(c, kInvalidArgument, "relative_table.shape");
}

TEST(Errors, ForgetGateWithNqGreaterThanNk) {
  Call c(1, 2, 2, 6, 4, 8, 8);
  c.spec.mods.forget_log_f = c.f32({1, 2, 4});
  EXPECT_REJECTED(c, kInvalidArgument, "forget gate with seqlen_q");
}

TEST(Errors, ForgetGateWrongShape) {
  Call c;
  c.spec.mods.forget_log_f = c.f32({1, 2, 5});
  EXPECT_REJECTED(c, kInvalidArgument, "forget_log_f.shape");
}

// ---------------------------------------------------------------- normalizers and outputs

TEST(Errors, RowStatWithSigmoid) {
  Call c;
  c.spec.normalizer.kind = NormalizerKind::kSigmoid;
  c.row_stat = c.f32({1, 2, 4});
  EXPECT_REJECTED(c, kInvalidArgument, "row_stat");
}

TEST(Errors, StatsWithSigmoid) {
  Call c;
  c.spec.normalizer.kind = NormalizerKind::kSigmoid;
  c.stats.row_max = c.f32({1, 2, 4});
  EXPECT_REJECTED(c, kInvalidArgument, "statistics with normalizer sigmoid");
}

TEST(Errors, RowStatWrongShape) {
  Call c;
  c.row_stat = c.f32({1, 2, 5});
  EXPECT_REJECTED(c, kInvalidArgument, "row_stat.shape");
}

TEST(Errors, SinksMissingForSinkNormalizer) {
  Call c;
  c.spec.normalizer.kind = NormalizerKind::kSoftmaxSink;
  EXPECT_REJECTED(c, kInvalidArgument, "needs sinks");
}

TEST(Errors, SinksWrongShape) {
  Call c;
  c.spec.normalizer.kind = NormalizerKind::kSoftmaxSink;
  c.spec.normalizer.sinks = c.f32({3});  // Hq = 2
  EXPECT_REJECTED(c, kInvalidArgument, "sinks.shape");
}

TEST(Errors, SinksWithoutSinkNormalizer) {
  Call c;
  c.spec.normalizer.sinks = c.f32({2});
  EXPECT_REJECTED(c, kInvalidArgument, "sinks given");
}

TEST(Errors, KernelPowerZero) {
  Call c;
  c.spec.normalizer.kind = NormalizerKind::kKernel;
  c.spec.normalizer.power = 0.f;
  EXPECT_REJECTED(c, kInvalidArgument, "kernel power");
}

TEST(Errors, KernelPowerNegative) {
  Call c;
  c.spec.normalizer.kind = NormalizerKind::kKernel;
  c.spec.normalizer.power = -1.f;
  EXPECT_REJECTED(c, kInvalidArgument, "kernel power");
}

TEST(Errors, BetaWithSoftmax) {
  Call c;
  c.spec.normalizer.beta = -1.f;
  EXPECT_REJECTED(c, kInvalidArgument, "beta = ");
}

TEST(Errors, RelaWithoutGain) {
  Call c;
  c.spec.normalizer.kind = NormalizerKind::kReLA;
  EXPECT_REJECTED(c, kInvalidArgument, "rela_gain");
}

TEST(Errors, RelaGainWrongShape) {
  Call c;
  c.spec.normalizer.kind = NormalizerKind::kReLA;
  c.spec.normalizer.rela_gain = c.f32({7});  // dv = 8
  EXPECT_REJECTED(c, kInvalidArgument, "rela_gain.shape");
}

TEST(Errors, ColMassRangeOutOfBounds) {
  Call c;
  c.stats.col_mass = c.f32({1, 2, 4});
  c.stats.col_mass_q_begin = 0;
  c.stats.col_mass_q_end = 5;  // Nq = 4
  EXPECT_REJECTED(c, kInvalidArgument, "col_mass query range");
}

TEST(Errors, ColMassRangeNegativeBegin) {
  Call c;
  c.stats.col_mass = c.f32({1, 2, 4});
  c.stats.col_mass_q_begin = -1;
  EXPECT_REJECTED(c, kInvalidArgument, "col_mass query range");
}

// ---------------------------------------------------------------- gates, scale, options

TEST(Errors, GateShapeMismatch) {
  Call c;
  c.spec.gate_kind = GateKind::kElementwise;
  c.spec.gate = c.f32({1, 2, 4, 9});  // out is [1, 2, 4, 8]
  EXPECT_REJECTED(c, kInvalidArgument, "gate.shape");
}

TEST(Errors, PerHeadGateWrongShape) {
  Call c;
  c.spec.gate_kind = GateKind::kPerHead;
  c.spec.gate = c.f32({1, 2, 3});  // must be [B, Hq, Nq] = [1, 2, 4]
  EXPECT_REJECTED(c, kInvalidArgument, "gate.shape");
}

TEST(Errors, GateKindWithoutGate) {
  Call c;
  c.spec.gate_kind = GateKind::kElementwise;
  EXPECT_REJECTED(c, kInvalidArgument, "needs a gate tensor");
}

TEST(Errors, ScaleNaN) {
  Call c;
  c.spec.scale = std::numeric_limits<float>::quiet_NaN();
  EXPECT_REJECTED(c, kInvalidArgument, "scale");
}

TEST(Errors, ScaleInfinite) {
  Call c;
  c.spec.scale = std::numeric_limits<float>::infinity();
  EXPECT_REJECTED(c, kInvalidArgument, "scale");
}

TEST(Errors, NumThreadsNegative) {
  Call c;
  c.options.num_threads = -1;
  EXPECT_REJECTED(c, kInvalidArgument, "num_threads");
}

// Found by `attnkit fuzz --invalid`: enums cast from integers past their values, a MaxViT node
// with other than 2 grid dims (its shape has 3 entries), outputs whose elements share memory.
TEST(Errors, EnumsPastTheirValues) {
  const std::pair<const char*, std::function<void(AttentionSpec&)>> cases[] = {
      {"layout", [](AttentionSpec& s) { s.layout = static_cast<Layout>(7); }},
      {"alignment", [](AttentionSpec& s) { s.alignment = static_cast<Alignment>(7); }},
      {"mods.alibi", [](AttentionSpec& s) { s.mods.alibi = static_cast<AlibiMode>(7); }},
      {"mods.relative",
       [](AttentionSpec& s) { s.mods.relative = static_cast<RelativeBucketKind>(7); }},
      {"normalizer.kind",
       [](AttentionSpec& s) { s.normalizer.kind = static_cast<NormalizerKind>(7); }},
      {"normalizer.feature",
       [](AttentionSpec& s) { s.normalizer.feature = static_cast<KernelFeature>(7); }},
      {"gate_kind", [](AttentionSpec& s) { s.gate_kind = static_cast<GateKind>(7); }},
      {"mask node 0 has kind",
       [](AttentionSpec& s) { s.mask.nodes[0].kind = static_cast<MaskKind>(99); }}};
  for (const auto& [name, breaks] : cases) {
    Call c;
    breaks(c.spec);
    EXPECT_REJECTED(c, kInvalidArgument, name);
  }
}

TEST(Errors, MaxvitGridDims) {
  Call c(1, 2, 2, 16, 16, 8, 8);
  c.spec.mask = Mask::maxvit_block(4, 4, 2);
  EXPECT_ACCEPTED(c);
  c.spec.mask.nodes[0].ndim = 4;
  EXPECT_REJECTED(c, kInvalidArgument, "maxvit_block grid has 4 dims");
}

TEST(Errors, OutputsWhoseElementsShareMemory) {
  Call c;  // out [1, 2, 4, 8]: rows 4 apart overlap (and a zero stride, and row_stat's)
  c.out.strides[2] = 4;
  EXPECT_REJECTED(c, kInvalidArgument, "out.strides[2] = 4");
  Call d;
  d.row_stat = d.f32({1, 2, 4});
  d.row_stat.strides[1] = 0;
  EXPECT_REJECTED(d, kInvalidArgument, "row_stat.strides[1] = 0");
  Call e;  // a permuted (BNHD-like) out nests: accepted
  e.out = e.f32({1, 4, 2, 8});
  std::swap(e.out.shape[1], e.out.shape[2]);
  std::swap(e.out.strides[1], e.out.strides[2]);
  EXPECT_ACCEPTED(e);
}

}  // namespace
}  // namespace attnkit
