"""Where a forward kernel's warps spend their time, from ncu's per-instruction stall samples
(`ncu --section SourceCounters --page source --print-source sass --csv`, one launch of
fwd_kernel): the share of the samples in the prologue and first tile of an item, the steady loop
(the instructions run most often; per tile too), the last P V and the rows' store (epilogue), and
the producer warp, then the instructions with the most samples. With --exec N[,M...]: also the
share and stall reasons of the instructions executed exactly N (or M...) times (the forward's
rows stored under the next item's first S run once a consumer warp and item, less each CTA's
first item: 15328 and 30656 at d128 N 1024 in run 208).
Usage: python3 bench/gpu/ncu_regions.py FILE.csv[.gz] [TOP] [--exec N[,M...]]"""
import collections
import csv
import gzip
import sys


def load(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        lines = [line for line in f if not line.startswith("==PROF==")]
    # The profiled script's own output may come first: the csv starts at the kernel's name.
    start = next((i for i, line in enumerate(lines) if line.startswith('"Kernel Name"')), None)
    if start is None:
        sys.exit("%s: no csv from ncu (did the kernel run? see the .err beside it)" % path)
    reader = csv.reader(lines[start + 1:])
    header = next(reader)
    return header, [dict(zip(header, r)) for r in reader if len(r) >= len(header)]


def num(x):
    try:
        return float(x.replace(",", ""))
    except ValueError:
        return 0.0


def main():
    args = sys.argv[1:]
    execs_asked = set()
    if "--exec" in args:
        at = args.index("--exec")
        execs_asked = {float(x) for x in args[at + 1].split(",")}
        del args[at:at + 2]
    header, rows = load(args[0])
    top = int(args[1]) if len(args) > 1 else 12
    samples = [num(r["Warp Stall Sampling (All Samples)"]) for r in rows]
    execs = [num(r["Instructions Executed"]) for r in rows]
    total = sum(samples)
    # The steady loop: the exp2s run most often; its range is from the first to the last
    # instruction run as often.
    steady = max(e for e, r in zip(execs, rows) if "MUFU.EX2" in r["Source"])
    idx = [i for i, e in enumerate(execs) if e == steady]
    lo, hi = idx[0], idx[-1]
    # The consumers' code after the loop runs once a warp and item (the first instruction run).
    per_item = next((e for e in execs[hi + 1:] if e > 0), steady)
    # The producer: the first code after the loop that one warp runs (a fraction of per_item);
    # where the kernel lays it out elsewhere (the backward), the rest counts as the epilogue.
    pstart = next((i for i in range(hi + 1, len(rows)) if 0 < execs[i] < per_item / 4), len(rows))
    tiles = steady / per_item  # tiles an item after its first

    def share(a, b):
        return 100.0 * sum(samples[a:b]) / total

    print("%s: %d instructions, %d samples, %.1f steady tiles an item" % (
        args[0].split("/")[-1], len(rows), total, tiles))
    print("prologue + first tile %.1f%% | steady loop %.1f%% (%.1f%% a tile) | epilogue %.1f%% | "
          "producer %.1f%%" % (share(0, lo), share(lo, hi + 1), share(lo, hi + 1) / tiles,
                               share(hi + 1, pstart), share(pstart, len(rows))))
    stalls = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
    reasons = collections.Counter()
    for r in rows:
        for h in stalls:
            reasons[h[6:]] += num(r[h])
    print("reasons: " + ", ".join("%s %.1f%%" % (k, 100.0 * v / total)
                                  for k, v in reasons.most_common(6)))
    if execs_asked:
        picked = [i for i, e in enumerate(execs) if e in execs_asked]
        by = collections.Counter()
        for i in picked:
            for h in stalls:
                by[h[6:]] += num(rows[i][h])
        print("executed %s times: %d instructions, %.1f%% of the samples; %s" % (
            "/".join("%d" % e for e in sorted(execs_asked)), len(picked),
            100.0 * sum(samples[i] for i in picked) / total,
            ", ".join("%s %.1f%%" % (k, 100.0 * v / total) for k, v in by.most_common(6))))
    order = sorted(range(len(rows)), key=lambda i: -samples[i])[:top]
    for i in order:
        where = ("prologue" if i < lo else "steady" if i <= hi else
                 "epilogue" if i < pstart else "producer")
        print("%6.2f%% %-8s exec %8d  %s" % (100.0 * samples[i] / total, where, execs[i],
                                             rows[i]["Source"][:70]))


if __name__ == "__main__":
    main()
