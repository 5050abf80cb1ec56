#!/usr/bin/env bash
# The next device session's runs (session 16), one call of at most 600 s each, in order:
#   bash bench/gpu/run_plan.sh STEP OUT_DIR
# 1: build with the grid tiles (GRID_TILES=ON), the whole test_cuda (CudaMaskCache,
#    CudaFastPath.GridNeighborhoodsMatchTheOracle among the new), attnkit check, pytest -k cuda
#    (test_cuda_mask_cache).
# 2: on step 1's build: bench.py --only masked,neighborhood (document with a MaskCache, the
#    neighborhood on grid tiles and cached), then the per-kernel profile of the masked cases.
# 3: bench.py --only train (fwd+bwd, document cached) and dense (grid tiles must not move it).
# 4: compute-sanitizer memcheck on the grid and cache tests.
# 6: A/B of bench/gpu/wip_cross_item.patch (the forward's pipeline run on across items, two Q
#    buffers): built in a copy of the tree, its forward tests, then bench.py --only dense with
#    step 1's build and with the patched one.
# 5: ncu on the short causal forward (N 1024, d 64 and 128): attnkit's fwd_kernel beside
#    cuDNN's, warp states and the tensor pipe (gpu.md "Next" 5: where a CTA's items leave gaps).
# A step that applies a patch on the device must build in a fresh directory (rm -rf build-gpu):
# the next copy of the tree restores older timestamps and ninja keeps stale objects (run 46).
# Results: docs/perf/gpu.md (part 14).
set -uo pipefail
step=${1:?step 1 to 6}
out=${2:?output directory}
export GRID_TILES=ON
build() {
  if [[ ! -d build-gpu/python/attnkit ]]; then
    TEST_FILTER='CudaRules.*' bash scripts/gpu_cuda.sh "$out" --lean --no-bench || exit 1
  fi
}
case $step in
  1) bash scripts/gpu_cuda.sh "$out" --no-bench ;;
  2) build
     PYTHONPATH=build-gpu/python OUT="$out" python3 bench/gpu/bench.py --only masked,neighborhood \
       > "$out/bench.log" 2>&1
     sed -n '/^case /,$p' "$out/bench.log"
     PYTHONPATH=build-gpu/python python3 bench/gpu/profile_general.py > "$out/profile.log" 2>&1
     grep -E "^==|attnkit|kernel" "$out/profile.log" | cut -c1-150 | head -60 ;;
  3) build
     PYTHONPATH=build-gpu/python OUT="$out" python3 bench/gpu/bench.py --only train,dense \
       > "$out/bench.log" 2>&1
     sed -n '/^case /,$p' "$out/bench.log" ;;
  4) build
     export LD_LIBRARY_PATH=$PWD/.carry/hwy/lib
     timeout 300 compute-sanitizer --tool memcheck --error-exitcode 9 build-gpu/tests/test_cuda \
       --gtest_brief=1 --gtest_filter='CudaFastPath.Grid*:CudaMaskCache.*' > "$out/memcheck.log" 2>&1
     echo "memcheck rc $?"; tail -3 "$out/memcheck.log" ;;
  5) build
     for dc in "64 1" "128 1" "64 0"; do
       for kr in fwd_kernel sdpa; do
         timeout 150 ncu --kernel-name "regex:$kr" --launch-skip 2 --launch-count 1 \
           --section SpeedOfLight --section WarpStateStats --section SchedulerStats \
           --section Occupancy --section LaunchStats \
           --metrics 'sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active,regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio' \
           env PYTHONPATH=build-gpu/python python3 bench/gpu/profile_fwd.py 1024 $dc \
           > "$out/ncu_${kr}_${dc// /_}.txt" 2>&1
         echo "== $kr d/causal $dc"
         grep -E "Duration|Registers Per|Warp Cycles Per Issued|Issued Warp|No Eligible|gmma|stalled|Achieved Occ|Compute \(SM\)|Memory Throughput" \
           "$out/ncu_${kr}_${dc// /_}.txt" | grep -v " 0$" | cut -c1-110 | head -40
       done
     done
     PYTHONPATH=build-gpu/python python3 bench/gpu/profile_fwd.py 1024 64 1 --rate ;;
  6) build
     x=/tmp/x root=$PWD; rm -rf $x && mkdir -p $x
     tar --exclude=./build-gpu -cf - . | tar -x -C $x
     (cd $x && patch -p1 -s < "$root/bench/gpu/wip_cross_item.patch") || exit 1
     (cd $x && TEST_FILTER='*CudaOracle*:CudaFastPath*:CudaGeneralPath*:CudaHeadDims*:CudaMaskCache*:*CudaBackward.MatchesOracle/dense:*CudaBackward.MatchesOracle/causal' \
       bash scripts/gpu_cuda.sh "$out/x" --lean --no-bench)
     for tree in . $x; do
       echo "== dense, tree $tree"
       PYTHONPATH=$tree/build-gpu/python OUT="$out" python3 bench/gpu/bench.py --only dense \
         > "$out/bench_${tree//\//_}.log" 2>&1
       sed -n '/^case /,$p' "$out/bench_${tree//\//_}.log"
     done ;;
  *) echo "step 1 to 6" >&2; exit 2 ;;
esac
