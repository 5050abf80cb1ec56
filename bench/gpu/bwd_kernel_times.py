"""One forward and three backward calls (bf16, B x N = 16384 tokens), for ncu's per-kernel
durations: ncu --metrics gpu__time_duration.sum python3 bench/gpu/bwd_kernel_times.py D N [causal]
"""
import sys

import torch

import attnkit

d, n = int(sys.argv[1]), int(sys.argv[2])
causal = len(sys.argv) > 3
b, h = 16384 // n, 16 * 128 // d
q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
           for _ in range(3))
go = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16)
out = attnkit.attention(q, k, v, causal=causal)
for _ in range(3):
    torch.autograd.grad(out, (q, k, v), go, retain_graph=True)
torch.cuda.synchronize()
