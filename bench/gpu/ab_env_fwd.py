"""A/B of a switch read from the environment by the CUDA forward, in one build: the dense forward
(bf16, N(0, 1) inputs, b = 16384 / n) timed with VAR=VAL and without, alternating ROUNDS times,
medians of do_bench's medians; FLOPs 4 b h n^2 d (half that causal).
Usage: PYTHONPATH=build-gpu/python python3 bench/gpu/ab_env_fwd.py VAR=VAL [--d D ...]
  [--n N ...]   (defaults: d 64 and 128, n 1024 and 4096)
"""
import os
import statistics
import sys

import torch
from triton.testing import do_bench

import attnkit

ROUNDS = 3


def numbers(flag, default):
    if flag not in sys.argv:
        return default
    i, out = sys.argv.index(flag) + 1, []
    while i < len(sys.argv) and not sys.argv[i].startswith("--"):
        out.append(int(sys.argv[i]))
        i += 1
    return out


def main():
    var, val = sys.argv[1].split("=", 1)
    print("%-22s %9s %9s %7s" % ("case", "without", var + "=" + val, "ratio"))
    for d in numbers("--d", [64, 128]):
        h = 16 if d >= 128 else 32
        for n in numbers("--n", [1024, 4096]):
            b = max(1, 16384 // n)
            q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16)
                       for _ in range(3))
            for causal in (False, True):
                flops = 4 * b * h * n * n * d / (2 if causal else 1)
                rates = {False: [], True: []}
                for _ in range(ROUNDS):
                    for on in (False, True):
                        if on:
                            os.environ[var] = val
                        else:
                            os.environ.pop(var, None)
                        ms = do_bench(lambda: attnkit.attention(q, k, v, causal=causal),
                                      warmup=25, rep=100, return_mode="median")
                        rates[on].append(flops / ms / 1e9)
                os.environ.pop(var, None)
                off, on = statistics.median(rates[False]), statistics.median(rates[True])
                print("%-22s %9.0f %9.0f %7.3f" % (
                    "d%d n%d%s" % (d, n, " causal" if causal else ""), off, on, on / off),
                    flush=True)
            del q, k, v


if __name__ == "__main__":
    main()
