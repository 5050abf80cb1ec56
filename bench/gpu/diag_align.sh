#!/usr/bin/env bash
# Session 40's diagnosis of ab_fwd_align_end.patch's illegal instruction (run 169): the patched
# tree's build, then the first failing test alone under switches, and memcheck's report.
set -uo pipefail
out=$1; x=/tmp/align; rm -rf $x && mkdir -p $x
tar --exclude=./build-gpu -cf - . | tar -x -C $x
cd $x && patch -p1 -s < bench/gpu/ab_fwd_align_end.patch || exit 1
TEST_FILTER='CudaRules.*' bash scripts/gpu_cuda.sh "$out" --lean --no-bench 2>&1 | grep -v "ptxas warning" | tail -3
t=build-gpu/tests/test_cuda
f='CudaFastPath.LongSequences*'
for e in ATTNKIT_CUDA_FWD_ALIGN_END=0 X=1 ATTNKIT_CUDA_TMA_OUT=0 ATTNKIT_CUDA_FWD_PAIRS=0 \
         ATTNKIT_CUDA_FWD_TURNS=0 "ATTNKIT_CUDA_TMA_OUT=0 ATTNKIT_CUDA_FWD_TURNS=0 ATTNKIT_CUDA_FWD_PAIRS=0"; do
  env $e timeout 60 $t --gtest_filter="$f" > /tmp/l.log 2>&1
  echo "== $e: rc $? $(grep -c 'Failure' /tmp/l.log) failures; first: $(grep -m1 -A4 Failure /tmp/l.log | tail -1 | cut -c1-160)"
done
timeout 120 compute-sanitizer --tool memcheck --print-limit 8 $t --gtest_filter="$f" > $out/memcheck.log 2>&1
echo "memcheck rc $?"; grep -v "^\[" $out/memcheck.log | grep -B2 -A14 -m3 "=====.*\(Invalid\|Illegal\|rror\)" | cut -c1-200 | head -80
