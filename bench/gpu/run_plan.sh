#!/usr/bin/env bash
# The next device session's runs, one call of at most 600 s each, in order:
#   bash bench/gpu/run_plan.sh STEP OUT_DIR
# 1: the tree as committed: build, the whole test_cuda (the persistent forward, round-robin
#    dealing, the backward head-dim test), attnkit check, pytest -k cuda.
# 2: bench.py --only dense,train on step 1's build (built again if the machine is a new one).
# 3: bench/gpu/wip_double_q.patch and wip_lscale_bwd.patch applied: the forward and backward
#    oracle tests, the length scale's pytest, then bench.py --only dense (against step 2's).
# 4: head dims 192, 256 and 192/128 with their backward (ATTNKIT_BWD_MAX_HEAD_DIM=256): the
#    head-dim tests, then bench.py --only wide.
# 5: compute-sanitizer memcheck and racecheck (gpu_cuda.sh's list, the persistent forward's
#    CudaFastPath tests among them) on the committed tree.
# Results: docs/perf/gpu.md (parts 11 and 12, and the "Next" list).
set -uo pipefail
step=${1:?step 1 to 5}
out=${2:?output directory}
case $step in
  1) bash scripts/gpu_cuda.sh "$out" --no-bench ;;
  2) if [[ ! -d build-gpu/python/attnkit ]]; then
       TEST_FILTER='CudaRules.*' bash scripts/gpu_cuda.sh "$out" --lean --no-bench || exit 1
     fi
     PYTHONPATH=build-gpu/python OUT="$out" python3 bench/gpu/bench.py --only dense,train \
       > "$out/bench.log" 2>&1
     sed -n '/^case /,$p' "$out/bench.log" ;;
  3) git apply bench/gpu/wip_double_q.patch bench/gpu/wip_lscale_bwd.patch || exit 1
     TEST_FILTER='CudaFastPath.*:All/CudaOracle.*:All/CudaBackward.*:CudaBackwardRules.*' \
       bash scripts/gpu_cuda.sh "$out" --lean --only dense
     PYTHONPATH=build-gpu/python python3 -m pytest -q -p no:cacheprovider \
       python/tests/test_torch.py -k "cuda and length_scale" ;;
  4) HEAD_DIMS="64;128;192;256;192x128" BWD_MAX_HEAD_DIM=256 \
       TEST_FILTER='CudaBackwardHeadDims.*:CudaHeadDims.*' \
       bash scripts/gpu_cuda.sh "$out" --lean --only wide ;;
  5) TEST_FILTER='CudaFastPath.*' bash scripts/gpu_cuda.sh "$out" --lean --no-bench --sanitize ;;
  *) echo "step 1 to 5" >&2; exit 2 ;;
esac
