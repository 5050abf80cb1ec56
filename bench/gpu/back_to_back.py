"""The dense forward timed as CUTLASS's example times itself: 50 calls back to back between two
CUDA events (no cache flush between calls), fp16 inputs from N(0, 1), FLOPs 4 b h n^2 d (half
that causal). bench.py's do_bench flushes L2 before every call and takes the median of single
calls, in bf16; this script separates that method from the kernels when attnkit is compared
with CUTLASS's figures (run_plan.sh cutlass). Each rate is the median of REPS such runs; cuDNN
and FlashAttention-2 (SDPA) are timed the same way, and attnkit in bf16 too.
Usage: PYTHONPATH=build-gpu/python python3 bench/gpu/back_to_back.py [--json FILE]
"""
import json
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import attnkit

REPS, CALLS = 5, 50


def per_call_ms(fn):
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(REPS):
        start.record()
        for _ in range(CALLS):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / CALLS)
    return statistics.median(times)


def sdpa(backend, q, k, v, causal):
    def run():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return run


def main():
    rows = []
    print("%-20s %9s %9s %9s %9s %11s" % ("case", "ak fp16", "ak bf16", "cudnn", "fa2",
                                          "ak/cudnn"))
    for d in (128, 64):
        h = 16 if d >= 128 else 32
        for n in (1024, 4096, 16384):
            b = 16384 // n
            for causal in (False, True):
                flops = 4 * b * h * n * n * d / (2 if causal else 1)
                row = dict(d=d, n=n, b=b, h=h, causal=causal)
                for dt, tag in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):
                    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=dt) for _ in range(3))
                    row["attnkit_" + tag] = flops / per_call_ms(
                        lambda: attnkit.attention(q, k, v, causal=causal)) / 1e9
                    if tag == "fp16":
                        for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION),
                                         ("fa2", SDPBackend.FLASH_ATTENTION)):
                            row[name] = flops / per_call_ms(sdpa(be, q, k, v, causal)) / 1e9
                    del q, k, v
                rows.append(row)
                print("%-20s %9.0f %9.0f %9.0f %9.0f %11.2f" % (
                    "d%d n%d%s" % (d, n, " causal" if causal else ""), row["attnkit_fp16"],
                    row["attnkit_bf16"], row["cudnn"], row["fa2"],
                    row["attnkit_fp16"] / row["cudnn"]), flush=True)
    if "--json" in sys.argv:
        with open(sys.argv[sys.argv.index("--json") + 1], "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
