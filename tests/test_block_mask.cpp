// BlockMask: visited tiles follow the mask's density; exact allowed-pair counts; varlen and
// fully masked rows through the public API.
#include <gtest/gtest.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <random>
#include <tuple>

#include "core/block_mask.h"
#include "core/mask_cache.h"
#include "cuda/fwd_params.h"
#include "cuda/tile_bits.h"
#include "fuzz.h"
#include "spec_json.h"

namespace attnkit::tools {
namespace {

core::BlockMask mask_of(const std::string& mech, Dims d, Instance& inst) {
  CheckOptions opt;
  opt.dims = d;
  EXPECT_EQ(make_instance(mech, opt, inst), "");
  Outputs o = make_outputs(inst, false);
  core::Problem p;
  EXPECT_TRUE(core::validate_and_resolve(inst.q.view, inst.k.view, inst.v.view, inst.spec,
                                         o.out.view, {}, {}, {}, false, &p)
                  .ok());
  return core::build_block_mask(p, 0, 0, false, 2);
}

TEST(BlockMask, CausalVisitsTheLowerTriangle) {
  Instance inst;
  const core::BlockMask bm = mask_of("causal", {1, 1, 1, 1024, 1024, 8, 8}, inst);
  EXPECT_EQ(bm.visited_tiles, 16 * 17 / 2);
  EXPECT_EQ(bm.partial_tiles, 16);
  EXPECT_EQ(bm.allowed_pairs, 1024 * 1025 / 2);
}

TEST(BlockMask, SlidingWindowCostFollowsTheWindow) {
  Instance inst;
  const core::BlockMask bm = mask_of("sliding_window", {1, 1, 1, 4096, 4096, 8, 8}, inst);
  // window 1024 left, causal: a 64-row tile touches at most 1024/64 + 2 key tiles.
  EXPECT_LE(bm.visited_tiles, 64 * (1024 / 64 + 2));
  int64_t pairs = 0;
  for (int64_t i = 0; i < 4096; ++i) pairs += std::min<int64_t>(i, 1024) + 1;
  EXPECT_EQ(bm.allowed_pairs, pairs);
}

TEST(BlockMask, Neighborhood2dTilesFollowTheGrid) {
  Instance inst;
  const core::BlockMask bm = mask_of("neighborhood_2d", {1, 1, 1, 4096, 4096, 8, 8}, inst);
  EXPECT_EQ(bm.allowed_pairs, 4096 * 169);  // every query has exactly 13 x 13 neighbours
  // 8 x 8 query boxes reach at most 3 x 3 key boxes: 576 of the 4096 tile pairs.
  EXPECT_LE(bm.visited_tiles, 64 * 9);
  EXPECT_GE(bm.visited_tiles, 64 * 4);
}

TEST(BlockMask, DocumentSkipsOtherDocuments) {
  Instance inst;
  const core::BlockMask bm = mask_of("document", {1, 1, 1, 1024, 1024, 8, 8}, inst);
  // 4 documents of 256 tokens (4 tiles each), causal inside: 4 x (4 * 5 / 2) tiles.
  EXPECT_EQ(bm.visited_tiles, 4 * 10);
  EXPECT_EQ(bm.allowed_pairs, 4 * (256 * 257 / 2));
}

TEST(BlockMask, DenseIsFull) {
  Instance inst;
  const core::BlockMask bm = mask_of("dense", {1, 1, 1, 200, 130, 8, 8}, inst);
  EXPECT_EQ(bm.visited_tiles, 4 * 3);
  EXPECT_EQ(bm.partial_tiles, 0);
  EXPECT_EQ(bm.allowed_pairs, 200 * 130);
}

// Varlen: packed sequences give the same rows as separate calls.
TEST(Varlen, MatchesSeparateSequences) {
  const std::vector<int32_t> cq = {0, 5, 5 + 70, 5 + 70 + 129}, ck = {0, 9, 9 + 70, 9 + 70 + 100};
  const int64_t hq = 4, hk = 2, d = 40, dv = 24;
  OwnedTensor q = random_tensor(DType::kF32, {cq.back(), hq, d}, 1.0, 1);
  OwnedTensor k = random_tensor(DType::kF32, {ck.back(), hk, d}, 1.0, 2);
  OwnedTensor v = random_tensor(DType::kF32, {ck.back(), hk, dv}, 1.0, 3);
  OwnedTensor out = OwnedTensor::zeros(DType::kF32, {cq.back(), hq, dv});
  OwnedTensor ref = OwnedTensor::zeros(DType::kF64, {cq.back(), hq, dv});
  OwnedTensor lse = OwnedTensor::zeros(DType::kF32, {hq, cq.back()});
  OwnedTensor lse_ref = OwnedTensor::zeros(DType::kF32, {hq, cq.back()});
  OwnedTensor cu_q = OwnedTensor::from_ints(cq, {4}), cu_k = OwnedTensor::from_ints(ck, {4});
  for (Mask m : {Mask::none(), Mask::causal(), Mask::sliding_window(7, 3)}) {
    AttentionSpec spec;
    spec.mask = m;
    spec.cu_seqlens_q = cu_q.view;
    spec.cu_seqlens_kv = cu_k.view;
    ASSERT_TRUE(attention_forward(q.view, k.view, v.view, spec, out.view, lse.view).ok());
    ASSERT_TRUE(reference_forward(q.view, k.view, v.view, spec, ref.view, lse_ref.view).ok());
    EXPECT_LE(rel_error(out.to_doubles(), ref.to_doubles()), 1e-5);
    EXPECT_LE(max_abs_error(lse.to_doubles(), lse_ref.to_doubles()), 1e-4);
  }
  // Each sequence against its own un-packed call through the oracle.
  AttentionSpec spec;
  spec.mask = Mask::causal();
  spec.cu_seqlens_q = cu_q.view;
  spec.cu_seqlens_kv = cu_k.view;
  ASSERT_TRUE(attention_forward(q.view, k.view, v.view, spec, out.view).ok());
  const std::vector<double> packed = out.to_doubles();
  for (int s = 0; s < 3; ++s) {
    TensorView qs = q.view, ks = k.view, vs = v.view, os;
    OwnedTensor one = OwnedTensor::zeros(DType::kF64, {1, cq[s + 1] - cq[s], hq, dv});
    auto slice = [](TensorView t, int64_t start, int64_t n) {
      TensorView r = t;
      r.data = static_cast<float*>(t.data) + start * t.strides[0];
      r.ndim = 4;
      r.shape[3] = t.shape[2];
      r.shape[2] = t.shape[1];
      r.shape[1] = n;
      r.shape[0] = 1;
      r.strides[3] = t.strides[2];
      r.strides[2] = t.strides[1];
      r.strides[1] = t.strides[0];
      r.strides[0] = n * t.strides[0];
      return r;
    };
    AttentionSpec one_spec;
    one_spec.mask = Mask::causal();
    one_spec.layout = Layout::kBNHD;
    ASSERT_TRUE(reference_forward(slice(qs, cq[s], cq[s + 1] - cq[s]),
                                  slice(ks, ck[s], ck[s + 1] - ck[s]),
                                  slice(vs, ck[s], ck[s + 1] - ck[s]), one_spec, one.view)
                    .ok());
    const std::vector<double> want = one.to_doubles();
    std::vector<double> got(packed.begin() + cq[s] * hq * dv, packed.begin() + cq[s + 1] * hq * dv);
    EXPECT_LE(rel_error(got, want), 1e-5) << "sequence " << s;
  }
}

// Packed sequences all empty on one side (cu_seqlens need only be non-decreasing): no pair
// anywhere, so rows of zeros with LSE -inf and every gradient zero (the CUDA backend's launches
// of empty grids failed such calls: its GPU test is test_torch.py's
// test_cuda_packed_rows_past_the_sequences).
TEST(Varlen, SequencesAllEmptyOnOneSide) {
  struct Packed {
    std::vector<int32_t> cq, ck;
    int64_t rows_q, rows_k;  // the packed tensors' rows: cu_seqlens may end before them
  };
  const Packed cases[] = {{{0, 3, 133, 138}, {0, 0, 0, 0}, 140, 3},
                          {{0, 0, 0}, {0, 70, 74}, 2, 74}};
  for (const Packed& c : cases) {
    const int64_t nq = c.rows_q, nk = c.rows_k, n = static_cast<int64_t>(c.cq.size());
    OwnedTensor q = random_tensor(DType::kF32, {nq, 4, 16}, 1.0, 1);
    OwnedTensor k = random_tensor(DType::kF32, {nk, 2, 16}, 1.0, 2);
    OwnedTensor v = random_tensor(DType::kF32, {nk, 2, 16}, 1.0, 3);
    OwnedTensor go = random_tensor(DType::kF32, {nq, 4, 16}, 1.0, 4);
    OwnedTensor cu_q = OwnedTensor::from_ints(c.cq, {n}), cu_k = OwnedTensor::from_ints(c.ck, {n});
    for (Mask m : {Mask::none(), Mask::causal(), Mask::chunked(16, false)}) {
      AttentionSpec spec;
      spec.mask = m;
      spec.cu_seqlens_q = cu_q.view;
      spec.cu_seqlens_kv = cu_k.view;
      OwnedTensor out = random_tensor(DType::kF32, {nq, 4, 16}, 1.0, 5);
      OwnedTensor lse = OwnedTensor::zeros(DType::kF32, {4, nq});
      Status st = attention_forward(q.view, k.view, v.view, spec, out.view, lse.view);
      ASSERT_TRUE(st.ok()) << st.message();
      const std::vector<double> o = out.to_doubles(), l = lse.to_doubles();
      for (int64_t x = 0; x < c.cq.back() * 4 * 16; ++x) ASSERT_EQ(o[x], 0.0);
      for (int64_t h = 0; h < 4; ++h)
        for (int64_t i = 0; i < c.cq.back(); ++i) ASSERT_EQ(l[h * nq + i], -INFINITY);
      AttentionGrads g;
      OwnedTensor dq = random_tensor(DType::kF32, {nq, 4, 16}, 1.0, 6);
      OwnedTensor dk = random_tensor(DType::kF32, {nk, 2, 16}, 1.0, 7);
      OwnedTensor dv = random_tensor(DType::kF32, {nk, 2, 16}, 1.0, 8);
      g.dq = dq.view, g.dk = dk.view, g.dv = dv.view;
      st = attention_backward(q.view, k.view, v.view, out.view, lse.view, go.view, spec, g);
      ASSERT_TRUE(st.ok()) << st.message();
      // Rows past the last sequence are padding, not gradients.
      for (const auto& [t, rows, heads] :
           {std::tuple{&dq, c.cq.back(), 4}, {&dk, c.ck.back(), 2}, {&dv, c.ck.back(), 2}}) {
        const std::vector<double> x = t->to_doubles();
        for (int64_t e = 0; e < rows * heads * 16; ++e) ASSERT_EQ(x[e], 0.0);
      }
    }
  }
}

// Rows of the packed tensors past the last sequence are padding: the output does not depend on
// them, so the backward writes zeros in their gradients (dq, dk, dv and either gate's dgate), on
// the CPU and in the oracle, over buffers that held something else (the CPU left dk's and dv's
// padding rows as it found them; CUDA's test is the CUDA fuzzer's varlen cases).
TEST(Varlen, PaddingRowsGetZeroGradients) {
  const std::vector<int32_t> cq = {0, 5, 12}, ck = {0, 7, 9};
  const int64_t rows_q = 15, rows_k = 14;  // 3 and 5 padding rows
  OwnedTensor q = random_tensor(DType::kF32, {rows_q, 2, 8}, 1.0, 1);
  OwnedTensor k = random_tensor(DType::kF32, {rows_k, 1, 8}, 1.0, 2);
  OwnedTensor v = random_tensor(DType::kF32, {rows_k, 1, 8}, 1.0, 3);
  OwnedTensor go = random_tensor(DType::kF32, {rows_q, 2, 8}, 1.0, 4);
  OwnedTensor cu_q = OwnedTensor::from_ints(cq, {3}), cu_k = OwnedTensor::from_ints(ck, {3});
  for (const GateKind gk : {GateKind::kElementwise, GateKind::kPerHead}) {
    const bool per_head = gk == GateKind::kPerHead;
    const std::vector<int64_t> gate_shape =
        per_head ? std::vector<int64_t>{2, rows_q} : std::vector<int64_t>{rows_q, 2, 8};
    OwnedTensor gate = random_tensor(DType::kF32, gate_shape, 1.0, 5);
    AttentionSpec spec;
    spec.mask = Mask::causal();
    spec.cu_seqlens_q = cu_q.view;
    spec.cu_seqlens_kv = cu_k.view;
    spec.gate_kind = gk;
    spec.gate = gate.view;
    OwnedTensor out = OwnedTensor::zeros(DType::kF32, {rows_q, 2, 8});
    OwnedTensor lse = OwnedTensor::zeros(DType::kF32, {2, rows_q});
    ASSERT_TRUE(attention_forward(q.view, k.view, v.view, spec, out.view, lse.view).ok());
    for (const bool oracle : {false, true}) {
      const DType t = oracle ? DType::kF64 : DType::kF32;
      auto filled = [&](std::vector<int64_t> shape) {
        int64_t n = 1;
        for (int64_t e : shape) n *= e;
        return OwnedTensor::from_doubles(std::vector<double>(n, 7.0), t, shape);
      };
      OwnedTensor dq = filled({rows_q, 2, 8}), dk = filled({rows_k, 1, 8}),
                  dv = filled({rows_k, 1, 8}), dg = filled(gate_shape);
      AttentionGrads g;
      g.dq = dq.view, g.dk = dk.view, g.dv = dv.view, g.dgate = dg.view;
      const Status st =
          oracle ? reference_backward(q.view, k.view, v.view, go.view, spec, g)
                 : attention_backward(q.view, k.view, v.view, out.view, lse.view, go.view, spec, g);
      ASSERT_TRUE(st.ok()) << st.message();
      // The padding rows are zero; the sequences' rows hold gradients (none left at 7).
      for (const auto& [x, real, per_row] : {std::tuple{&dq, int64_t{cq.back()}, 16},
                                             {&dk, int64_t{ck.back()}, 8},
                                             {&dv, int64_t{ck.back()}, 8}}) {
        const std::vector<double> e = x->to_doubles();
        for (int64_t i = 0; i < static_cast<int64_t>(e.size()); ++i) {
          if (i >= real * per_row)
            ASSERT_EQ(e[i], 0.0) << "oracle " << oracle << " element " << i;
          else
            ASSERT_NE(e[i], 7.0) << "oracle " << oracle << " element " << i;
        }
      }
      const std::vector<double> e = dg.to_doubles();
      for (size_t i = 0; i < e.size(); ++i) {
        const int64_t row =
            per_head ? static_cast<int64_t>(i) % rows_q : static_cast<int64_t>(i) / 16;
        if (row >= cq.back())
          ASSERT_EQ(e[i], 0.0) << "oracle " << oracle << " dgate " << i;
        else
          ASSERT_NE(e[i], 7.0) << "oracle " << oracle << " dgate " << i;
      }
    }
  }
}

// The forget gate's prefix sums c grow with the row (c = sum of log f): c[i'] - c[j] of two
// large sums lost ~ulp(|c|) in fp32 (weights off by ~1% once |c| passed 1e5). Steep decay for
// 300 tokens (c reaches -1.2e5), then slow: the rows after it against the float64 oracle, in
// fp32 and forward and backward.
TEST(ForgetGate, LongPrefixesKeepTheirPrecision) {
  const int64_t n = 600;
  OwnedTensor q = random_tensor(DType::kF32, {1, 1, n, 16}, 1.0, 11);
  OwnedTensor k = random_tensor(DType::kF32, {1, 1, n, 16}, 1.0, 12);
  OwnedTensor v = random_tensor(DType::kF32, {1, 1, n, 16}, 1.0, 13);
  OwnedTensor lf = OwnedTensor::zeros(DType::kF32, {1, 1, n});
  for (int64_t j = 0; j < n; ++j)
    static_cast<float*>(lf.view.data)[j] = j < 300 ? -400.f : -1e-3f * static_cast<float>(j % 7);
  AttentionSpec spec;
  spec.mask = Mask::causal();
  spec.mods.forget_log_f = lf.view;
  OwnedTensor out = OwnedTensor::zeros(DType::kF32, {1, 1, n, 16});
  OwnedTensor ref = OwnedTensor::zeros(DType::kF64, {1, 1, n, 16});
  ASSERT_TRUE(attention_forward(q.view, k.view, v.view, spec, out.view).ok());
  ASSERT_TRUE(reference_forward(q.view, k.view, v.view, spec, ref.view).ok());
  EXPECT_LE(rel_error(out.to_doubles(), ref.to_doubles()), 1e-5);
  // The backward: dq, dk, dv and dlog_f against the oracle's.
  OwnedTensor go = random_tensor(DType::kF32, {1, 1, n, 16}, 1.0, 14);
  OwnedTensor lse = OwnedTensor::zeros(DType::kF32, {1, 1, n});
  ASSERT_TRUE(attention_forward(q.view, k.view, v.view, spec, out.view, lse.view).ok());
  std::vector<OwnedTensor> g, gr;
  for (int x = 0; x < 2; ++x) {
    std::vector<OwnedTensor>& t = x == 0 ? g : gr;
    const DType dt = x == 0 ? DType::kF32 : DType::kF64;
    for (int y = 0; y < 3; ++y) t.push_back(OwnedTensor::zeros(dt, {1, 1, n, 16}));
    t.push_back(OwnedTensor::zeros(dt, {1, 1, n}));
  }
  AttentionGrads a, b;
  a.dq = g[0].view, a.dk = g[1].view, a.dv = g[2].view, a.dforget_log_f = g[3].view;
  b.dq = gr[0].view, b.dk = gr[1].view, b.dv = gr[2].view, b.dforget_log_f = gr[3].view;
  ASSERT_TRUE(
      attention_backward(q.view, k.view, v.view, out.view, lse.view, go.view, spec, a).ok());
  ASSERT_TRUE(reference_backward(q.view, k.view, v.view, go.view, spec, b).ok());
  for (int y = 0; y < 4; ++y)
    EXPECT_LE(rel_error(g[y].to_doubles(), gr[y].to_doubles()), 1e-4) << "gradient " << y;
}

// An additive mask of fp32's lowest value on half of a row's keys (Hugging Face's): the
// entropy's running sum rescaled by exp(m - m_new) = 0 took 0 * -inf (l (m - m_new) overflowed)
// and gave NaN. Against the float64 oracle.
TEST(Statistics, EntropyWithLowestValueBias) {
  const int64_t n = 400;
  OwnedTensor q = random_tensor(DType::kF32, {1, 1, n, 16}, 1.0, 21);
  OwnedTensor k = random_tensor(DType::kF32, {1, 1, n, 16}, 1.0, 22);
  OwnedTensor v = random_tensor(DType::kF32, {1, 1, n, 16}, 1.0, 23);
  OwnedTensor bias = OwnedTensor::zeros(DType::kF32, {1, 1, n, n});
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n / 2; ++j)
      static_cast<float*>(bias.view.data)[i * n + j] = -3.4028235e38f;
  AttentionSpec spec;
  spec.mods.bias = bias.view;
  std::vector<std::vector<double>> got;
  for (int x = 0; x < 2; ++x) {
    const DType dt = x == 0 ? DType::kF32 : DType::kF64;
    OwnedTensor out = OwnedTensor::zeros(dt, {1, 1, n, 16});
    OwnedTensor ent = OwnedTensor::zeros(DType::kF32, {1, 1, n});
    OwnedTensor rmax = OwnedTensor::zeros(DType::kF32, {1, 1, n});
    AttentionStats st;
    st.entropy = ent.view;
    st.row_max = rmax.view;
    const Status s = x == 0 ? attention_forward(q.view, k.view, v.view, spec, out.view, {}, st)
                            : reference_forward(q.view, k.view, v.view, spec, out.view, {}, st);
    ASSERT_TRUE(s.ok()) << s.message();
    got.push_back(ent.to_doubles());
  }
  for (double e : got[0]) ASSERT_TRUE(std::isfinite(e));
  EXPECT_LE(max_abs_error(got[0], got[1]), 1e-4);
}

// Values that take fp32 intermediates out of their range (tools' range_cases): the normalized
// kernel's weights f(s)^p for whole rows (it summed them to 0, inf or NaN; it runs as a softmax
// over p log f(s) now), sigmoid and its gate saturated (P (1 - P) and 1 - sigmoid(G) gave 0
// gradients past ~17). The CPU in fp32 against the float64 oracle, forward and backward.
TEST(RangeCases, MatchTheOracle) {
  for (tools::RangeCase& rc : tools::range_cases(DType::kF32, 77, 16)) {
    SCOPED_TRACE(rc.name);
    const tools::Instance& in = rc.inst;
    const tools::BesideOracle r =
        tools::run_beside_oracle(in.q, in.k, in.v, rc.grad_out, in.spec, Device::kCPU);
    ASSERT_EQ(r.error, "");
    for (double o : r.got[0]) ASSERT_TRUE(std::isfinite(o));
    const bool stat = in.wants_row_stat();
    if (rc.empty_rows) {
      EXPECT_GT(std::count(r.want[1].begin(), r.want[1].end(), -INFINITY), 0);
    }
    EXPECT_LE(rel_error(r.got[0], r.want[0]), 1e-5) << "out";
    if (stat) {
      EXPECT_LE(max_abs_error(r.got[1], r.want[1]), 1e-4) << "row stat";
    }
    for (size_t y = stat ? 2 : 1; y < r.got.size(); ++y) {
      // (a zero reference would make rel_error absolute: saturated gradients are ~1e-17)
      EXPECT_GT(max_abs_error(r.want[y], std::vector<double>(r.want[y].size())), 0);
      EXPECT_LE(rel_error(r.got[y], r.want[y]), 1e-4) << "gradient " << y - (stat ? 2 : 1);
    }
  }
}

// An additive mask of fp32's lowest value (Hugging Face's): on the CPU such scores are finite
// ones, so a row of nothing else weighs its keys evenly (as the oracle and a naive fp32
// computation do) and other rows' lowest keys get weight 0 (DESIGN.md numerics; CUDA counts
// scores below -FLT_MAX / log2 e as masked instead). Found by the fuzzer's masking biases.
void lowest_value_rows(DType t);

TEST(Bias, LowestValueRowsMatchTheOracle) {
  for (const DType t : {DType::kF32, DType::kBF16}) {
    SCOPED_TRACE(dtype_name(t));
    lowest_value_rows(t);
  }
}

void lowest_value_rows(DType t) {
  const int64_t nq = 5, nk = 133;
  const bool f32 = t == DType::kF32;
  OwnedTensor q = random_tensor(t, {1, 1, nq, 8}, 5.0, 1);
  OwnedTensor k = random_tensor(t, {1, 1, nk, 8}, 5.0, 2);
  OwnedTensor v = random_tensor(t, {1, 1, nk, 8}, 1.0, 3);
  OwnedTensor bias = random_tensor(DType::kF32, {1, 1, nq, nk}, 1.0, 4);
  float* bv = static_cast<float*>(bias.view.data);
  for (int64_t j = 0; j < nk; ++j) bv[j] = -FLT_MAX;  // row 0: nothing else
  for (int64_t i = 1; i < nq; ++i)
    for (int64_t j = 0; j < nk; ++j)
      if ((i + j) % 3 != 0) bv[i * nk + j] = -FLT_MAX;
  AttentionSpec spec;
  spec.mods.alibi = AlibiMode::kSymmetric;
  spec.mods.bias = bias.view;
  OwnedTensor out = OwnedTensor::zeros(t, {1, 1, nq, 8});
  OwnedTensor lse = OwnedTensor::zeros(DType::kF32, {1, 1, nq});
  OwnedTensor ref = OwnedTensor::zeros(DType::kF64, {1, 1, nq, 8});
  OwnedTensor ref_lse = OwnedTensor::zeros(DType::kF32, {1, 1, nq});
  OwnedTensor e = OwnedTensor::zeros(DType::kF32, {1, 1, nq});
  OwnedTensor ref_e = OwnedTensor::zeros(DType::kF32, {1, 1, nq});
  AttentionStats st, ref_st;
  st.entropy = e.view;
  ref_st.entropy = ref_e.view;
  ASSERT_TRUE(attention_forward(q.view, k.view, v.view, spec, out.view, lse.view, st).ok());
  ASSERT_TRUE(reference_forward(q.view, k.view, v.view, spec, ref.view, ref_lse.view, ref_st).ok());
  const std::vector<double> o = out.to_doubles(), r = ref.to_doubles();
  for (int64_t i = 0; i < nq; ++i) {
    std::vector<double> oi(o.begin() + i * 8, o.begin() + i * 8 + 8),
        ri(r.begin() + i * 8, r.begin() + i * 8 + 8);
    EXPECT_LE(rel_error(oi, ri), f32 ? 1e-5 : 1e-2) << "row " << i;
    EXPECT_NEAR(e.to_doubles()[i], ref_e.to_doubles()[i], f32 ? 1e-4 : 1e-2)
        << "entropy, row " << i;
  }
  EXPECT_NEAR(ref_e.to_doubles()[0], std::log(static_cast<double>(nk)), 1e-6);  // even weights
  // Without statistics (bf16: the softmax step on AVX-512 vectors, whose s log2 e - m log2 e was
  // -inf - -inf on such rows: NaN output, LSE +inf): the same output and LSE.
  OwnedTensor out2 = OwnedTensor::zeros(t, {1, 1, nq, 8});
  ASSERT_TRUE(attention_forward(q.view, k.view, v.view, spec, out2.view, lse.view).ok());
  EXPECT_LE(rel_error(out2.to_doubles(), r), f32 ? 1e-5 : 1e-2);
  for (int64_t i = 0; i < nq; ++i)
    EXPECT_NEAR(lse.to_doubles()[i], ref_lse.to_doubles()[i],
                1e-3 * std::abs(ref_lse.to_doubles()[i]));
  // The backward: never NaN or inf (row 0's gradients are those of exp(S - LSE) with LSE = m,
  // which fp32 holds without log l: its upstream gradient is 0 here, as a padding row's).
  std::vector<double> gv = random_tensor(DType::kF32, {1, 1, nq, 8}, 1.0, 5).to_doubles();
  std::fill(gv.begin(), gv.begin() + 8, 0.0);
  const OwnedTensor go = OwnedTensor::from_doubles(gv, t, {1, 1, nq, 8});
  OwnedTensor dq = zeros_like(q, DType::kF32), dk = zeros_like(k, DType::kF32),
              dv = zeros_like(v, DType::kF32), db = zeros_like(bias, DType::kF32);
  AttentionGrads g{dq.view, dk.view, dv.view};
  g.dbias = db.view;
  ASSERT_TRUE(
      attention_backward(q.view, k.view, v.view, out.view, lse.view, go.view, spec, g).ok());
  OwnedTensor rq = zeros_like(q, DType::kF64), rk = zeros_like(k, DType::kF64),
              rv = zeros_like(v, DType::kF64), rb = zeros_like(bias, DType::kF64);
  AttentionGrads rg{rq.view, rk.view, rv.view};
  rg.dbias = rb.view;
  ASSERT_TRUE(reference_backward(q.view, k.view, v.view, go.view, spec, rg).ok());
  for (const auto& [name, x, y] :
       {std::tuple{"dq", &dq, &rq}, {"dk", &dk, &rk}, {"dv", &dv, &rv}, {"dbias", &db, &rb}}) {
    for (double e : x->to_doubles()) ASSERT_TRUE(std::isfinite(e)) << name;
    EXPECT_LE(rel_error(x->to_doubles(), y->to_doubles()), f32 ? 1e-4 : 3e-2) << name;
  }
}

// Rows with no allowed key: output 0, LSE -inf (sink_h with sinks), never NaN.
TEST(FullyMasked, ZeroOutputAndMinusInfLse) {
  for (bool sink : {false, true}) {
    Instance inst;
    CheckOptions opt;
    opt.dims = {1, 2, 2, 150, 37, 16, 16};  // causal bottom-right: rows 0..112 see nothing
    ASSERT_EQ(make_instance(sink ? "sink" : "causal", opt, inst), "");
    Outputs o = make_outputs(inst, true);
    ASSERT_TRUE(attention_forward(inst.q.view, inst.k.view, inst.v.view, inst.spec, o.out.view,
                                  o.row_stat.view, stats_views(o))
                    .ok());
    const std::vector<double> out = o.out.to_doubles(), lse = o.row_stat.to_doubles();
    const std::vector<double> ent = o.entropy.to_doubles();
    for (int64_t h = 0; h < 2; ++h)
      for (int64_t i = 0; i < 150; ++i) {
        const double l = lse[h * 150 + i];
        ASSERT_FALSE(std::isnan(l));
        ASSERT_FALSE(std::isnan(ent[h * 150 + i]));
        if (i < 150 - 37) {
          if (sink) {
            EXPECT_EQ(l, reinterpret_cast<const float*>(inst.extras["sinks"].bytes.data())[h]);
          } else {
            EXPECT_EQ(l, -INFINITY);
          }
          EXPECT_EQ(ent[h * 150 + i], 0.0);
          for (int64_t c = 0; c < 16; ++c) EXPECT_EQ(out[(h * 150 + i) * 16 + c], 0.0);
        } else {
          EXPECT_TRUE(std::isfinite(l));
        }
      }
  }
}

// Every visited tile's bits (fast paths included) equal the per-element allowed hook, and every
// skipped tile has no allowed pair: grids in 1-3 dims, causal dims, dilation, odd box edges.
TEST(BlockMask, BitsMatchElementRule) {
  struct G {
    std::vector<int64_t> shape, kernel, dilation;
    std::vector<bool> causal;
  };
  const G grids[] = {{{20, 27}, {5, 7}, {1, 1}, {false, false}},
                     {{13, 70}, {13, 3}, {1, 1}, {false, true}},
                     {{9, 10, 11}, {3, 5, 3}, {1, 1, 1}, {true, false, false}},
                     {{16, 18}, {3, 3}, {2, 3}, {false, false}},
                     {{1, 100}, {1, 9}, {1, 1}, {false, false}},
                     {{5, 6}, {3, 5}, {1, 1}, {true, false}}};
  for (const G& g : grids) {
    int64_t n = 1;
    for (int64_t x : g.shape) n *= x;
    OwnedTensor q = random_tensor(DType::kF32, {1, 1, n, 8}, 1.0, 1);
    OwnedTensor out = OwnedTensor::zeros(DType::kF32, {1, 1, n, 8});
    AttentionSpec spec;
    spec.mask = Mask::neighborhood(g.shape, g.kernel, g.dilation, g.causal);
    core::Problem p;
    ASSERT_TRUE(
        core::validate_and_resolve(q.view, q.view, q.view, spec, out.view, {}, {}, {}, false, &p)
            .ok());
    const core::BlockMask bm = core::build_block_mask(p, 0, 0, false, 1);
    const MaskEval e = p.mask_eval(0, 0);
    int64_t pairs = 0;
    for (int64_t t = 0; t < bm.q.num_tiles(); ++t) {
      const TileTokens qt = bm.q.tile(t);
      std::vector<int> seen(bm.k.num_tiles(), 0);
      for (int64_t x = bm.row_begin[t]; x < bm.row_begin[t + 1]; ++x) {
        const core::BlockEntry& ent = bm.entries[x];
        seen[ent.k_tile] = 1;
        const TileTokens kt = bm.k.tile(ent.k_tile);
        for (int64_t r = 0; r < qt.count; ++r)
          for (int64_t c = 0; c < kt.count; ++c) {
            const bool want = e.allowed(qt.at(r), kt.at(c));
            const bool got = ent.cls == TileClass::kFull || ((bm.bits[ent.bits + r] >> c) & 1);
            ASSERT_EQ(got, want) << "grid " << g.shape.size() << "-D, tile " << t << " row " << r;
          }
      }
      for (int64_t u = 0; u < bm.k.num_tiles(); ++u) {
        if (seen[u]) continue;
        const TileTokens kt = bm.k.tile(u);
        for (int64_t r = 0; r < qt.count; ++r)
          for (int64_t c = 0; c < kt.count; ++c) ASSERT_FALSE(e.allowed(qt.at(r), kt.at(c)));
      }
    }
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) pairs += e.allowed(i, j);
    EXPECT_EQ(bm.allowed_pairs, pairs);
  }
}

// Causal & a leaf with a causal form (either order) is that leaf made causal, one node, allowing
// exactly the pairs both allow (nq < nk: the causal offset); other ands keep their tree.
TEST(Masks, CausalAndALeafWithACausalFormIsOneNode) {
  const int64_t nq = 23, nk = 37;
  std::vector<int> sq(nq), sk(nk);
  for (int64_t i = 0; i < nq; ++i) sq[i] = static_cast<int>((i + nk - nq) / 9);
  for (int64_t j = 0; j < nk; ++j) sk[j] = static_cast<int>(j / 9);
  OwnedTensor seg_q = OwnedTensor::from_ints(sq, {nq}), seg_k = OwnedTensor::from_ints(sk, {nk});
  OwnedTensor seg_b = OwnedTensor::from_ints(sk, {nk});
  struct Case {
    Mask leaf;
    bool kv_only;  // block attention: one segment tensor, nq = nk
  };
  const Case cases[] = {{Mask::document(seg_q.view, seg_k.view), false},
                        {Mask::chunked(8), false},
                        {Mask::block_attention(seg_b.view), true}};
  for (const Case& c : cases) {
    const int64_t rows = c.kv_only ? nk : nq;
    OwnedTensor q = random_tensor(DType::kF32, {1, 1, rows, 8}, 1.0, 1);
    OwnedTensor k = random_tensor(DType::kF32, {1, 1, nk, 8}, 1.0, 2);
    OwnedTensor out = OwnedTensor::zeros(DType::kF32, {1, 1, rows, 8});
    // (the problem keeps a pointer to its spec)
    auto eval = [&](const Mask& m, AttentionSpec& spec, core::Problem& p) {
      spec.mask = m;
      EXPECT_TRUE(
          core::validate_and_resolve(q.view, k.view, k.view, spec, out.view, {}, {}, {}, false, &p)
              .ok());
      return p.mask_eval(0, 0);
    };
    const char* name = mask_kind_name(c.leaf.nodes[0].kind);
    for (const Mask& m : {Mask::causal() & c.leaf, c.leaf & Mask::causal()}) {
      ASSERT_EQ(m.nodes.size(), 1u) << name;
      EXPECT_EQ(m.nodes[0].kind, c.leaf.nodes[0].kind) << name;
      EXPECT_TRUE(m.nodes[0].causal) << name;
      if (c.kv_only) {  // block attention's node as built: the same mask, the same cache key
        AttentionSpec a, l;
        a.mask = m;
        l.mask = c.leaf;
        EXPECT_EQ(core::mask_fingerprint(a), core::mask_fingerprint(l));
      }
      AttentionSpec sf, sl;
      core::Problem pf, pl;
      const MaskEval folded = eval(m, sf, pf), leaf = eval(c.leaf, sl, pl);
      int64_t allowed = 0;
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < nk; ++j) {
          const bool want = leaf.allowed(i, j) && j <= i + (nk - rows);
          ASSERT_EQ(folded.allowed(i, j), want) << name << " " << i << " " << j;
          allowed += want;
        }
      EXPECT_GT(allowed, 0) << name;
    }
  }
  EXPECT_EQ((Mask::causal() & Mask::sliding_window(4, 0)).nodes.size(), 3u);
  EXPECT_EQ((Mask::causal() & Mask::causal()).nodes.size(), 3u);
  EXPECT_EQ((Mask::causal() & (Mask::chunked(8) & Mask::sliding_window(2, 2))).nodes.size(), 5u);
}

// Grid coordinates in 32 bits (the CUDA bits pass, where narrow_grid) equal the 64-bit ones,
// and a neighborhood's split test (query half, key half) is the leaf's rule, in either width:
// 1-3 dims, dilation, causal dims, edges.
TEST(Masks, NeighborhoodSplitTestIsTheLeafRule) {
  struct G {
    std::vector<int64_t> shape, kernel, dilation;
    std::vector<bool> causal;
  };
  const G grids[] = {{{37}, {7}, {2}, {false}},
                     {{13, 70}, {13, 3}, {1, 1}, {false, true}},
                     {{9, 10, 11}, {3, 5, 3}, {1, 2, 1}, {true, false, false}},
                     {{16, 18}, {3, 3}, {2, 3}, {false, false}}};
  MaskEval e;
  for (const G& g : grids) {
    const Mask m = Mask::neighborhood(g.shape, g.kernel, g.dilation, g.causal);
    const MaskNode& n = m.nodes[0];
    ASSERT_TRUE(MaskEval::narrow_grid(n));
    int64_t count = 1;
    for (int64_t x : g.shape) count *= x;
    for (int64_t i = 0; i < count; ++i) {
      int64_t c64[kMaxGridDims] = {}, c32[kMaxGridDims] = {};
      MaskEval::coords(n, i, c64);
      MaskEval::coords<uint32_t>(n, i, c32);
      for (int d = 0; d < kMaxGridDims; ++d) ASSERT_EQ(c32[d], c64[d]) << i;
      const auto q = MaskEval::na_side(n, i, true);
      const auto q32 = MaskEval::na_side<uint32_t>(n, i, true);
      for (int64_t j = 0; j < count; ++j) {
        const bool want = e.allowed_leaf(n, i, j);
        ASSERT_EQ(MaskEval::na_allowed(n, q, MaskEval::na_side(n, j, false)), want)
            << i << " " << j;
        ASSERT_EQ(MaskEval::na_allowed(n, q32, MaskEval::na_side<uint32_t>(n, j, false)), want);
      }
    }
  }
  // An extent of 2^32 or more is not narrow; 64-bit coordinates stay row-major past 2^32.
  const Mask wide = Mask::neighborhood({5, int64_t{1} << 32, 7}, {3, 5, 3});
  EXPECT_FALSE(MaskEval::narrow_grid(wide.nodes[0]));
  for (int64_t x : {int64_t{1} << 32, (int64_t{1} << 34) + 77}) {
    int64_t c[kMaxGridDims] = {};
    MaskEval::coords(wide.nodes[0], x, c);
    EXPECT_EQ((c[0] * (int64_t{1} << 32) + c[1]) * 7 + c[2], x);
  }
}

// The fast forward's grid tiles (cuda/tile_bits.h): each query patch's key boxes, with each
// thread's window bits, allow exactly the leaf's pairs, each key once (boxes past the grid's edge
// allow nothing there), for both box widths: edges, causal dims, one-column kernels, kernels as
// wide as the grid, grids whose extents are not multiples of the patch's (their last patches
// reach past the grid: only the queries inside count).
TEST(BlockMask, GridKeyBoxesAllowEachWindowOnce) {
  struct G {
    int h, w, kr, kc;
    bool cr, cc;
  };
  const G grids[] = {
      {24, 48, 13, 13, false, false}, {16, 32, 3, 5, false, true},  {8, 64, 7, 31, true, false},
      {32, 16, 9, 1, false, false},   {16, 48, 1, 17, true, true},  {16, 32, 16, 31, true, false},
      {8, 32, 7, 32, false, true},    {14, 14, 7, 7, false, false}, {20, 44, 13, 13, false, false},
      {9, 37, 3, 5, true, true},      {56, 56, 7, 7, false, false}, {5, 11, 5, 11, false, false}};
  MaskEval e;
  for (const G& gr : grids)
    for (int key_w : {16, 32}) {
      if (key_w == 32 && gr.w < 32) continue;  // (16 wherever the grid is narrower)
      const Mask m = Mask::neighborhood({gr.h, gr.w}, {gr.kr, gr.kc}, {1, 1}, {gr.cr, gr.cc});
      const MaskNode& n = m.nodes[0];
      cuda::GridShape shape;
      shape.h = gr.h, shape.w = gr.w, shape.kernel[0] = gr.kr, shape.kernel[1] = gr.kc;
      shape.causal[0] = gr.cr, shape.causal[1] = gr.cc;
      const cuda::GridShape g = shape.with_key_w(key_w);
      // Each query inside the grid is one thread row's token, once over all patches (grid_token
      // as the kernel's row_i); the rest map to none.
      std::vector<int> stored(static_cast<size_t>(g.h) * g.w, 0);
      for (int pr0 = 0; pr0 < g.h; pr0 += cuda::kGridRows)
        for (int pc0 = 0; pc0 < g.w; pc0 += cuda::kGridCols)
          for (int a = 0; a < cuda::kGridRows; ++a)
            for (int l4 = 0; l4 < 8; ++l4)
              for (int q = 0; q < 2; ++q) {
                const int qr = pr0 + a, qc = pc0 + l4 + 8 * q;
                const int tok = cuda::grid_token(g, qr, qc, -1);
                ASSERT_EQ(tok >= 0, qr < g.h && qc < g.w);
                if (tok >= 0) ++stored[tok];
              }
      for (int x : stored) ASSERT_EQ(x, 1) << g.h << "x" << g.w;
      for (int pr0 = 0; pr0 < g.h; pr0 += cuda::kGridRows)
        for (int pc0 = 0; pc0 < g.w; pc0 += cuda::kGridCols) {
          const cuda::GridKeys keys = cuda::grid_keys(g, pr0, pc0);
          ASSERT_GE(keys.rows, 1);
          ASSERT_GE(keys.cols, 1);
          // Each query's allowed keys, counted over the boxes (bits) and over the grid (rule).
          std::vector<int> seen(cuda::kGridRows * cuda::kGridCols, 0);
          for (int t = 0; t < keys.rows * keys.cols; ++t) {
            const int kr = keys.r0 + t / keys.cols * g.key_h;
            const int kc = keys.c0 + t % keys.cols * g.key_w;
            int64_t pairs = 0;  // no box without an allowed pair (none wasted)
            for (int a = 0; a < cuda::kGridRows; ++a)
              for (int l4 = 0; l4 < 8; ++l4)
                for (int col0 = 0; col0 < 8; col0 += 2) {
                  uint32_t allow[2];
                  cuda::grid_words(g, pr0 + a, pc0 + l4, kr, kc, col0, allow);
                  for (int q = 0; q < 2; ++q)
                    for (int c = 0; c < 16; ++c)
                      for (int x = 0; x < 2; ++x) {
                        const int key = c * 8 + col0 + x;  // the tile's key
                        const int yr = kr + key / g.key_w, yc = kc + key % g.key_w;
                        const int qc = pc0 + l4 + 8 * q;
                        if (pr0 + a >= g.h || qc >= g.w) continue;  // a query past the grid
                        const bool in = yr < g.h && yc < g.w;
                        const bool want = in && e.allowed_leaf(n, int64_t{pr0 + a} * g.w + qc,
                                                               int64_t{yr} * g.w + yc);
                        const bool got = (allow[q] >> (2 * c + x)) & 1u;
                        ASSERT_EQ(got, want) << g.h << "x" << g.w << " key_w " << key_w << " patch "
                                             << pr0 << "," << pc0 << " box " << t;
                        seen[a * cuda::kGridCols + qc - pc0] += got;
                        pairs += got;
                      }
                }
            ASSERT_GT(pairs, 0) << g.h << "x" << g.w << " key_w " << key_w << " patch " << pr0
                                << "," << pc0 << " box " << t;
          }
          for (int a = 0; a < cuda::kGridRows && pr0 + a < g.h; ++a)
            for (int b = 0; b < cuda::kGridCols && pc0 + b < g.w; ++b) {
              int64_t want = 0;
              const int64_t i = int64_t{pr0 + a} * g.w + pc0 + b;
              for (int64_t j = 0; j < int64_t{g.h} * g.w; ++j) want += e.allowed_leaf(n, i, j);
              ASSERT_EQ(seen[a * cuda::kGridCols + b], want) << "query " << i;
            }
        }
    }
  // The width with the fewest boxes: 13 x 13 on 64 x 128 takes 32 (a 20 x 28 reach: 5 boxes of
  // 4 x 32 against 6 of 8 x 16), 31 x 31 takes 16.
  cuda::GridShape g;
  g.h = 64, g.w = 128, g.kernel[0] = g.kernel[1] = 13;
  EXPECT_EQ(cuda::grid_key_width(g), 32);
  g.kernel[0] = g.kernel[1] = 31;
  EXPECT_EQ(cuda::grid_key_width(g), 16);
  // Grid tiles where their patches hold at least a quarter of their rows in queries.
  for (auto [h, w, worth] : {std::tuple{64, 128, true},
                             {14, 14, true},
                             {9, 37, true},
                             {40, 4, true},
                             {40, 3, false},
                             {40, 2, false},
                             {2, 16, true},
                             {1, 16, false},
                             {8, 8, true}}) {
    cuda::GridShape s;
    s.h = h, s.w = w;
    EXPECT_EQ(cuda::grid_tiles_worth_it(s), worth) << h << "x" << w;
  }
  // A forced width where it is one of the two and fits; else the choice above.
  EXPECT_EQ(cuda::grid_key_width(g, 32), 32);
  EXPECT_EQ(cuda::grid_key_width(g, 7), 16);
  g.w = 16;
  g.kernel[0] = g.kernel[1] = 13;
  EXPECT_EQ(cuda::grid_key_width(g, 32), 16);
}

// A per-head block map of 64-token blocks: each head visits exactly its nonzero cells, all full.
TEST(BlockMask, BlockMapVisitsItsCellsPerHead) {
  const int64_t n = 512, blocks = n / 64, hq = 3;
  std::vector<int32_t> cells(hq * blocks * blocks);
  for (size_t x = 0; x < cells.size(); ++x) cells[x] = (x * 7 + x / 5) % 3 == 0;
  OwnedTensor map = OwnedTensor::from_ints(cells, {1, hq, blocks, blocks});
  OwnedTensor q = random_tensor(DType::kF32, {1, hq, n, 16}, 1.0, 3);
  OwnedTensor out = OwnedTensor::zeros(DType::kF32, {1, hq, n, 16});
  AttentionSpec spec;
  spec.mask = Mask::block_map(map.view, 64, 64);
  core::Problem p;
  ASSERT_TRUE(
      core::validate_and_resolve(q.view, q.view, q.view, spec, out.view, {}, {}, {}, false, &p)
          .ok());
  ASSERT_TRUE(p.mask_per_head);
  const core::BlockMaskSet set = core::build_block_masks(p, false, 1);
  int64_t total = 0;
  for (int64_t h = 0; h < hq; ++h) {
    int64_t on = 0;
    for (int64_t x = 0; x < blocks * blocks; ++x) on += cells[h * blocks * blocks + x];
    const core::BlockMask& bm = set.of(0, h);
    EXPECT_EQ(bm.visited_tiles, on) << h;
    EXPECT_EQ(bm.full_tiles, on) << h;
    EXPECT_EQ(bm.allowed_pairs, on * 64 * 64) << h;
    total += bm.allowed_pairs;
  }
  EXPECT_EQ(core::allowed_pairs(p), total);
}

TEST(BlockMask, BlockMapShapeIsChecked) {
  OwnedTensor map = OwnedTensor::from_ints(std::vector<int32_t>(2 * 3, 1), {1, 1, 2, 3});
  OwnedTensor q = random_tensor(DType::kF32, {1, 2, 128, 16}, 1.0, 3);
  OwnedTensor out = OwnedTensor::zeros(DType::kF32, {1, 2, 128, 16});
  AttentionSpec spec;
  spec.mask = Mask::block_map(map.view, 64, 64);  // needs [.., 2, 2]
  const Status s = attention_forward(q.view, q.view, q.view, spec, out.view);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("block_map.shape"), std::string::npos) << s.message();
}

// Packed varlen sequences have no per-sequence map layout yet: refused with the reason.
TEST(BlockMask, BlockMapWithVarlenIsRefused) {
  OwnedTensor map = OwnedTensor::from_ints(std::vector<int32_t>(4, 1), {1, 1, 2, 2});
  OwnedTensor q = random_tensor(DType::kF32, {100, 2, 16}, 1.0, 3);
  OwnedTensor out = OwnedTensor::zeros(DType::kF32, {100, 2, 16});
  OwnedTensor cu = OwnedTensor::from_ints({0, 40, 100}, {3});
  AttentionSpec spec;
  spec.mask = Mask::block_map(map.view, 64, 64);
  spec.cu_seqlens_q = cu.view;
  spec.cu_seqlens_kv = cu.view;
  const Status s = attention_forward(q.view, q.view, q.view, spec, out.view);
  EXPECT_EQ(s.code(), StatusCode::kNotImplemented) << s.message();
  EXPECT_NE(s.message().find("block_map with cu_seqlens"), std::string::npos) << s.message();
}

// A MaskCache serves one mask: its fingerprint tells masks apart by every node field, parameter,
// tensor address and the alignment, and equals for the same mask built twice.
TEST(MaskCache, FingerprintTellsMasksApart) {
  OwnedTensor seg = OwnedTensor::from_ints({0, 0, 1, 1}, {4});
  OwnedTensor seg2 = OwnedTensor::from_ints({0, 0, 1, 1}, {4});
  auto key = [](const Mask& m, Alignment a = Alignment::kBottomRight) {
    AttentionSpec spec;
    spec.mask = m;
    spec.alignment = a;
    return core::mask_fingerprint(spec);
  };
  const std::string doc = key(Mask::document(seg.view) & Mask::causal());
  EXPECT_EQ(doc, key(Mask::document(seg.view) & Mask::causal()));
  EXPECT_NE(doc, key(Mask::document(seg2.view) & Mask::causal()));  // another tensor
  EXPECT_NE(doc, key(Mask::document(seg.view)));
  EXPECT_NE(doc, key(Mask::document(seg.view) & Mask::causal(), Alignment::kTopLeft));
  const std::string na = key(Mask::neighborhood({8, 16}, {5, 7}));
  EXPECT_EQ(na, key(Mask::neighborhood({8, 16}, {5, 7})));
  EXPECT_NE(na, key(Mask::neighborhood({8, 16}, {7, 5})));
  EXPECT_NE(na, key(Mask::neighborhood({8, 16}, {5, 7}, {1, 2})));
  EXPECT_NE(key(Mask::sliding_window(3, 4)), key(Mask::sliding_window(4, 3)));
}

// The CPU backend ignores Options::mask_cache: the same output, nothing cached.
TEST(MaskCache, TheCpuIgnoresIt) {
  OwnedTensor q = random_tensor(DType::kF32, {1, 2, 16, 8}, 1.0, 5);
  OwnedTensor seg = OwnedTensor::from_ints({0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2}, {16});
  OwnedTensor a = OwnedTensor::zeros(DType::kF32, {1, 2, 16, 8});
  OwnedTensor b = OwnedTensor::zeros(DType::kF32, {1, 2, 16, 8});
  AttentionSpec spec;
  spec.mask = Mask::document(seg.view);
  MaskCache cache;
  Options with;
  with.mask_cache = &cache;
  ASSERT_TRUE(attention_forward(q.view, q.view, q.view, spec, a.view).ok());
  ASSERT_TRUE(attention_forward(q.view, q.view, q.view, spec, b.view, {}, {}, with).ok());
  EXPECT_EQ(a.bytes, b.bytes);
  EXPECT_EQ(cache.entries(), 0);
  EXPECT_EQ(cache.bytes(), 0);
}

// The CUDA forward gathers a partial tile's mask bits for a thread with cuda::quad_bits: for
// every word and every col0 of a quad, bit 2 c + e is key (c % 4) * 8 + col0 + e of the word.
TEST(TileBits, QuadBitsPickTheThreadsKeys) {
  uint64_t x = 0x9E3779B97F4A7C15ull;
  for (int n = 0; n < 4096; ++n) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    const uint32_t word = n < 32 ? 1u << n : static_cast<uint32_t>(x);
    for (int col0 = 0; col0 < 8; col0 += 2) {
      uint32_t expect = 0;
      for (int c = 0; c < 4; ++c)
        for (int e = 0; e < 2; ++e) expect |= ((word >> (c * 8 + col0 + e)) & 1u) << (2 * c + e);
      ASSERT_EQ(cuda::quad_bits(word, col0), expect) << "word " << word << " col0 " << col0;
    }
  }
}

// A window side of INT64_MAX means unbounded (stored as Mask::kUnboundedWindow, so that i' - left
// and i' + right cannot overflow): such windows give causal's and dense's outputs, Nq < Nk and
// Nq > Nk (the aligned index i' shifts either way).
TEST(UnboundedWindows, AreCausalAndDense) {
  EXPECT_EQ(Mask::sliding_window(INT64_MAX, 3).nodes[0].a, Mask::kUnboundedWindow);
  EXPECT_EQ(Mask::global_window(2, INT64_MAX, {0}).nodes[0].b, Mask::kUnboundedWindow);
  for (const auto& [nq, nk] : {std::pair<int64_t, int64_t>{37, 150}, {150, 37}}) {
    const OwnedTensor q = random_tensor(DType::kF32, {1, 2, nq, 16}, 1.0, 7);
    const OwnedTensor k = random_tensor(DType::kF32, {1, 2, nk, 16}, 1.0, 8);
    const OwnedTensor v = random_tensor(DType::kF32, {1, 2, nk, 16}, 1.0, 9);
    auto run = [&](const Mask& m) {
      AttentionSpec spec;
      spec.mask = m;
      OwnedTensor out = OwnedTensor::zeros(DType::kF32, {1, 2, nq, 16});
      const Status st = attention_forward(q.view, k.view, v.view, spec, out.view);
      EXPECT_TRUE(st.ok()) << st.message();
      return out.to_doubles();
    };
    const std::pair<Mask, Mask> same[] = {
        {Mask::sliding_window(INT64_MAX, 0), Mask::causal()},
        {Mask::sliding_window(INT64_MAX, INT64_MAX), Mask::none()},
        {Mask::global_window(INT64_MAX, INT64_MAX, {1}), Mask::none()}};
    for (const auto& [window, want] : same) {
      const std::vector<double> a = run(window), b = run(want);
      for (size_t x = 0; x < a.size(); ++x)
        ASSERT_NEAR(a[x], b[x], 1e-6) << "nq " << nq << " nk " << nk << " element " << x;
    }
  }
}

// MaskEval::band_full_tiles (the GPU kernels' full tiles of a band, found once an item) gives
// exactly the tiles band() classifies full: random fixed ranges, bands (unbounded ones too),
// tile sizes, bases (a query offset, negative too) and counts; both orientations.
TEST(BandFullTiles, AreTheTilesBandFindsFull) {
  std::mt19937_64 rng(23);
  auto pick = [&](int64_t lo, int64_t hi) {
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
  };
  const int64_t kUnbounded[] = {int64_t{1} << 40, INT64_MAX / 4};
  for (int it = 0; it < 20000; ++it) {
    const int64_t size = pick(1, 3) == 1 ? pick(1, 9) : 64 << pick(0, 1);
    const int64_t count = pick(0, 12);
    const int64_t base = pick(-3 * size, 3 * size);
    const int64_t lo = pick(-2 * size, count * size + 2 * size), hi = lo + pick(0, 2 * size);
    const int64_t left = pick(0, 9) == 0 ? kUnbounded[pick(0, 1)] : pick(0, 3 * size);
    const int64_t right = pick(0, 9) == 0 ? kUnbounded[pick(0, 1)] : pick(0, 3 * size);
    for (const bool transposed : {false, true}) {
      int begin = -1, end = -1;
      const int64_t l = transposed ? right : left, r = transposed ? left : right;
      MaskEval::band_full_tiles(lo, hi, l, r, base, size, count, &begin, &end);
      ASSERT_LE(0, begin);
      ASSERT_LE(end, count);
      for (int64_t t = 0; t < count; ++t) {
        const int64_t a = base + t * size, b = a + size - 1;
        // band(queries, keys, left, right); transposed: the tiles are the queries.
        const TileClass c = transposed ? MaskEval::band(a, b, lo, hi, left, right)
                                       : MaskEval::band(lo, hi, a, b, left, right);
        ASSERT_EQ(c == TileClass::kFull, t >= begin && t < end)
            << "size " << size << " base " << base << " rows [" << lo << ", " << hi << "] left "
            << left << " right " << right << " tile " << t << (transposed ? " transposed" : "");
      }
    }
  }
}

// The CUDA backward tests a score's query column against the sequence's end with
// cuda::query_bits: bit r * 16 + 2 c8 + e is set iff column c8 * 8 + e is below q_lim.
TEST(TileBits, QueryBitsEndWhereTheSequenceDoes) {
  for (int q_lim = -70; q_lim <= 140; ++q_lim) {
    uint32_t expect = 0;
    for (int r = 0; r < 2; ++r)
      for (int c8 = 0; c8 < 8; ++c8)
        for (int e = 0; e < 2; ++e)
          if (c8 * 8 + e < q_lim) expect |= 1u << (r * 16 + 2 * c8 + e);
    ASSERT_EQ(cuda::query_bits(q_lim), expect) << "q_lim " << q_lim;
  }
}

// The CUDA kernels' band tests (the forward's band_mask, the backward's band bits) take a
// thread's row as cuda::band_run_bits: bit 2 c + e is set iff column 8 c + e lies in [lo, hi],
// for every pair of bounds tile_bound can give (-1 to the tile's width) and every width (176:
// the forward's wide key tiles, a 64-bit word a row).
template <int kCols, class W = uint32_t>
void expect_band_run_bits() {
  for (int lo = -1; lo <= kCols; ++lo)
    for (int hi = -1; hi <= kCols; ++hi) {
      W expect = 0;
      for (int c = 0; c < kCols / 8; ++c)
        for (int e = 0; e < 2; ++e)
          if (8 * c + e >= lo && 8 * c + e <= hi) expect |= W{1} << (2 * c + e);
      ASSERT_EQ((cuda::band_run_bits<kCols, W>(lo, hi)), expect)
          << "width " << kCols << " lo " << lo << " hi " << hi;
    }
}
TEST(TileBits, BandRunBitsAreTheBandsColumns) {
  expect_band_run_bits<64>();
  expect_band_run_bits<128>();
  expect_band_run_bits<128, uint64_t>();
  expect_band_run_bits<176, uint64_t>();
}

// The CUDA forward's pairs schedule (cuda/fwd_params.h, the default; =0 takes the counter) as its
// producer walks it (pair_first, then pair_next): every item given once, each CTA's items in
// pairs whose causal key tiles (tiles - x for item x) sum to tiles + 1, an odd count's middles
// two heads' (a last head's alone), and the CTAs' key tiles within a pair's of each other (with
// a middle alone in each head's pairs, 7 tiles on 132 CTAs gave a quarter of them middles only).
TEST(CudaSchedule, PairsGiveEveryItemOnceInBalancedPairs) {
  for (int tiles = 1; tiles <= 11; ++tiles)
    for (int64_t heads : {1, 2, 3, 7, 64, 256, 257})
      for (int ctas : {1, 2, 3, 5, 132, 1000}) {
        const int64_t items = heads * tiles;
        const int launched =
            static_cast<int>(std::min<int64_t>(ctas, cuda::pair_count(heads, tiles)));
        const int hs = static_cast<int>(heads);
        std::vector<int> given(items, 0);
        int64_t most = 0, least = items * tiles;
        for (int c = 0; c < launched; ++c) {
          std::vector<int64_t> walk;
          int64_t work = 0;
          int64_t item = cuda::pair_first(c, tiles, hs);
          for (; item < items; item = cuda::pair_next(item, launched, tiles, hs)) {
            ASSERT_GE(item, 0);
            ++given[item];
            walk.push_back(item);
            work += tiles - item % tiles;
          }
          EXPECT_EQ(item, items) << "a walk's end";
          most = std::max(most, work), least = std::min(least, work);
          for (size_t i = 0; i < walk.size(); ++i) {
            const int x = static_cast<int>(walk[i] % tiles);
            const int64_t head = walk[i] / tiles;
            if (2 * x + 1 == tiles) {  // a middle: then the next head's, or a last head's alone
              ASSERT_EQ(head % 2, 0) << "an odd head's middle first";
              if (head + 1 == heads) continue;
              ASSERT_LT(i + 1, walk.size()) << "two middles cut short";
              EXPECT_EQ(walk[i + 1], walk[i] + tiles) << "a middle without the next head's";
              ++i;
              continue;
            }
            ASSERT_LT(i + 1, walk.size()) << "a pair cut short";
            EXPECT_EQ(walk[i + 1] / tiles, walk[i] / tiles) << "a pair across heads";
            EXPECT_EQ(tiles - x + tiles - walk[i + 1] % tiles, tiles + 1) << "an unbalanced pair";
            ++i;
          }
        }
        for (int64_t i = 0; i < items; ++i)
          ASSERT_EQ(given[i], 1) << "item " << i << " of " << heads << " x " << tiles << ", "
                                 << launched << " CTAs";
        EXPECT_LE(most - least, tiles + 1)
            << heads << " x " << tiles << ", " << launched << " CTAs";
      }
  // The 32-bit bounds (items < 2^31, CTAs < 2^20): each CTA's last pair ends the walk.
  const int ctas = (1 << 20) - 1;
  for (const auto& [heads, tiles] : {std::pair<int64_t, int>{1, (1 << 30) + 1},
                                     {2, (1 << 30) - 1},
                                     {(1 << 30) - 1, 2},
                                     {(int64_t{1} << 31) - 1, 1}}) {
    const int64_t items = heads * tiles, pairs = cuda::pair_count(heads, tiles);
    const int hs = static_cast<int>(heads);
    const int64_t half = tiles / 2;
    for (int c : {0, ctas / 2, ctas - 1}) {
      const int64_t u = c + (pairs - 1 - c) / ctas * ctas;  // the CTA's last pair
      int64_t item = cuda::pair_item(static_cast<uint32_t>(u), static_cast<uint32_t>(tiles),
                                     static_cast<uint32_t>(heads));
      const int64_t h = u / tiles * 2, r = u % tiles, x = item % tiles, head = item / tiles;
      EXPECT_EQ(item, r < half         ? h * tiles + r
                      : h + 1 == heads ? h * tiles + half
                      : r < 2 * half   ? (h + 1) * tiles + r - half
                                       : h * tiles + half);
      item = cuda::pair_next(item, ctas, tiles, hs);
      if (2 * x + 1 != tiles) {  // its mirror, then the end
        EXPECT_EQ(item, head * tiles + tiles - 1 - x);
        EXPECT_LT(item, items);
        item = cuda::pair_next(item, ctas, tiles, hs);
      } else if (head + 1 < heads) {  // the next head's middle, then the end
        EXPECT_EQ(item, (head + 1) * tiles + half);
        item = cuda::pair_next(item, ctas, tiles, hs);
      }
      EXPECT_GE(item, items) << heads << " x " << tiles << ", CTA " << c;
    }
  }
}

}  // namespace
}  // namespace attnkit::tools
