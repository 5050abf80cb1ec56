// What a correct backend's rounding errors are proportional to, where the plain norm of a result
// says nothing about them (a gradient whose terms cancel, an output normalized by its own RMS, a
// statistic at a kink): the scales check_forward and check_backward judge errors against.
#pragma once
#include "attnkit/attention.h"

namespace attnkit::tools {

// The unit roundoff of fp32, in which the backends compute P.
inline constexpr double kF32Unit = 0x1p-24;

// The float64 backward oracle's chain rule with every product and sum taken in absolute value:
// each element of `magnitudes` (contiguous fp64 views shaped like the gradients) receives the
// sum of the absolute values of the terms the oracle adds up to that element of the gradient,
// where |dS| of the softmax family is bounded by P (|dP| + sum_j P |dP|) (D = dO . O, whose
// rounding of O to the input dtype it covers). A rounding error of a backward pass is at most a
// few units of its precision times this, however much the terms cancel; every element is at
// least the oracle's |gradient|. A factor that a backend has only to an absolute error a counts
// as |factor| + a / tol (O's subnormals, sigmoid's 1 - P, ReLA's and the ReLU kernel's P near
// their kink, and the kink itself): magnitudes.cpp says which and why. softcap_rel: the relative
// error of a backend's softcap tanh where it approximates it (kCudaSoftcapRel), else 0.
Status gradient_magnitudes(const TensorView& q, const TensorView& k, const TensorView& v,
                           const TensorView& grad_out, const AttentionSpec& spec, double tol,
                           const AttentionGrads& magnitudes, double softcap_rel = 0);

// The forward's counterpart: each element of `magnitude` (fp64, shaped like out) receives
// |gate| |O1| with O = P V counted as P~|V| and, after ReLA, |gain| P~|V| (1 + k) / rms, as
// gradient_magnitudes counts them; `rms_magnitude` (optional, fp32, shaped like row_stat) the
// row's |P~|V|| / sqrt(dv), what O's error moves ReLA's RMS by. check_forward judges ReLA's
// output and RMS against them: ReLA divides O by its own RMS, so O's error relative to |O| (P V
// cancelling, a score at the kink) passes to the output whatever the output's scale.
// top_score (optional) receives the largest |m_i|, m_i row i's max over its allowed finite
// scores (rows at the bottom of fp32's range left out): an fp32 backend rounds S - m, and so
// every weight that counts, to units of |m_i|.
Status output_magnitude(const TensorView& q, const TensorView& k, const TensorView& v,
                        const AttentionSpec& spec, double tol, const TensorView& magnitude,
                        const TensorView& rms_magnitude = {}, double softcap_rel = 0,
                        double* top_score = nullptr);

// The normalized kernel's row statistic log L_i (L_i = sum_j f(s'_ij)^p) moves by
// p ls sum_j P_ij (log f)'(s'_ij) ds_ij when the scores move by ds: ReLU's (log f)'(s) = 1 / s is
// unbounded near its kink, so a row whose weight sits on scores near 0 has its statistic only to
// what the rounding of those scores allows. `slack` (fp32, shaped like row_stat) receives that
// first-order error row by row for |ds| = (d + 4) 2^-24 (scale sum_c |q_c k_c| + |additive
// terms|, through the softcap, + |s|): the bound of an fp32 dot product and the few operations
// after it. `out` is any tensor shaped like out.
Status kernel_row_stat_slack(const TensorView& q, const TensorView& k, const TensorView& v,
                             const AttentionSpec& spec, const TensorView& out,
                             const TensorView& slack, double softcap_rel = 0);

// The relative error of the softcap's tanh on the CUDA kernels (tanh.approx.f32 on the
// special-function unit, src/cuda/fwd_common.cuh): the softcap_rel of a CUDA backend.
inline constexpr double kCudaSoftcapRel = 0x1p-11;

// Half the spacing of a dtype's subnormals: the absolute error any value stored in it may carry
// (fp16 2^-25, bf16 2^-134, fp32 2^-150).
double subnormal_floor(DType t);

}  // namespace attnkit::tools
