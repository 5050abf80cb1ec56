"""The CUDA backward alone beside the forward (autograd.grad on a saved forward), bf16, B x N =
16384 tokens: forward and backward TFLOP/s of attnkit and cuDNN (backward FLOPs 2.5x the
forward's). Run under ncu with --kernel-name regex:bwd_kernel for the kernel's counters. With
--kernels, each of attnkit's backward kernels (preparation, bwd_kernel, dq conversion) is timed
under torch.profiler too. With --ab NAME=VALUE, attnkit is timed with the environment variable
NAME unset and set to VALUE in turn (a switch the library reads at each call, e.g.
ATTNKIT_CUDA_PERSISTENT=0). With --masked, bench.py's masked cases instead (N 8192, d 128, their
pair counts as FLOPs; document with a MaskCache, and per call where --case names
"document-causal"; bench.py's neighborhood13x13 rows where --case names them), attnkit
beside FlexAttention, each pass alone (with --kernels, each pass's kernels timed).
With --once, attnkit alone, one forward and three backward calls a case and no timing, for ncu's
per-kernel figures (ncu --metrics gpu__time_duration.sum,dram__bytes.sum python3
bench/gpu/profile_bwd.py --once --d 128 1024).
Usage: PYTHONPATH=build-gpu/python python3 bench/gpu/profile_bwd.py [--kernels] [--ab NAME=VALUE]
       [--masked [--case NAME]] [--once] [--d D] [N ...]
(--d D, --case NAME[,NAME]: that head dim or those masked cases alone, e.g. for ncu's launch counts)"""
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

import attnkit


def tflops(flops, fn):
    return flops / do_bench(fn, warmup=10, rep=100, return_mode="median") / 1e9


def kernel_times(fn, reps=20):
    """Mean device time per call of each kernel fn launches, in microseconds."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    times = {}
    for e in prof.key_averages():
        # Kernels only (self time: a CPU op's total would count its kernels again).
        if e.self_device_time_total > 0:
            name = e.key.replace("(anonymous namespace)::", "").replace("void ", "")
            name = name.split("<")[0].split("(")[0].replace("attnkit::cuda::", "")
            times[name] = times.get(name, 0.0) + e.self_device_time_total / reps
    total = sum(times.values())
    return " ".join("%s %.0f (%.0f%%)" % (k[:28], v, 100 * v / total)
                    for k, v in sorted(times.items(), key=lambda x: -x[1]))


argv = sys.argv[1:]
ab = None
if "--ab" in argv:
    ab = argv[argv.index("--ab") + 1]
    del argv[argv.index("--ab"):argv.index("--ab") + 2]
only_case = None
if "--case" in argv:
    only_case = argv[argv.index("--case") + 1]
    del argv[argv.index("--case"):argv.index("--case") + 2]
only_d = None
if "--d" in argv:
    only_d = int(argv[argv.index("--d") + 1])
    del argv[argv.index("--d"):argv.index("--d") + 2]
args = [a for a in argv if a not in ("--kernels", "--masked", "--once")]
variants = [("attnkit", None)] if ab is None else [("attnkit", ""), ("attnkit " + ab, ab)]


def set_variant(x):
    """A variant's environment: None leaves it, "" unsets --ab's NAME, else sets NAME=VALUE."""
    if x is None:
        return
    name, _, value = ab.partition("=")
    os.environ.pop(name, None)
    if x:
        os.environ[name] = value


def masked():
    """Each masked case's forward and backward alone, attnkit and FlexAttention."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    fa = torch.compile(flex_attention, dynamic=False)
    # The backward is timed again and again on one saved forward (retain_graph), which a
    # compiled backward's donated buffers refuse.
    torch._functorch.config.donated_buffer = False
    n, b, h, d = 8192, 2, 16, 128
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    go = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16)
    cases = list(bench.with_cached(bench.masked_cases(n, h)))
    # Causal through the block table (one document): the tabled instance without ALiBi's terms,
    # beside the band instance's causal and the tabled ALiBi.
    one_doc = torch.zeros(n, device="cuda", dtype=torch.int32)
    causal = cases[0]  # bench.masked_cases' first: causal on the band, its density
    assert causal[0] == "causal"
    cases.append(("causal-tabled", dict(mask=attnkit.masks.Causal() & attnkit.masks.Document(
        one_doc), mask_cache=attnkit.MaskCache()), causal[2], None, causal[4]))
    # (a case's spaces may be written as '_': run_plan.sh splits $PROFILE at spaces)
    picked = only_case.replace("_", " ").split(",") if only_case is not None else None
    for name, kw, mm, sm, frac in cases:
        # (document's tables built per call: only where --case names it)
        if (picked is not None and name not in picked) or (picked is None and (
                "neighborhood" in name or ("document" in name and "cached" not in name))):
            continue
        flops = 4 * b * h * n * n * d * frac
        bm = create_block_mask(mm, None, None, n, n, device="cuda") if mm else None
        res = []
        runs = [(who, x, lambda: attnkit.attention(q, k, v, **kw)) for who, x in variants]
        runs.append(("flex", None, lambda: fa(q, k, v, block_mask=bm, score_mod=sm)))
        for who, x, fn in runs:
            set_variant(x)
            out = fn()
            grad = lambda: torch.autograd.grad(out, (q, k, v), go, retain_graph=True)
            res.append("%s fwd %.0f bwd %.0f" % (who, tflops(flops, fn), tflops(2.5 * flops, grad)))
            if who.startswith("attnkit") and "--kernels" in sys.argv:
                res.append("us fwd: " + kernel_times(fn))
                res.append("us: " + kernel_times(grad))
        print("%s: %s" % (name, " | ".join(res)), flush=True)


if "--masked" in sys.argv:
    masked()
for n in [int(x) for x in args] or ([] if "--masked" in sys.argv else [4096]):
    b = max(1, 16384 // n)
    for d, h in [(dh, hh) for dh, hh in [(128, 16), (64, 32)] if only_d in (None, dh)]:
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        go = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16)
        if "--once" in sys.argv:
            out = attnkit.attention(q, k, v)
            for _ in range(3):
                torch.autograd.grad(out, (q, k, v), go, retain_graph=True)
            torch.cuda.synchronize()
            continue
        for causal in (False, True):
            flops = 4 * b * h * n * n * d / (2 if causal else 1)
            res = []
            runs = [(name, x, lambda: attnkit.attention(q, k, v, causal=causal)) for name, x in variants]
            runs.append(("cudnn", None, lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)))
            for name, x, fn in runs:
                set_variant(x)
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    out = fn()
                    fwd = tflops(flops, fn)
                    grad = lambda: torch.autograd.grad(out, (q, k, v), go, retain_graph=True)
                    res.append("%s fwd %.0f bwd %.0f" % (name, fwd, tflops(2.5 * flops, grad)))
                    if name.startswith("attnkit") and "--kernels" in sys.argv:
                        res.append("us: " + kernel_times(grad))
            print("d%d n%d%s: %s" % (d, n, " causal" if causal else "", " | ".join(res)), flush=True)
