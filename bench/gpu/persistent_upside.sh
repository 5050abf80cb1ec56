#!/usr/bin/env bash
# The persistent backward's upside first: the patched tree (lean default build), the switch
# against its own default (profile_bwd --ab), then its backward tests under a timeout.
out=${1:?out}
x=/tmp/xq && rm -rf $x && mkdir -p $x && tar --exclude=./build-gpu -cf - . | tar -x -C $x
cd $x && patch -p1 -s < bench/gpu/ab_bwd_persistent.patch || exit 1
export LD_LIBRARY_PATH=$PWD/.carry/hwy/lib:${LD_LIBRARY_PATH:-}
TEST_FILTER='CudaRules.*' bash scripts/gpu_cuda.sh "$out/t0" --lean --no-bench 2>&1 |
  grep -v "ptxas warn" | tail -2
export PYTHONPATH=build-gpu/python
echo "== masked --ab ATTNKIT_CUDA_BWD_PERSISTENT=1"
timeout 150 python3 bench/gpu/profile_bwd.py --masked --kernels --ab ATTNKIT_CUDA_BWD_PERSISTENT=1 \
  --case sliding1024-causal,causal,alibi-causal 2>&1 | grep -v -i warn
echo "== dense --ab ATTNKIT_CUDA_BWD_PERSISTENT=1 1024 4096 16384"
timeout 120 python3 bench/gpu/profile_bwd.py --kernels --ab ATTNKIT_CUDA_BWD_PERSISTENT=1 \
  1024 4096 16384 2>&1 | grep -v -i warn
for t in 'CudaBackwardHeadDims.*' 'CudaBackwardLong.Persistent*'; do
  echo "== $t"
  timeout 90 build-gpu/tests/test_cuda --gtest_brief=1 --gtest_filter="$t" > "$out/${t%%.*}.log" 2>&1
  echo "rc $?"; grep -E "Failure|Expected|actual|d=" "$out/${t%%.*}.log" | head -8
done
