#!/usr/bin/env python3
"""A list-scheduling model of the causal backward's CTAs (one a key tile of 128 keys, walking
the query tiles of 64 rows from its diagonal on, plus a fixed cost in steps), taken in grid
order by 132 SMs, one CTA each at a time: each order's makespan against the balanced one
(the work over 132). Orders: kt fastest (the present grid), a batch's kv heads' tiles kt-major
and every pair's tiles kt-major. (The second, tried as ATTNKIT_CUDA_BWD_KT_MAJOR in runs
150-152, gained 1-3% at d128 causal N <= 8192 and on document masks, lost at d64 causal and
up to 7% dense: L2 and the GPU's own block order, which the model leaves out; dropped, gpu.md
part 36.)

Usage: python3 bench/gpu/bwd_schedule_model.py [--fixed STEPS]"""
import argparse
import heapq


def makespan(jobs, sms=132):
    free = [0.0] * sms
    for d in jobs:
        heapq.heappush(free, heapq.heappop(free) + d)
    return max(free)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixed", type=float, default=3.3, help="a CTA's fixed cost in steps")
    a = ap.parse_args()
    print("N      batch x kv heads  kt fastest  kt-major a batch  kt-major all")
    for n, batch, heads in ((1024, 16, 16), (4096, 4, 16), (8192, 2, 16), (16384, 1, 16)):
        tiles, qtiles = n // 128, n // 64
        step = lambda kt: qtiles - 2 * kt + a.fixed
        orders = (
            [step(kt) for b in range(batch) for h in range(heads) for kt in range(tiles)],
            [step(kt) for b in range(batch) for kt in range(tiles) for h in range(heads)],
            [step(kt) for kt in range(tiles) for b in range(batch) for h in range(heads)],
        )
        ideal = sum(orders[0]) / 132
        cells = ["%9.1f%%" % (100 * (makespan(o) / ideal - 1)) for o in orders]
        print("%-6d %-17s %s" % (n, "%d x %d" % (batch, heads), "  ".join(cells)))


if __name__ == "__main__":
    main()
