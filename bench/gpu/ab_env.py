"""A/B of a switch read from the environment by the CUDA forward or backward, in one build: the
dense pass (bf16, N(0, 1) inputs, b = 16384 / n) timed with VAR=VAL and without, alternating
ROUNDS times, medians of do_bench's medians; forward FLOPs 4 b h n^2 d (half that causal), the
backward's 2.5x that (timed alone, autograd.grad on one saved forward).
With --masked NAME[,NAME], bench.py's masked cases of those names instead (N 8192, b 2, h 16,
d 128 or the first --d; FLOPs counted by their density; "document-causal cached" with a
MaskCache).
Usage: PYTHONPATH=build-gpu/python python3 bench/gpu/ab_env.py VAR=VAL [--bwd] [--rounds R]
  [--causal | --dense] [--alibi] [--d D ...] [--n N ...] [--masked NAMES]   (defaults: forward,
  3 rounds, both masks, d 64 and 128, n 1024 and 4096; --alibi: ALiBi() on every dense and
  causal case, not on --masked)
"""
import os
import statistics
import sys

import torch
from triton.testing import do_bench

import attnkit


def numbers(flag, default):
    if flag not in sys.argv:
        return default
    i, out = sys.argv.index(flag) + 1, []
    while i < len(sys.argv) and not sys.argv[i].startswith("--"):
        out.append(int(sys.argv[i]))
        i += 1
    return out


def timed(var, val, bwd, rounds, label, flops, call, q, k, v, go):
    """One case's rates without and with VAR=VAL, alternating, and their ratio."""
    rates = {False: [], True: []}
    for _ in range(rounds):
        for on in (False, True):
            if on:
                os.environ[var] = val
            else:
                os.environ.pop(var, None)
            fn = call
            if bwd:
                out = call()
                fn = lambda: torch.autograd.grad(out, (q, k, v), go, retain_graph=True)
            ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
            rates[on].append(flops / ms / 1e9)
    os.environ.pop(var, None)
    off, on = statistics.median(rates[False]), statistics.median(rates[True])
    each = " ".join("%.3f" % (y / x) for x, y in zip(rates[False], rates[True]))
    print("%-22s %9.0f %9.0f %7.3f  %s" % (label[:22], off, on, on / off, each), flush=True)


def inputs(b, h, n, d, bwd):
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=bwd)
               for _ in range(3))
    return q, k, v, torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16)


def main():
    var, val = sys.argv[1].split("=", 1)
    if var in os.environ:
        sys.exit("ab_env.py: %s is set already; unset it first" % var)
    bwd = "--bwd" in sys.argv
    rounds = numbers("--rounds", [3])[0]
    run = lambda *a: timed(var, val, bwd, rounds, *a)
    print("%s, %d rounds" % ("backward" if bwd else "forward", rounds))
    print("%-22s %9s %9s %7s  %s" % ("case", "without", var + "=" + val, "ratio",
                                     "each round's ratio"))
    if "--masked" in sys.argv:  # bench.py's masked cases (N 8192, b 2, h 16, d 128 or --d D)
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import bench
        n, b, h, d = 8192, 2, 16, numbers("--d", [128])[0]
        q, k, v, go = inputs(b, h, n, d, bwd)
        picked = sys.argv[sys.argv.index("--masked") + 1].split(",")
        cases = list(bench.with_cached(bench.masked_cases(n, h)))
        unknown = set(picked) - {c[0] for c in cases}
        if unknown:
            sys.exit("ab_env.py: no masked case named %s" % ", ".join(sorted(unknown)))
        for name, kw, _, _, frac in cases:
            if name in picked:
                flops = 4 * b * h * n * n * d * frac * (2.5 if bwd else 1)
                run(name, flops, lambda: attnkit.attention(q, k, v, **kw), q, k, v, go)
        return
    mods = dict(score_mod=attnkit.score_mods.ALiBi()) if "--alibi" in sys.argv else {}
    masks = [m for m in (False, True)
             if not ("--causal" in sys.argv and not m) and not ("--dense" in sys.argv and m)]
    for d in numbers("--d", [64, 128]):
        h = 16 if d >= 128 else 32
        for n in numbers("--n", [1024, 4096]):
            b = max(1, 16384 // n)
            q, k, v, go = inputs(b, h, n, d, bwd)
            for causal in masks:
                flops = 4 * b * h * n * n * d / (2 if causal else 1) * (2.5 if bwd else 1)
                run("d%d n%d%s%s" % (d, n, " causal" if causal else "", " alibi" if mods else ""),
                    flops, lambda: attnkit.attention(q, k, v, causal=causal, **mods), q, k, v, go)
            del q, k, v, go


if __name__ == "__main__":
    main()
