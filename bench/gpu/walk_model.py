#!/usr/bin/env python3
"""The forward's work models of gpu.md parts 49-50 (no GPU): what the prepared patches should buy.

  python3 bench/gpu/walk_model.py tail    # d64 causal, 192-row tiles: each warpgroup's masked
                                          # last key tiles passed (ab_fwd_wg_tail.patch)
  python3 bench/gpu/walk_model.py split   # d64 without a mask: the longest CTA of the
                                          # round-robin walk, idle (ab_fwd_idle_wg.patch) and
                                          # split_last (ab_fwd_split_last.patch; measured
                                          # nothing in run 226, dropped: git b391c0a)

Units: a full tile of three live warpgroups costs 3 GEMM-times; one or two live warpgroups cost 2
(a warpgroup alone no longer hides its normalization under the others' products, part 49); an
idle or passed warpgroup costs nothing. `tail` adds an item's own code, 1.3 full tiles (part 42's
samples), and sums the items of a head (the pairs schedule balances the CTAs); `split` takes the
longest CTA of bench.py's shapes (32 heads, batch 16384 / N, 132 CTAs), rotated where that is
shorter (rotated_slot, which ab_fwd_idle_wg.patch adds to src/cuda/fwd_params.h).
"""
import sys


def tile_cost(live):
    return max(live, 2) if live else 0


def causal_head(n, tail, m=192, k=128, fixed=3 * 1.3):
    """A head's cost under causal: 192-row tiles aligned to the sequence's end (align_end)."""
    tiles = -(-n // m)
    shift = (m - n % m) % m
    total = 0.0
    for q in range(tiles):
        m0 = q * m - shift
        total += fixed
        for t in range((m0 + m - 1) // k + 1):
            live = 0
            for w in range(m // 64):
                hi = m0 + 64 * w + 63
                if hi < 0:
                    continue  # rows before 0: idle
                if not tail or t <= hi // k:
                    live += 1
            total += tile_cost(live)
    return total


def longest_cta(heads, tiles, ctas, cheap_slots, partial=2):
    """The round-robin walk's longest CTA, unrotated and rotated (the host's pick: the shorter)."""
    best = None
    for rotate in (False, True):
        load = [0] * ctas
        for i in range(heads * tiles):
            bh, x = divmod(i, tiles)
            slot = (x + bh * tiles // ctas) % tiles if rotate else x
            load[i % ctas] += partial if slot < cheap_slots else 3
        best = max(load) if best is None else min(best, max(load))
    return best


def main():
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what == "tail":
        print("N      idle   tail   gain")
        for n in (768, 896, 1024, 1152, 1280, 1536, 2048, 4096, 8192):
            a, b = causal_head(n, False), causal_head(n, True)
            print(f"{n:<6} {a:6.1f} {b:6.1f} {100 * (a / b - 1):+5.1f}%")
    elif what == "split":
        print("N      tiles  main  idle  split  idle/main  split/idle")
        for n in (896, 1024, 1216, 1280, 1408, 2048, 4096, 16384):
            tiles = -(-n // 192)
            heads = 32 * (16384 // n)
            main_ = 3 * -(-heads * tiles // 132)
            idles = n - (tiles - 1) * 192 <= 128  # a whole warpgroup idles in the last tile
            idle = longest_cta(heads, tiles, 132, 1) if idles else main_
            split = longest_cta(heads, tiles, 132, 2) if n - (tiles - 1) * 192 <= 64 else idle
            print(f"{n:<6} {tiles:<6} {main_:<5} {idle:<5} {split:<6} "
                  f"{100 * (main_ / idle - 1):+6.1f}%    {100 * (idle / split - 1):+6.1f}%")
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
