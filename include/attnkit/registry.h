// What each backend supports: the rows of `attnkit list` (mechanism x backend x pass x dtypes).
#pragma once
#include <string>
#include <vector>

namespace attnkit {

struct SupportRow {
  std::string mechanism;  // the spec vocabulary of shared/golden (causal, sliding_window, ...)
  std::string category;   // mask, score_mod, normalizer, epilogue, layout, sparse
  std::string backend;    // reference, cpu
  bool forward = false;
  bool backward = false;
  std::vector<std::string> dtypes;
};

// Every (mechanism, backend) row, from the backends' registries.
std::vector<SupportRow> support_matrix();

// The SIMD target the CPU kernels dispatch to on this machine.
std::string cpu_simd_target();

// Whether the CPU forward runs bf16 inputs on the CPU's bf16 dot products (AVX512_BF16): Q, K, V
// stay bf16 and P enters P V in bf16, as on GPUs. Off on CPUs without them, or with
// ATTNKIT_CPU_BF16_DOT=0 in the environment (then bf16 is widened to fp32, like fp16).
bool cpu_bf16_dot();

// The CUDA kernels this build has ("sm_90a; bf16, fp16; head dims 64, 128"), or "" without the
// CUDA backend.
std::string cuda_build_info();

}  // namespace attnkit
