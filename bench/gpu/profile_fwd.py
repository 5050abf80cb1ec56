"""The short forward under a profiler: a few calls of attnkit's forward, then of cuDNN's (SDPA),
bf16, B x N = 16384 tokens, so that ncu can read both kernels' counters from one process:
  ncu --kernel-name regex:fwd_kernel --launch-skip 2 --launch-count 1 --section ... python3 \
      bench/gpu/profile_fwd.py N D CAUSAL
and regex:sdpa for cuDNN's. Without ncu it prints both rates (TFLOP/s, medians of do_bench).
Usage: PYTHONPATH=build-gpu/python python3 bench/gpu/profile_fwd.py [N [D [CAUSAL]]]"""
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import attnkit

n = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
d = int(sys.argv[2]) if len(sys.argv) > 2 else 128
causal = (sys.argv[3] if len(sys.argv) > 3 else "1") == "1"
h = 16 if d >= 128 else 32
b = max(1, 16384 // n)
q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
fns = {
    "attnkit": lambda: attnkit.attention(q, k, v, causal=causal),
    "cudnn": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
}
flops = 4 * b * h * n * n * d / (2 if causal else 1)
for name, fn in fns.items():
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        if "--rate" in sys.argv:
            from triton.testing import do_bench
            ms = do_bench(fn, warmup=10, rep=100, return_mode="median")
            print("%s N %d d %d causal %d: %.0f TFLOP/s" % (name, n, d, causal, flops / ms / 1e9))
