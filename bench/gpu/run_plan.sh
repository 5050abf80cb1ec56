#!/usr/bin/env bash
# The next device session's runs (session 17), one call of at most 600 s each, in order:
#   bash bench/gpu/run_plan.sh STEP OUT_DIR [ARGS]
# 1: build (grid tiles on by default now), the whole test_cuda, attnkit check, pytest -k cuda:
#    every kernel changed in session 16 (desc_add in both directions, the band mask's bounds,
#    cuda::quad_bits in the forward's partial tiles, cuda::query_bits in the backward), and
#    CudaFastPath.RisingScoresRescaleTheOutput, new.
# ab PATCHES ONLY: A/B in one run: step 1's build against a copy of the tree with PATCHES (a
#    comma-separated list, applied in order) applied and built fresh there, its forward and
#    backward tests, then bench.py --only ONLY with each (and bench/gpu/profile_bwd.py 1024 4096
#    where ONLY has train). To run (each alone, or the forward ones together):
#    - bench/gpu/ab_fwd_q_prefetch.patch dense,masked: each item's Q prefetched into L2 once the
#      item is claimed (its load waits for the consumers' last S of the item before, a tile or
#      two before they need it: Q is read once, from memory), and the producer given 32
#      registers instead of 24 (at 24 it spilled: all 56 bytes of main's fast d128 instance);
#    - bench/gpu/ab_fwd_overlap.patch dense,masked,neighborhood: four changes to the forward
#      checked in its SASS here (cuobjdump), none yet run: (1) the wait for P V at the loop's
#      top, so that the normalization overlaps P V as designed (main's fast instances wait for
#      P V before the first exp2: ptxas moved the wait above it); (2) the row max and sum over
#      four partial chains (longest dependent FADD / FMNMX chain 31 -> 9); (3) the epilogue's
#      16-bit rows of full width stored without a dtype and width test per column pair (a row
#      of d128: 64 instructions and no branch, from about 320 with 48 branches); (4) the
#      running max moved only past 2^8 in the weights, and O's 64 multiplies (d128) skipped in
#      a tile that moves no max of the warp (they sat in the turn, between S and P V). The hot
#      path of a d128 tile: 557 -> 506 instructions.
#    - bench/gpu/ab_bwd_band.patch train: the backward's band mask with 32-bit bounds clamped
#      to the tile once a key row (the forward's run-57 change; the band block of the fast
#      backward's loop 297 -> 162 SASS instructions), and its producer at 32 registers (fewer
#      spills in the tabled and bias instances). Session 16's backward desc_add (978edda) had
#      its 36 tests pass but no same-run A/B: compare profile_bwd's ratios with run 58's.
# 3: bench.py --only masked,neighborhood,train (the masked targets, fwd and fwd+bwd).
# 4: compute-sanitizer memcheck and racecheck on the fast paths (scripts/gpu_cuda.sh
#    --sanitize's list; racecheck's known reports: bench/gpu/racecheck_patterns.cu).
# 5: ncu on the N 1024 forward beside cuDNN's: warp states and stall reasons (d 64 / 128, causal
#    and not), then the instruction mix by pipe (gpu.md part 15: 1.5x cuDNN's instructions).
# 6: ncu's per-instruction counts (SASS, source page, csv, gzipped) of the forward at d128 N 1024,
#    causal and not: which instructions of the steady loop run, and how often.
# A step that applies a patch on the device builds in a fresh directory: the next copy of the
# tree restores older timestamps and ninja keeps stale objects (run 46).
# Results: docs/perf/gpu.md (part 16).
set -uo pipefail
step=${1:?step 1, ab, 3, 4, 5 or 6}
out=${2:?output directory}
build() {
  if [[ ! -d build-gpu/python/attnkit ]]; then
    TEST_FILTER='CudaRules.*' bash scripts/gpu_cuda.sh "$out" --lean --no-bench || exit 1
  fi
}
case $step in
  1) bash scripts/gpu_cuda.sh "$out" --no-bench ;;
  ab) patch_file=${3:?patches} only=${4:?bench.py --only}
     build
     x=/tmp/x root=$PWD; rm -rf $x && mkdir -p $x
     tar --exclude=./build-gpu -cf - . | tar -x -C $x
     for pf in ${patch_file//,/ }; do (cd $x && patch -p1 -s < "$root/$pf") || exit 1; done
     filter='*CudaOracle*:CudaFastPath*:CudaHeadDims*:*CudaBackward.MatchesOracle/*'
     (cd $x && TEST_FILTER=$filter bash scripts/gpu_cuda.sh "$out/x" --lean --no-bench) || exit 1
     for tree in . $x; do
       echo "== $only, tree $tree"
       PYTHONPATH=$tree/build-gpu/python OUT="$out" python3 bench/gpu/bench.py --only "$only" \
         > "$out/bench_${tree//\//_}.log" 2>&1
       sed -n '/^case /,$p' "$out/bench_${tree//\//_}.log"
       [[ $only == *train* ]] &&
         PYTHONPATH=$tree/build-gpu/python timeout 80 python3 bench/gpu/profile_bwd.py 1024 4096
     done ;;
  3) build
     PYTHONPATH=build-gpu/python OUT="$out" python3 bench/gpu/bench.py \
       --only masked,neighborhood,train > "$out/bench.log" 2>&1
     sed -n '/^case /,$p' "$out/bench.log" ;;
  4) build
     TEST_FILTER='CudaRules.*' bash scripts/gpu_cuda.sh "$out" --lean --no-bench --sanitize 2>&1 |
       grep -v "ptxas" | tail -8 ;;
  5) build
     pipes=$(printf 'smsp__inst_executed_pipe_%s.sum,' alu fma lsu uniform xu)
     metrics="regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio,${pipes}"
     metrics+="smsp__inst_executed.sum,smsp__inst_executed_op_branch.sum,"
     metrics+="smsp__sass_thread_inst_executed_op_integer_pred_on.sum"
     for dc in "64 1" "128 1" "128 0"; do
       for kr in fwd_kernel sdpa; do
         timeout 120 ncu --kernel-name "regex:$kr" --launch-skip 2 --launch-count 1 \
           --section SpeedOfLight --section WarpStateStats --section LaunchStats \
           --metrics "$metrics" \
           env PYTHONPATH=build-gpu/python python3 bench/gpu/profile_fwd.py 1024 $dc \
           > "$out/ncu_${kr}_${dc// /_}.txt" 2>&1
         echo "== $kr d/causal $dc"
         grep -E "Duration|SM Active|Issued Warp|inst_executed|stalled_(wait|long|barrier|branch)" \
           "$out/ncu_${kr}_${dc// /_}.txt" | sed 's/smsp__average_warps_issue_stalled_//' |
           cut -c1-110
       done
     done ;;
  6) build
     for c in 1 0; do
       timeout 200 ncu --kernel-name regex:fwd_kernel --launch-skip 2 --launch-count 1 \
         --section SourceCounters --page source --print-source sass --csv \
         env PYTHONPATH=build-gpu/python python3 bench/gpu/profile_fwd.py 1024 128 $c \
         > "$out/ncu_source_d128_causal$c.csv" 2> "$out/ncu_source_d128_causal$c.err"
       echo "causal $c: rc $? $(wc -l < "$out/ncu_source_d128_causal$c.csv") lines"
       head -3 "$out/ncu_source_d128_causal$c.csv" | cut -c1-300
       gzip -f "$out/ncu_source_d128_causal$c.csv"
     done ;;
  *) echo "step 1, ab, 3, 4, 5 or 6" >&2; exit 2 ;;
esac
