#!/usr/bin/env bash
# The next device session's runs (session 19), one call of at most 600 s each:
#   bash bench/gpu/run_plan.sh STEP OUT_DIR [ARGS]
# Every call carries [".carry"] (bash scripts/gpu_carry.sh; for `cutlass` also
# bash scripts/cutlass_fmha.sh). Order:
# 1. NCU=1 run_plan.sh ab $OUT E,R,P:E,R,P,D dense, where E R P D are
#    bench/gpu/ab_fwd_epilogue.patch, bench/gpu/ab_fwd_q_early.patch,
#    bench/gpu/ab_fwd_q_prefetch.patch and bench/gpu/ab_fwd_double_q.patch (one argument, no
#    space). Part 17: ncu's stall samples put 14% (d64) and 20% (d128) of the N 1024 forward's
#    warp time in the epilogue (the last P V and store_rows: 970 instructions a warp and item at
#    d128 against 535 a steady tile), which hides the next item's Q load. E: the rows stored
#    without a dtype and width test per column pair (wait_top's epilogue alone); R: Q's buffer
#    released once the item's last S is done, not after its last normalization; P: each item's Q
#    prefetched into L2 once claimed; D (d64 only, on E,R,P): two Q buffers, so the next item's
#    Q loads during this one. NCU=1 prints each tree's regions (bench/gpu/ncu_regions.py) so
#    that the A/B says where the time moved, not only whether. Adopt what wins at N 1024 without
#    losing at 16384 beyond the drift (main's two benches); d64 moves +-3% with any change of
#    the loop's schedule (part 17), so read d64 against d128.
# 2. TESTS='*CudaBackward*' AGAIN=0 run_plan.sh ab $OUT BE:BE,BP train_dense, where BE and BP
#    are bench/gpu/ab_bwd_epilogue.patch and bench/gpu/ab_bwd_persistent.patch (BP applies on
#    BE). BP: the persistent backward, one CTA a multiprocessor walking key tiles (items from a
#    counter, or round-robin when all are one length, as the forward's), K and V in two buffers
#    where they fit (d64) so that the next item's load overlaps this one's last steps, no CTA
#    starting cold (launch, barrier set-up, K/V and first stage latency at each of 8-16 steps at
#    N 1024); ATTNKIT_CUDA_PERSISTENT_BWD=0 turns it off, =n sets the CTAs; its test
#    CudaBackwardLong.PersistentWalkMatchesTheOracle runs 3 and 1 CTAs over many items. The
#    steady loop is unchanged (d64 725, d128 801 SASS instructions); the producer spills a few
#    words (its 24 registers), the unpacked store path some (rare dtypes).
#    BE: the backward's dK and dV stored a pair a packed word when they are 16-bit in
#    the kernel's dtype with 4-byte aligned rows (BwdParams::grads_packed), instead of
#    store_grad_pair's dtype, width and alignment tests per pair (~22 instructions a pair, 64
#    pairs a thread at d128; the fast d64 kernel's packed path is ~3 a pair): ~600 (d64) to
#    ~1200 (d128) instructions a warp at each CTA's end, which nothing overlaps (one CTA a
#    multiprocessor), against 8-16 steps of ~900 at N 1024. The patch adds 16-bit gradients 2
#    bytes into their buffers to CudaBackwardLong.UnalignedGradientsMatchTheOracle (the
#    unpacked path).
# 3. If E,R,P wins: NCU=1 run_plan.sh ab $OUT E:R,P dense (which part wins), else the same
#    sets on d128 alone to see if D or the turns patch helps once the epilogue is short:
#    E,R,P,bench/gpu/ab_fwd_turns.patch.
# 4. run_plan.sh 1 $OUT on the adopted tree (the whole test_cuda, check, pytest).
# 5. run_plan.sh 3 $OUT (masked, neighborhood, train: the short items of the masked cases).
# 6. run_plan.sh 7 $OUT: the backward's stall samples by instruction (ncu_regions.py), d128.
# ab SETS ONLY: A/B in one run: main's build (reused where the device kept it) against copies of
#    the tree, one per patch set (SETS: sets separated by ':', each a comma-separated list of
#    patches applied in order), each built fresh and its forward and backward tests run; then
#    bench.py --only ONLY with every tree (and bench/gpu/profile_bwd.py 1024 4096 where ONLY has
#    train), and main once more last (the drift). A set costs ~190 s (build, 77 tests, a dense
#    bench), ~25 s more with NCU=1: two sets a call. TESTS sets the patched trees' gtest filter,
#    AGAIN=0 skips main's second bench.
# Other patches (bench/gpu/*.patch, part 16-17): exp2_poly, chains, turns and wait_top lost at
# d64 in runs 62 and 65 (-2 to -4% at every N, d128 within +-1% but wait_top's +3% at N 1024);
# lazy conflicts with chains.
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
step=${1:?step 1, ab, 3, 4, 5, 6, 7 or cutlass}
out=${2:?output directory}
# source_samples SECONDS KERNEL CSV TREE SCRIPT ARGS...: ncu's per-instruction counters and stall
# samples (SASS, csv) of KERNEL's third launch in `python3 SCRIPT ARGS` with TREE's package, into
# CSV; then its regions (ncu_regions.py, TOP lines of instructions: $TOP, default 4), gzipped.
source_samples() {
  local secs=$1 kernel=$2 f=$3 tree=$4
  shift 4
  timeout "$secs" ncu --kernel-name "regex:$kernel" --launch-skip 2 --launch-count 1 \
    --section SourceCounters --page source --print-source sass --csv \
    env PYTHONPATH="$tree/build-gpu/python" python3 "$@" > "$f" 2> "${f%.csv}.err"
  echo "$kernel $*: rc $? $(wc -l < "$f") lines"
  python3 bench/gpu/ncu_regions.py "$f" "${TOP:-4}" | cut -c1-110
  gzip -f "$f"
}
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
       # NCU=1: where the N 1024 forward's warps wait (d 128 and 64, not causal), per tree.
       if [[ ${NCU:-0} == 1 && $log != *_again.log ]]; then
         for d in 128 64; do
           source_samples 60 fwd_kernel "$out/ncu_${tree//\//_}_d$d.csv" "$tree" \
             bench/gpu/profile_fwd.py 1024 $d 0
         done
       fi
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
       TOP=20 source_samples 200 fwd_kernel "$out/ncu_source_d${d}_causal$c.csv" . \
         bench/gpu/profile_fwd.py 1024 $d $c
     done ;;
  7) build  # the backward's stall samples: d128, N 1024, not causal (profile_bwd.py's first)
     TOP=25 source_samples 240 bwd_kernel "$out/ncu_bwd_d128.csv" . bench/gpu/profile_bwd.py 1024
     ;;
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
  *) echo "step 1, ab, 3, 4, 5, 6, 7 or cutlass" >&2; exit 2 ;;
esac
