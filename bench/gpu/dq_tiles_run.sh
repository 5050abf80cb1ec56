#!/usr/bin/env bash
# Session 33, run 126: dq by tiles (ATTNKIT_CUDA_DQ_TILES=1, 2) on trial: the backward's tests
# under each mode, then the masked and dense backward timed with each mode against the default.
out=${1:?out}
export LD_LIBRARY_PATH=$PWD/.carry/hwy/lib:${LD_LIBRARY_PATH:-}
TEST_TIMEOUT=200 TEST_FILTER='*CudaBackward*' bash scripts/gpu_cuda.sh "$out/t0" --lean --no-bench \
  2>&1 | tail -8
for m in 2 1; do
  echo "== ATTNKIT_CUDA_DQ_TILES=$m: CudaBackward.*"
  ATTNKIT_CUDA_DQ_TILES=$m timeout 150 build-gpu/tests/test_cuda --gtest_brief=1 \
    --gtest_filter='CudaBackward.*' > "$out/tiles$m.log" 2>&1
  echo "rc $?"; grep -E 'FAILED|PASSED|rel_err' "$out/tiles$m.log" | head -12
done
export PYTHONPATH=build-gpu/python
for m in 2 1; do
  echo "== profile_bwd --masked --kernels --ab ATTNKIT_CUDA_DQ_TILES=$m"
  timeout 150 python3 bench/gpu/profile_bwd.py --masked --kernels --ab ATTNKIT_CUDA_DQ_TILES=$m \
    --case sliding1024-causal,document-causal_cached,softcap30,causal 2>&1 | tail -14
done
