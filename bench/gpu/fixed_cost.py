"""The per-CTA fixed cost of attnkit's CUDA passes: forward and backward times under causal
sliding windows of growing width (bf16, d 128, N 8192, batch 2, 16 heads), where each key tile's
walk (backward) and each query tile's (forward) grows with the window, fitted as
time = fixed + per_step * steps. `fixed` in steps' worth says how much a short walk (N 1024,
sliding windows, documents) pays for a CTA's or an item's start and end; the backward's also
holds its preparation and dq's conversion, which grow with N, not with the window.
Usage: PYTHONPATH=build-gpu/python python3 bench/gpu/fixed_cost.py [WINDOW ...]"""
import sys

import torch
from triton.testing import do_bench

import attnkit

n, b, h, d = 8192, 2, 16, 128
windows = [int(x) for x in sys.argv[1:]] or [128, 256, 512, 1024, 2048, 4096]
q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
           for _ in range(3))
go = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16)
rows = []
for w in windows:
    fn = lambda: attnkit.attention(q, k, v, window=(w, 0))
    out = fn()
    grad = lambda: torch.autograd.grad(out, (q, k, v), go, retain_graph=True)
    fwd = do_bench(fn, warmup=10, rep=100, return_mode="median") * 1e3
    bwd = do_bench(grad, warmup=10, rep=100, return_mode="median") * 1e3
    # The mean steps a key tile walks in the backward (query tiles of 64 rows that meet its 128
    # keys: rows i with j <= i <= j + w) and key tiles a query tile walks in the forward (128
    # rows, 128 keys).
    bsteps = sum(min((kt * 128 + 127 + w) // 64, n // 64 - 1) - kt * 128 // 64 + 1
                 for kt in range(n // 128)) / (n // 128)
    fsteps = sum(qt - max(0, qt * 128 - w) // 128 + 1 for qt in range(n // 128)) / (n // 128)
    rows.append((w, fwd, bwd, fsteps, bsteps))
    print("window %5d: fwd %8.1f us (%4.1f tiles an item), bwd %8.1f us (%5.1f steps a CTA)"
          % (w, fwd, fsteps, bwd, bsteps), flush=True)


def fit(xs, ys):
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


for name, ti, si in (("forward", 1, 3), ("backward", 2, 4)):
    fixed, per = fit([r[si] for r in rows], [r[ti] for r in rows])
    print("%s: time = %.1f us + %.1f us a step: the fixed part is %.1f steps' worth"
          % (name, fixed, per, fixed / per))
