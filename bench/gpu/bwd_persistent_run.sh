#!/usr/bin/env bash
# The persistent backward on trial (session 35; ATTNKIT_CUDA_BWD_PERSISTENT, the band instance):
# builds (lean), runs the backward's tests (PersistentMatchesTheOracle among them), times the
# switch against the default in one build (masked cases on the band instance: sliding, causal,
# ALiBi; dense at N 1024 / 4096 / 16384, where it takes fused_dq's place at N 1024), then the CUDA
# fuzzer with three persistent CTAs (varlen's empty key tiles among its draws).
# Usage: bash bench/gpu/bwd_persistent_run.sh OUT_DIR   (~330 s with the build)
out=${1:?out}
export LD_LIBRARY_PATH=$PWD/.carry/hwy/lib:${LD_LIBRARY_PATH:-}
TEST_TIMEOUT=240 TEST_FILTER='*CudaBackward*' bash scripts/gpu_cuda.sh "$out/t0" --lean --no-bench \
  2>&1 | grep -v "ptxas warning" | tail -3
grep -E "FAILED|Persistent|Failure|error" "$out/t0/test_cuda.log" | head -12
export PYTHONPATH=build-gpu/python
echo "== profile_bwd --masked --kernels --ab ATTNKIT_CUDA_BWD_PERSISTENT=1"
timeout 150 python3 bench/gpu/profile_bwd.py --masked --kernels --ab ATTNKIT_CUDA_BWD_PERSISTENT=1 \
  --case sliding1024-causal,causal,alibi-causal 2>&1 | grep -v -i warn
echo "== profile_bwd --kernels --ab ATTNKIT_CUDA_BWD_PERSISTENT=1 1024 4096 16384"
timeout 150 python3 bench/gpu/profile_bwd.py --kernels --ab ATTNKIT_CUDA_BWD_PERSISTENT=1 \
  1024 4096 16384 2>&1 | grep -v -i warn
echo "== fuzz, ATTNKIT_CUDA_BWD_PERSISTENT=3"
cmake --build build-gpu --target attnkit_cli > /dev/null 2>&1 &&
  ATTNKIT_CUDA_BWD_PERSISTENT=3 timeout 80 build-gpu/attnkit fuzz --device cuda --seed 41206 \
    --seconds 60 2>&1 | tail -2
