// The oracle's internals: one (batch, query head) of the forward pass with every float64
// intermediate kept (HeadForward), shared by the forward and backward oracles; and the entry
// that also runs the naive low-precision computation of DESIGN.md's tolerance rule.
#pragma once
#include <vector>

#include "attnkit/attention.h"
#include "core/problem.h"
#include "core/score_tables.h"

namespace attnkit::reference {

// Forward of one (b, h) in float64, [nq][nk] row-major matrices.
struct HeadForward {
  int64_t nq = 0, nk = 0, hk = 0;
  std::vector<double> Q, K, V;  // this head's rows, widened
  std::vector<double> T;        // scale q.k + additive terms (before softcap)
  std::vector<double> S;        // final scores (after softcap)
  std::vector<char> A;          // allowed
  std::vector<double> P;        // normalized weights (0 where not allowed)
  std::vector<double> W;        // kernel normalizer: log weights p log f(s') (-inf: none)
  std::vector<double> lse, length_scale, rms;  // per row, where the normalizer has them
  std::vector<int64_t> n_allowed;
  std::vector<double> O;        // P V
  std::vector<double> O_final;  // after ReLA and the gate
  double sink = 0, beta = 0;    // sink logit (kSoftmaxSink), sigmoid beta
  ScoreModEval<double> mods;
};

// Threads for the oracle's heads: every core where the problem is large (the GPU tests' long
// sequences), one where it is small (most tests: OpenMP's start-up and spinning would cost more,
// and ctest runs tests side by side).
int oracle_threads(const core::Problem& p);

// sum_c a[c] b[c] in float64 as eight interleaved partial sums: the chains overlap and the
// compiler keeps them in vector registers (the exact oracle's widest loop; the order's rounding
// is far below any tolerance).
inline double dot64(const double* a, const double* b, int64_t n) {
  double s[8] = {};
  int64_t c = 0;
  for (; c + 8 <= n; c += 8)
    for (int u = 0; u < 8; ++u) s[u] += a[c + u] * b[c + u];
  for (; c < n; ++c) s[c % 8] += a[c] * b[c];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

// `rounding` kF64: exact. Another dtype: the naive computation in that dtype (scores,
// probabilities and both products rounded to it; dot products and P V accumulated in fp32).
HeadForward forward_head(const core::Problem& p, const core::ScoreTables<double>& tables, int64_t b,
                         int64_t h, DType rounding);

Status forward(const TensorView& q, const TensorView& k, const TensorView& v,
               const AttentionSpec& spec, const TensorView& out, const TensorView& row_stat,
               const AttentionStats& stats, DType rounding);

// The backward's validation (the oracle's and its magnitudes', tools/magnitudes.h): the problem
// and the gradients' operands of a call on host memory (a GPU tensor is refused by name).
Status resolve_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                        const TensorView& grad_out, const AttentionSpec& spec,
                        const AttentionGrads& grads, core::Problem* p, core::GradOperands* ops);

}  // namespace attnkit::reference
