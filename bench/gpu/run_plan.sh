#!/usr/bin/env bash
# The next device session's runs (session 52; session 51's runs 226-231, gpu.md part 51: main's
# whole test_cuda, check and pytest pass; the idle patch's d128 loss traced to a second copy of the
# store in its per-item code, mended; split dropped), one call of at most 600 s each:
#   bash bench/gpu/run_plan.sh STEP OUT_DIR [ARGS]
# Every call carries [".carry"] (bash scripts/gpu_carry.sh; for `cutlass` also
# bash scripts/cutlass_fmha.sh). A call that must start a machine costs ~90-180 s more (the
# device tool's held time, not the command's); a refused start costs ~90-120 s (session 41: five
# of them, ~550 s; session 44: ten), and for some minutes after one every call is refused (15 s
# each): wait as long as the refusal says, and send the correctness run first. The nvidia-h200
# kind may come back on an H100 when nvidia-h100-x1 is refused (session 38). Issue the next call
# as soon as one returns: the machine is released ~30 s after a call. Keep each tree's TESTS
# short (the whole test_cuda takes ~200 s; TEST_TIMEOUT bounds the whole binary, not a test: run
# 161's 150 s cut a passing list, and run 196's). `ab` with many files under $OUT brings back
# only some (run 200 lost its test logs; `ab` prints each tree's summary since). A --lean
# build has no CLI: `cmake --build build-gpu --target attnkit_cli` before `attnkit fuzz`.
# Switches read from the environment: A/B them in one build
# with alternating rounds (python3 bench/gpu/ab_env.py VAR=VAL [--bwd] [--rounds R] [--masked
# NAMES] [--d D] [--alibi]); one measurement a case (profile_bwd.py --ab) moved bwd_kernel by
# up to 5% (run 150), and 5 rounds' medians moved by 1-2% between runs 155 and 157 (run 165: the
# same kernel twice, 0.979): count a gain only beyond that. A switch measures its branch
# against itself: code added to the steady loop is A/B'd compiled out (`ab`, part 41).
# A hang's diagnosis: CUDA_FLAGS=-DATTNKIT_DEBUG_MBAR_TIMEOUT (gpu_cuda.sh): mbar_wait names a
# barrier stuck for ~2 s, then every wait gives up so that the kernel ends and the name prints.
# With little device time, first the shortest useful call (~300 s):
# TEST_FILTER='CudaFastPath.*:CudaRules.*:All/CudaOracle.*:CudaHeadDims.*' TEST_TIMEOUT=280 \
#   bash scripts/gpu_cuda.sh $OUT --lean --no-bench
# A. (session 51, runs 226-231, part 51) step 1 on main passed (112 + 356 + 34). Run 226, with
#    the old idle patch (a third store_done() site: ptxas copied the whole store, +1400 SASS
#    instructions an instance): d64 +0.6 to +3.6% (N 1024 +3.1%, causal 2048 +3.6%), causal 896 /
#    1024 -1.4 / -1.1%, d128 up to -3.8%; tail within the tree +1.4 / +2.9 / +2.6% at causal 1024 /
#    1280 / 2048, -3.2% at 768; rotation +1.9% at N 1024; split nothing (dropped, git b391c0a).
#    ROWS192 for ALiBi causal from 768 confirmed (0.976 / 1.002 / 0.983 with it off).
# N. The idle patch mended (its idle first tile calls the store at the empty branch's site; SASS
#    as main's but 120-320 instructions an instance), alone and with the tail (its first passed
#    turn now handed on before its last P V's wait, part 51):
#    AB_ENV='ATTNKIT_CUDA_FWD_TAIL=0 --d 64 --causal --n 768 1024 1280 2048;
#    ATTNKIT_CUDA_FWD_ROTATE=0 --d 64 --dense --n 1024 2048' \
#    BENCH_NS="896 1024 1280 2048" PAR=1 run_plan.sh ab $OUT \
#      fwd_idle_wg:fwd_idle_wg,fwd_wg_tail dense
#    (d128 the control: it should now match main within 1%; d64 N 1024 +3%; the tail's 768 loss
#    decides whether it starts at 5 tiles; if d128 still trails main by more than 1%, compare
#    ncu's samples by region next: run_plan.sh 6 $OUT 128 on main, then the same source_samples
#    with /tmp/x1 as the tree, while warm). Adopt what gains; then, on the adopted tree,
#    `run_plan.sh 1` (the whole test_cuda) and racecheck (step 4).
#    d64 causal N 768-1280 0.82-0.88x (run 226): the per-item code is 19% of the samples (run 229).
# S. ab_fwd_stages4.patch (part 51; applies alone or after the two above): d64's ring of 4 stages
#    (3 before; d128 unchanged) and the producer's first K of an item before its Q
#    (ATTNKIT_CUDA_FWD_K_FIRST=0 off; Q waits for the consumers' last S of the item before):
#    AB_ENV='ATTNKIT_CUDA_FWD_K_FIRST=0 --rounds 5' BENCH_NS="1024 2048 4096" PAR=1 \
#      run_plan.sh ab $OUT fwd_stages4 dense
#    (the tree against main: d128 K_FIRST's share alone, d64 both; AB_ENV: K_FIRST's own, d64 and
#    d128, N 1024 and 4096, both masks. run 229: the steady loop's top stall, 5.4% of the
#    samples, is the wait for K, full_k).
# B. The d128 N 16384 gap to 86d321c (runs 200, 203; main's own benches there drift ~2%; main
#    621-642 since run 210, 86d321c's 629 / 636 in run 200: likely closed): A/B in
#    the 176-key instance what else 72f9ddb changed, one at a time (the store's predicated code
#    with __fdividef / __logf; O, m, l across items; the first S under __shfl_sync).
# C. CUTLASS at N 4096 (`run_plan.sh cutlass`; d128 0.87x in run 199, 0.94x in run 213 with the
#    example itself 6% slower than in run 199).
# 2. The dense forward against cuDNN (run 147, H100, the band's bits as one run since): d128
#    0.90 / 0.87-0.88 causal at N 1024, 0.95-0.99 / 1.01-1.02 at 4096; d64 0.90-0.92 /
#    0.83-0.85, 0.96-0.97 / 0.95 (gpu.md Next item 2 lists what is left to try).
# 4. With what is left: SANITIZE_TOOLS=racecheck SANITIZE_SKIP='CudaFastPath.*' run_plan.sh 4
#    $OUT (the backward's list, last run 159), or run_plan.sh 7 $OUT '--masked --case
#    alibi-causal' on the adopted tree.
# Session 22 (part 21): the uniform warpgroup index adopted (+1-1.5% d128 N >= 4096, softcap
# +8%); O of the d128 forward by the copy engine lost 4-7% at N >= 4096 (the steady loop grew);
# CUTLASS's lead is the kernel's (back to back it is wider).
# Session 21 (part 20) adopted dq's conversion by each group's last CTA (+3-6% backward at N
# 1024) and the d64 forward's O by the copy engine (+2-5%); the fused bound at 8192 rows lost.
# A forward switch read from the environment A/Bs in one build: python3
# bench/gpu/ab_env.py VAR=VAL [--d D] [--n N] (run 92). Each backward kernel's own duration
# under ncu: ncu --metrics gpu__time_duration.sum python3 bench/gpu/profile_bwd.py --once --d D N.
# ab SETS ONLY: A/B in one run: main's build (reused where the device kept it) against copies of
#    the tree, one per patch set (SETS: sets separated by ':', each a comma-separated list of
#    patches applied in order: paths, or NAME for bench/gpu/ab_NAME.patch), each built fresh
#    and its forward and backward tests run; then bench.py --only ONLY with every tree (and
#    bench/gpu/profile_bwd.py $PROFILE, default 1024 4096, where ONLY has train), and main once
#    more last (the drift). A set costs ~190 s (build, 89 tests, a dense
#    bench), ~25 s more with NCU=1: two sets a call. TESTS sets the patched trees' gtest filter,
#    AGAIN=0 skips main's second bench; PAR=1 builds main and every tree at once (run 76: two
#    cold builds in 114 s); AB_ENV runs ab_env.py A/Bs (';'-separated argument lists) on the
#    last patched tree after the benches.
# bench/gpu keeps ab_fwd_idle_wg.patch and ab_fwd_wg_tail.patch (in that order; step N), and
# ab_fwd_stages4.patch (step S).
# Decided: fwd_split_last gained nothing in run 226 (git show
# b391c0a:bench/gpu/ab_fwd_split_last.patch);
# fwd_pairs_odd adopted in run 219, fwd_pairs_last lost there (git show
# 986e178:bench/gpu/ab_fwd_pairs_last.patch);
# ab_fwd_early_store.patch (the late store reversed) no longer applies after run 210 (git show
# f9bcdde:bench/gpu/ab_fwd_early_store.patch);
# fwd_store_order and fwd_store_vec16 adopted in run 210 (git show
# f9bcdde:bench/gpu/ab_fwd_store_order.patch, f9bcdde:bench/gpu/ab_fwd_store_vec16.patch);
# fwd_carry_pv and fwd_v_first lost in run 207 (git
# show 4b5a194:bench/gpu/ab_fwd_carry_pv.patch, 4b5a194:bench/gpu/ab_fwd_v_first.patch);
# fwd_store_packed and fwd_wide_at_once lost in runs 203-204 (git show
# 1518708:bench/gpu/ab_fwd_store_packed.patch, git show
# 26c9554:bench/gpu/ab_fwd_wide_at_once.patch), fwd_late_store adopted (run 200; the patch
# is that one reversed), mbar_hint lost in run 195 (git show
# f11eac3:bench/gpu/ab_mbar_hint.patch; its step `hint` in run_plan.sh there),
# fwd_align_end adopted (session 40),
# fwd_rows192_alibi lost in run 172, won in sessions 41-42 (runs 179-180, 184; in git at
# 3a02a3d, its forward.cu half on main, by default since session 42), fwd_no_trim won in run
# 183 (the trim dropped; git show c816ded:bench/gpu/ab_fwd_no_trim.patch),
# fwd_rows192 adopted (9b4e580); bits16 lost in
# run 160 (git show ffe0624:bench/gpu/ab_bits16.patch), prep_rows lost in run 153 (git show
# 72a2af9:bench/gpu/ab_prep_rows.patch); band_bits adopted (3a58dbb), the persistent backward
# dropped (in git at 63743d6), the key-tile-major grid dropped (in git at 4f02bfb); decided
# in session 32 (in git at ede138e): and_tree, na_int64 and grid_patch_keys (main's changes
# adopted), fwd_exp_poly (lost);
# fwd_grid_bits is on main (8fe1878), bwd_kv_early lost in runs 116 and 118 (git show
# 59e992f:bench/gpu/ab_bwd_kv_early.patch); fwd_lean and fwd_item_slot lost in run 114 (git
# show f0a091d:bench/gpu/ab_fwd_lean.patch).
# In git history: tma_out_k and tma_out_grid (lost in run 94: git show
# 5a9b5ac:bench/gpu/ab_fwd_tma_out_k.patch), turns (c6e0c31), chains, wait_top and lazy (part
# 17), the backward's lean and uniform ones at e88edb0, early dQ at cd98b26, fused dq at 0cdd834.
# 1: build, the whole test_cuda, attnkit check, pytest -k cuda (run after adopting a patch).
# 3: bench.py --only masked,neighborhood,train (the masked targets, fwd and fwd+bwd).
# 4: compute-sanitizer memcheck and racecheck on the fast paths (scripts/gpu_cuda.sh
#    --sanitize's list; racecheck's known reports: bench/gpu/racecheck_patterns.cu).
# 5: ncu on the N 1024 forward beside cuDNN's: warp states and stall reasons (d 64 / 128, causal
#    and not), then the instruction mix by pipe (gpu.md part 15: 1.5x cuDNN's instructions).
# 7 [ARGS], 8, 9: the backward's stall samples, its kernels' times, its tensor pipe's share
#    (see their lines below). 10: the forward's tensor pipe beside cuDNN's (N 1024 and 16384).
# 6 [D]: ncu's per-instruction counts and stall samples (SASS, source page, csv, gzipped) of the
#    forward at head dim D (default 128) and N 1024, causal and not: which instructions of the
#    steady loop run, how often, and what they wait for.
# cutlass: CUTLASS's Hopper attention example (issue 5's forward reference: >= 0.95x it at N 4096
#    and 16384, d128; fp16, its best kernel a case) beside bench.py --only dense, same run. Build
#    it here first (bash scripts/cutlass_fmha.sh: .carry/cutlass_fmha/fmha, ~5 min of nvcc).
# A step that applies a patch on the device builds in a fresh directory: the next copy of the
# tree restores older timestamps and ninja keeps stale objects (run 46).
# Results: docs/perf/gpu.md (its parts in order; part 44 the latest).
set -uo pipefail
step=${1:?step 1, ab, keys176, verify, bench, 3, 4, 5, 6, 7, 8, 9, 10 or cutlass}
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
     # PAR=1: main's build and every tree's build and tests at once (a cold device's two
     # builds in ~1.4 of one's time instead of two).
     [[ ${PAR:-0} == 1 ]] && { build & } || build
     root=$PWD trees=(.) i=0 pids=()
     for set in ${sets//:/ }; do
       x=/tmp/x$((++i)); rm -rf $x && mkdir -p $x
       tar --exclude=./build-gpu -cf - . | tar -x -C $x
       for pf in ${set//,/ }; do  # a path, or NAME for bench/gpu/ab_NAME.patch
         [[ -f $root/$pf ]] || pf=bench/gpu/ab_$pf.patch
         (cd $x && patch -p1 -s < "$root/$pf") || exit 1
       done
       filter=${TESTS:-'*CudaOracle*:CudaFastPath*:CudaHeadDims*:*CudaBackward.MatchesOracle/*'}
       echo "== tree $x: $set"
       tree_run() {
         (cd $x && TEST_TIMEOUT=${TEST_TIMEOUT:-400} TEST_FILTER=$filter \
           bash scripts/gpu_cuda.sh "$out/x$i" --lean --no-bench)
       }
       if [[ ${PAR:-0} == 1 ]]; then tree_run & pids+=($!); else tree_run || exit 1; fi
       trees+=($x)
     done
     for pid in "${pids[@]}"; do wait "$pid" || exit 1; done
     wait
     [[ -d build-gpu/python/attnkit ]] || exit 1
     # main again at the end: the drift of the card between the first and last bench (clocks,
     # heat), against which the trees' differences of a few percent are read.
     [[ ${AGAIN:-1} == 1 ]] && trees+=(.)
     for tree in "${trees[@]}"; do
       echo "== $only, tree $tree"
       # (each tree's test summary again beside its bench: $out's logs may not all come back and
       # the output's tail is what returns, run 200)
       [[ $tree != . ]] && grep -h -E '^\[  (PASSED|FAILED)' "$out/x${tree#/tmp/x}/test_cuda.log"
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
       if [[ $only == *train* ]]; then  # PROFILE: profile_bwd.py's arguments
         PYTHONPATH=$tree/build-gpu/python timeout 150 python3 bench/gpu/profile_bwd.py \
           ${PROFILE:-1024 4096}
       fi
     done
     # AB_ENV: ab_env.py's arguments, A/Bs separated by ';', on the last patched tree's build
     # (its switches against itself, in the same call as the benches).
     last=${trees[${#trees[@]} - 1]}
     [[ $last == . && ${#trees[@]} -gt 2 ]] && last=${trees[${#trees[@]} - 2]}
     IFS=';' read -ra abs <<< "${AB_ENV:-}"
     for a in "${abs[@]}"; do
       [[ -z ${a// /} ]] && continue
       echo "== ab_env $a (tree $last)"
       # shellcheck disable=SC2086
       PYTHONPATH=$last/build-gpu/python timeout 120 python3 bench/gpu/ab_env.py $a
     done ;;
  verify) build
     cmake --build build-gpu --target attnkit_cli > /dev/null || exit 1
     f='CudaFastPath.AlignEnd*:All/CudaOracle.MatchesOracle/causal:'
     f+='All/CudaOracle.MatchesOracle/sliding_window'
     for t in memcheck racecheck; do
       timeout 200 compute-sanitizer --tool $t --error-exitcode 9 --print-limit 100 \
         build-gpu/tests/test_cuda --gtest_filter="$f" > "$out/$t.log" 2>&1
       echo "$t rc $?"; grep -E "PASSED|FAILED|SUMMARY" "$out/$t.log" | head -4
     done
     timeout 90 build-gpu/attnkit fuzz --device cuda --seed "${SEED:-57000}" --seconds 60 \
       > "$out/fuzz.log" 2>&1
     echo "fuzz rc $?"; tail -3 "$out/fuzz.log" ;;
  keys176)  # session 43: the d128 forward's 176-key tiles (FwdParams::keys176): build, their
     # tests, the spills, the A/B against 128 keys (dense d128, N 1024 / 4096 / 16384), then the
     # whole test_cuda and bench.py --only dense with them on wherever they can run (=1)
     TEST_FILTER='CudaFastPath.Keys176*:CudaHeadDims.*:CudaFastPath.LongSeq*:CudaFastPath.Rising*' \
       TEST_TIMEOUT=240 bash scripts/gpu_cuda.sh "$out" --lean --no-bench > "$out/build.log" 2>&1
     echo "build and tests: rc $?"
     grep -E "^\[  (PASSED|FAILED) |Failure" "$out/test_cuda.log" | head -20
     cuobjdump -sass build-gpu/CMakeFiles/attnkit.dir/cuda_gen/fwd_bf16_128x128.cu.o |
       awk '/Function :/{f=$3} /LDL|STL/{n[f]++} END{for(k in n) print n[k], "LDL/STL in", k}'
     PYTHONPATH=build-gpu/python timeout 200 python3 bench/gpu/ab_env.py \
       ATTNKIT_CUDA_FWD_KEYS176=1 --dense --d 128 --n 1024 4096 16384 --rounds 5 \
       > "$out/ab_keys176.log" 2>&1
     tail -5 "$out/ab_keys176.log"
     export ATTNKIT_CUDA_FWD_KEYS176=1
     timeout "${TEST_TIMEOUT:-250}" build-gpu/tests/test_cuda > "$out/test_cuda_keys176.log" 2>&1
     echo "test_cuda, 176-key tiles where they run: rc $?"
     grep -E "^\[  (PASSED|FAILED) |Failure" "$out/test_cuda_keys176.log" | head -20
     PYTHONPATH=build-gpu/python OUT="$out" timeout 90 python3 bench/gpu/bench.py --only dense \
       > "$out/bench.log" 2>&1
     sed -n '/^case /,$p' "$out/bench.log" ;;
  bench) build  # bench.py --only ${3:-dense,train}
     PYTHONPATH=build-gpu/python OUT="$out" python3 bench/gpu/bench.py --only "${3:-dense,train}" \
       > "$out/bench.log" 2>&1
     sed -n '/^case /,$p' "$out/bench.log" ;;
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
  7) build  # the backward's stall samples: profile_bwd.py's first case of ARGS (default: d128,
     # N 1024, not causal; e.g. `--d 64 1024`, or `--masked --case alibi-causal`)
     args=${3:-1024}
     tag=$(echo "$args" | tr -c 'a-z0-9\n' '_')
     TOP=25 source_samples 240 bwd_kernel "$out/ncu_bwd_$tag.csv" . bench/gpu/profile_bwd.py $args
     ;;
  9) build  # the backward's tensor pipe: active cycles against elapsed (d128 and d64, N 1024,
     # not causal, the first bwd_kernel of each), and its warps' stall reasons
     for d in 128 64; do
       timeout 120 ncu --kernel-name regex:bwd_kernel --launch-skip 2 --launch-count 1 \
         --section SpeedOfLight --section WarpStateStats --section ComputeWorkloadAnalysis \
         --metrics "regex:sm__pipe_.*tensor.*cycles_active.avg.pct_of_peak_sustained_active" \
         env PYTHONPATH=build-gpu/python python3 bench/gpu/profile_bwd.py --d $d 1024 \
         > "$out/ncu_bwd_pipe_d$d.txt" 2>&1
       echo "== d $d"
       grep -i -E "Duration|tensor|SM Busy|Compute \(SM\)|Issued Warp|Executed Ipc" \
         "$out/ncu_bwd_pipe_d$d.txt" | cut -c1-110
     done
     # the fixed cost of a CTA (backward) and an item (forward), in steps' worth
     PYTHONPATH=build-gpu/python timeout 120 python3 bench/gpu/fixed_cost.py ;;
  10) build  # the forward's tensor pipe: active cycles against elapsed, attnkit's fwd_kernel
     # beside cuDNN's, at N 1024 and 16384 (d64 causal, d128 not): the short forward's idle share
     m="regex:sm__pipe_.*tensor.*cycles_active.avg.pct_of_peak_sustained_(active|elapsed)"
     for c in "1024 64 1" "16384 64 1" "1024 128 0" "16384 128 0"; do
       for kr in fwd_kernel sdpa; do
         f="$out/ncu_pipe_${kr}_${c// /_}.txt"
         timeout 60 ncu --kernel-name "regex:$kr" --launch-skip 2 --launch-count 1 \
           --section SpeedOfLight --section ComputeWorkloadAnalysis \
           --metrics "$m" \
           env PYTHONPATH=build-gpu/python python3 bench/gpu/profile_fwd.py $c > "$f" 2>&1
         echo "== $kr N/d/causal $c: rc $?"
         grep -i -E "Duration|tensor|SM Busy|Executed Ipc A" "$f" | cut -c1-110
       done
     done ;;
  8) build  # each backward kernel's time (preparation, bwd_kernel, dq's conversion), dense at
     # N 1024 and 4096, then the masked cases beside Flex, each pass alone
     PYTHONPATH=build-gpu/python timeout 200 python3 bench/gpu/profile_bwd.py --kernels 1024 4096
     PYTHONPATH=build-gpu/python timeout 200 python3 bench/gpu/profile_bwd.py --kernels --masked
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
     PYTHONPATH=build-gpu/python timeout 200 python3 bench/gpu/back_to_back.py \
       --json "$out/b2b.json" > "$out/b2b.log" 2>&1
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
try:  # the same cases timed as CUTLASS times itself (back_to_back.py: fp16, 50 calls, no flush)
    b2b = json.load(open(f"{out}/b2b.json"))
except (OSError, ValueError):
    b2b = []
if b2b:
    print("back to back, fp16: %-14s %8s %8s %8s %8s %8s" % (
        "case", "attnkit", "cutlass", "ratio", "cudnn", "ratio"))
for r in b2b:
    k = (r["d"], r["n"], r["causal"])
    if k in best:
        print("%-34s %8.0f %8.0f %8.2f %8.0f %8.2f" % (
            "d%d n%d%s" % (k[0], k[1], " causal" if k[2] else ""), r["attnkit_fp16"], best[k],
            r["attnkit_fp16"] / best[k], r["cudnn"], r["attnkit_fp16"] / r["cudnn"]))
PY
     ;;
  *) echo "step 1, ab, keys176, verify, bench, 3, 4, 5, 6, 7, 8, 9, 10 or cutlass" >&2; exit 2 ;;
esac
