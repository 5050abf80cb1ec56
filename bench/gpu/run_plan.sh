#!/usr/bin/env bash
# The next device session's runs (session 18), one call of at most 600 s each:
#   bash bench/gpu/run_plan.sh STEP OUT_DIR [ARGS]
# Order: the forward A/B (wait_top, exp2_poly), the second forward A/B (turns, chains), the
# backward A/B (exp + band), cutlass (scripts/cutlass_fmha.sh here first), step 1 on the tree
# with what was adopted, step 6 at d64. Every call carries [".carry"].
# ab SETS ONLY: A/B in one run: main's build (reused where the device kept it) against copies of
#    the tree, one per patch set (SETS: sets separated by ':', each a comma-separated list of
#    patches applied in order), each built fresh and its forward and backward tests run; then
#    bench.py --only ONLY with every tree (and bench/gpu/profile_bwd.py 1024 4096 where ONLY has
#    train), and main once more last (the drift). A set costs ~190 s (build, 77 tests, a dense
#    bench): two sets a call. TESTS sets the patched trees' gtest filter, AGAIN=0 skips main's
#    second bench. First:
#    - bench/gpu/ab_fwd_wait_top.patch:bench/gpu/ab_fwd_wait_top.patch,\
#      bench/gpu/ab_fwd_exp2_poly.patch (one argument, no space)
#      dense. Run 61 had three forward changes together against main: d128 +0-3% at every N,
#      d64 -1 to -7%; they are split now. wait_top: the wait for P V at the loop's top (main's
#      fast instances wait for P V before the first exp2: ptxas moved the wait above it; with
#      it the normalization overlaps P V; the loop's instruction count unchanged, 1122 -> 1123
#      at d64), and the epilogue's 16-bit rows of full width stored without a dtype and width
#      test per column pair (a d128 row: ~320 -> 64 instructions). exp2_poly: one 8-key chunk
#      in four takes its exp2s from cuda::exp2_poly (src/cuda/exp2_poly.h: a cubic on the FMA
#      pipe, eight instructions) instead of the MUFU, whose 64 results a warp a tile (8 cycles
#      each) bound the normalization at d64 (part 16): the d64 loop's MUFU 66 -> 50, +113
#      instructions. Adopt what wins (W below); then, in one call of two sets:
#    - W,bench/gpu/ab_fwd_turns.patch : W,bench/gpu/ab_fwd_chains.patch dense. chains: the row
#      max over four partial chains only (a dependent FMNMX chain of 6 instead of 16 before the
#      exp2s can start; +6 instructions in the d64 loop), lazy's part that adds no vote or
#      branch. It applies on main, wait_top, exp2_poly or both. turns: below.
#    - W,bench/gpu/ab_fwd_lazy.patch dense (later; it conflicts with exp2_poly and chains in
#      online_row: merge by hand): on top of wait_top, the row max and sum over four partial
#      chains and the lazy rescale (the running max moved only past 2^8 in the weights, O's
#      rescale skipped in a tile that moves no max of the warp): +29 instructions in the d64
#      loop; the suspect of run 61's d64 loss, so perhaps for kDVp >= 128 only.
#    - bench/gpu/ab_fwd_turns.patch: the ping-pong's turns run on across items. Now warpgroup
#      1 hands warpgroup 0 the first turn of each item only once it has stored its rows of the
#      item before, so the next item's first S waits for that epilogue (at N 1024, 8 tiles an
#      item, ~18 us, run 61's 2.25 us a tile against 1.85 at N 16384). With the patch each
#      warpgroup passes the turn after its last P V too, and warpgroup 0 takes one last turn
#      after the item loop so that no arrival is left pending.
#    - bench/gpu/ab_fwd_q_prefetch.patch dense,masked,neighborhood: each item's Q prefetched
#      into L2 once the item is claimed (producer registers stay 24: at 32 setmaxnreg hangs).
#    - TESTS='*CudaBackward*' AGAIN=0 run_plan.sh ab $OUT \
#      bench/gpu/ab_bwd_exp.patch,bench/gpu/ab_bwd_band.patch train_dense (one set: with the
#      train benches and profile_bwd, two sets would pass 600 s; both patches cut instructions
#      only, so adopt both if the set wins, and split them only if it loses somewhere).
#      exp: P^T's exp2 computed for every score and then selected, instead of under the allowed
#      predicate, where ptxas loaded the scale from the constant bank once a score (LDC) and
#      zeroed the result first (the fast d64 loop 899 -> 861 SASS instructions, d128 969 ->
#      933; the FFMA now reads the scale from a uniform register). band: the backward's band
#      mask with 32-bit bounds clamped to the tile once a key row (the forward's run-57
#      change): with exp, the fast d64 loop 899 -> 726. Session 16's backward desc_add
#      (978edda) had its 36 tests pass but no same-run A/B: main's profile_bwd against run 58's.
# 1: build, the whole test_cuda, attnkit check, pytest -k cuda (run after adopting a patch).
# 3: bench.py --only masked,neighborhood,train (the masked targets, fwd and fwd+bwd).
# 4: compute-sanitizer memcheck and racecheck on the fast paths (scripts/gpu_cuda.sh
#    --sanitize's list; racecheck's known reports: bench/gpu/racecheck_patterns.cu).
# 5: ncu on the N 1024 forward beside cuDNN's: warp states and stall reasons (d 64 / 128, causal
#    and not), then the instruction mix by pipe (gpu.md part 15: 1.5x cuDNN's instructions).
# 6 [D]: ncu's per-instruction counts and stall samples (SASS, source page, csv, gzipped) of the
#    forward at head dim D (default 128) and N 1024, causal and not: which instructions of the
#    steady loop run, how often, and what they wait for.
# cutlass: CUTLASS's Hopper attention example (issue 5's forward reference: >= 0.95x it at N 4096
#    and 16384, d128; fp16, its best kernel a case) beside bench.py --only dense, same run. Build
#    it here first (bash scripts/cutlass_fmha.sh: .carry/cutlass_fmha/fmha, ~5 min of nvcc).
# A step that applies a patch on the device builds in a fresh directory: the next copy of the
# tree restores older timestamps and ninja keeps stale objects (run 46).
# Results: docs/perf/gpu.md (part 17).
set -uo pipefail
step=${1:?step 1, ab, 3, 4, 5, 6 or cutlass}
out=${2:?output directory}
build() {
  if [[ ! -d build-gpu/python/attnkit ]]; then
    TEST_FILTER='CudaRules.*' bash scripts/gpu_cuda.sh "$out" --lean --no-bench || exit 1
  fi
}
case $step in
  1) bash scripts/gpu_cuda.sh "$out" --no-bench ;;
  ab) sets=${3:?patch sets} only=${4:?bench.py --only}
     build
     root=$PWD trees=(.) i=0
     for set in ${sets//:/ }; do
       x=/tmp/x$((++i)); rm -rf $x && mkdir -p $x
       tar --exclude=./build-gpu -cf - . | tar -x -C $x
       for pf in ${set//,/ }; do (cd $x && patch -p1 -s < "$root/$pf") || exit 1; done
       filter=${TESTS:-'*CudaOracle*:CudaFastPath*:CudaHeadDims*:*CudaBackward.MatchesOracle/*'}
       echo "== tree $x: $set"
       (cd $x && TEST_TIMEOUT=150 TEST_FILTER=$filter \
         bash scripts/gpu_cuda.sh "$out/x$i" --lean --no-bench) || exit 1
       trees+=($x)
     done
     # main again at the end: the drift of the card between the first and last bench (clocks,
     # heat), against which the trees' differences of a few percent are read.
     [[ ${AGAIN:-1} == 1 ]] && trees+=(.)
     for tree in "${trees[@]}"; do
       echo "== $only, tree $tree"
       log="$out/bench_${tree//\//_}.log"
       [[ -e $log ]] && log="${log%.log}_again.log"
       PYTHONPATH=$tree/build-gpu/python OUT="$out" python3 bench/gpu/bench.py --only "$only" \
         > "$log" 2>&1
       sed -n '/^case /,$p' "$log" | cut -c1-66
       if [[ $only == *train* ]]; then
         PYTHONPATH=$tree/build-gpu/python timeout 80 python3 bench/gpu/profile_bwd.py 1024 4096
       fi
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
     d=${3:-128}
     for c in 1 0; do
       timeout 200 ncu --kernel-name regex:fwd_kernel --launch-skip 2 --launch-count 1 \
         --section SourceCounters --page source --print-source sass --csv \
         env PYTHONPATH=build-gpu/python python3 bench/gpu/profile_fwd.py 1024 $d $c \
         > "$out/ncu_source_d${d}_causal$c.csv" 2> "$out/ncu_source_d${d}_causal$c.err"
       rc=$? f="$out/ncu_source_d${d}_causal$c.csv"
       echo "causal $c: rc $rc $(wc -l < "$f") lines"
       head -3 "$f" | cut -c1-300
       gzip -f "$f"
     done ;;
  cutlass) build
     f=.carry/cutlass_fmha/fmha
     [[ -x $f ]] || { echo "no $f: run scripts/cutlass_fmha.sh here, carry .carry" >&2; exit 1; }
     for d in 128 64; do
       for n in 1024 4096 16384; do
         for mask in no causal; do
           echo "== d $d n $n mask $mask"
           timeout 60 "$f" --b=$((16384 / n)) --h=$((d >= 128 ? 16 : 32)) --q=$n --k=$n --d=$d \
             --mask=$mask --iterations=50 | grep TFLOPS
         done
       done
     done > "$out/cutlass.txt" 2>&1
     PYTHONPATH=build-gpu/python OUT="$out" python3 bench/gpu/bench.py --only dense \
       > "$out/bench.log" 2>&1
     python3 - "$out" <<'PY'
import json, re, sys
out = sys.argv[1]
best, key = {}, None
for line in open(f"{out}/cutlass.txt"):
    m = re.match(r"== d (\d+) n (\d+) mask (\w+)", line)
    if m:
        key = (int(m[1]), int(m[2]), m[3] == "causal")
    elif "TFLOPS" in line and key:
        best[key] = max(best.get(key, 0.0), float(line.split(":")[-1].split()[0]))
print("%-28s %8s %8s %8s %8s %8s" % ("case", "attnkit", "cutlass", "ratio", "cudnn", "ratio"))
for r in json.load(open(f"{out}/gpu_bench.json")):
    k = (r.get("d"), r.get("n"), r.get("causal"))
    if r.get("case") == "dense" and k in best:
        print("%-28s %8.0f %8.0f %8.2f %8.0f %8.2f" % (
            "d%d n%d%s" % (k[0], k[1], " causal" if k[2] else ""), r["attnkit"], best[k],
            r["attnkit"] / best[k], r["cudnn"], r["vs_cudnn"]))
PY
     ;;
  *) echo "step 1, ab, 3, 4, 5, 6 or cutlass" >&2; exit 2 ;;
esac
