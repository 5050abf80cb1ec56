#!/usr/bin/env bash
# dq by tiles again (session 35): run 126 (gpu.md part 33) lost 21-58% of bwd_kernel in both
# modes, as the dq warp converted its tiles with the producer warpgroup's 24 registers (spills in
# every row: +25 us a CTA); the consumer warpgroups count and convert them now. Builds, runs the
# backward's tests (DqTilesMatchTheOracle runs modes 1 and 2), then times the masked backward with
# each mode against the default and the dense one with mode 2 (short rows: against fused_dq);
# then ATTNKIT_CUDA_BWD_READ_WAITS=1 (a CTA's last copies out waited for until read, not landed)
# against the default. NCU=1: then ncu's stall samples of one sliding bwd_kernel launch per mode.
# Usage: [NCU=1] bash bench/gpu/dq_tiles_run.sh OUT_DIR   (~350 s, ~100 s more with NCU=1)
out=${1:?out}
export LD_LIBRARY_PATH=$PWD/.carry/hwy/lib:${LD_LIBRARY_PATH:-}
TEST_TIMEOUT=200 TEST_FILTER='*CudaBackward*' bash scripts/gpu_cuda.sh "$out/t0" --lean --no-bench \
  2>&1 | grep -v "ptxas warning" | tail -4
grep -E "FAILED|DqTiles" "$out/t0/test_cuda.log" | head -8
export PYTHONPATH=build-gpu/python
for m in 1 2; do
  echo "== profile_bwd --masked --kernels --ab ATTNKIT_CUDA_DQ_TILES=$m"
  timeout 150 python3 bench/gpu/profile_bwd.py --masked --kernels --ab ATTNKIT_CUDA_DQ_TILES=$m \
    --case sliding1024-causal,document-causal_cached,softcap30,causal 2>&1 | grep -v -i warn
done
echo "== profile_bwd --kernels --ab ATTNKIT_CUDA_DQ_TILES=2 1024 4096 16384"
timeout 150 python3 bench/gpu/profile_bwd.py --kernels --ab ATTNKIT_CUDA_DQ_TILES=2 \
  1024 4096 16384 2>&1 | grep -v -i warn
echo "== profile_bwd --kernels --ab ATTNKIT_CUDA_BWD_READ_WAITS=1 (masked, then dense)"
timeout 120 python3 bench/gpu/profile_bwd.py --masked --kernels --ab ATTNKIT_CUDA_BWD_READ_WAITS=1 \
  --case sliding1024-causal,document-causal_cached,causal 2>&1 | grep -v -i warn
timeout 100 python3 bench/gpu/profile_bwd.py --kernels --ab ATTNKIT_CUDA_BWD_READ_WAITS=1 \
  1024 4096 2>&1 | grep -v -i warn
[[ ${NCU:-0} == 1 ]] || exit 0
for m in 0 1; do
  echo "== ncu, ATTNKIT_CUDA_DQ_TILES=$m"
  ATTNKIT_CUDA_DQ_TILES=$m timeout 150 ncu --kernel-name regex:bwd_kernel --launch-skip 1 \
    --launch-count 1 --section SourceCounters --page source --print-source sass --csv \
    python3 bench/gpu/profile_bwd.py --once --masked --case sliding1024-causal \
    > "$out/src$m.csv" 2> "$out/src$m.err"
  python3 bench/gpu/ncu_regions.py "$out/src$m.csv" 25 | tail -32
  gzip -f "$out/src$m.csv"
done
