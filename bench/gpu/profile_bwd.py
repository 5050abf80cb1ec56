"""The CUDA backward alone beside the forward (autograd.grad on a saved forward), bf16, B x N =
16384 tokens: forward and backward TFLOP/s of attnkit and cuDNN (backward FLOPs 2.5x the
forward's), and attnkit's backward under each way of adding dq (ATTNKIT_CUDA_DQ: rows, tile,
atomics; read at each call, so one process measures them all). Run under ncu with
--kernel-name regex:bwd_kernel for the kernel's counters.
Usage: PYTHONPATH=build-gpu/python python3 bench/gpu/profile_bwd.py [N ...]"""
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

import attnkit

MODES = ("rows", "tile", "atomics")


def tflops(flops, fn):
    return flops / do_bench(fn, warmup=10, rep=100, return_mode="median") / 1e9


for n in [int(x) for x in sys.argv[1:]] or [4096]:
    b = max(1, 16384 // n)
    for d, h in [(128, 16), (64, 32)]:
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        go = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16)
        for causal in (False, True):
            flops = 4 * b * h * n * n * d / (2 if causal else 1)
            res = []
            for name, fn in [("attnkit", lambda: attnkit.attention(q, k, v, causal=causal)),
                             ("cudnn", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))]:
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    out = fn()
                    fwd = tflops(flops, fn)
                    grad = lambda: torch.autograd.grad(out, (q, k, v), go, retain_graph=True)
                    if name == "attnkit":
                        for mode in MODES:
                            os.environ["ATTNKIT_CUDA_DQ"] = mode
                            res.append("bwd %s %.0f" % (mode, tflops(2.5 * flops, grad)))
                        del os.environ["ATTNKIT_CUDA_DQ"]
                    res.append("%s fwd %.0f bwd %.0f" % (name, fwd, tflops(2.5 * flops, grad)))
            print("d%d n%d%s: %s" % (d, n, " causal" if causal else "", " | ".join(res)), flush=True)
