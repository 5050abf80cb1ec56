#!/usr/bin/env bash
# Session 35: why dq by tiles lost (run 126, gpu.md part 33: ATTNKIT_CUDA_DQ_TILES=1 took sliding's
# bwd_kernel 744 -> 1133 us, causal's 2650 -> 3782, while one CTA's conversions should cost a few
# us). One launch of bwd_kernel (sliding 1024 causal, N 8192) under ncu per mode: its duration,
# then the SASS lines with the most stall samples (the dq warp's tail should lead in mode 1).
# Usage: bash bench/gpu/dq_tiles_run.sh OUT_DIR   (~150 s on a built tree)
out=${1:?out}
export LD_LIBRARY_PATH=$PWD/.carry/hwy/lib:${LD_LIBRARY_PATH:-} PYTHONPATH=build-gpu/python
for m in 0 1 2; do
  echo "== ATTNKIT_CUDA_DQ_TILES=$m"
  ATTNKIT_CUDA_DQ_TILES=$m timeout 150 ncu --kernel-name regex:bwd_kernel --launch-skip 1 \
    --launch-count 1 --section SourceCounters --page source --print-source sass --csv \
    python3 bench/gpu/profile_bwd.py --once --masked --case sliding1024-causal \
    > "$out/src$m.csv" 2> "$out/src$m.err"
  ATTNKIT_CUDA_DQ_TILES=$m timeout 60 ncu --kernel-name regex:bwd_kernel --launch-skip 1 \
    --launch-count 1 --metrics gpu__time_duration.sum,sm__cycles_active.avg \
    python3 bench/gpu/profile_bwd.py --once --masked --case sliding1024-causal 2>&1 |
    grep -E "gpu__time|cycles_active"
  python3 bench/gpu/ncu_regions.py "$out/src$m.csv" 25 | tail -32
  gzip -f "$out/src$m.csv"
done
