#!/usr/bin/env bash
# Builds CUTLASS's own Hopper attention example (examples/88_hopper_fmha of PyPI's
# nvidia-cutlass 4.2 wheel, fp16, sm_90a), issue 5's forward reference, into
# .carry/cutlass_fmha/fmha for the device tool's carry: the GPU machine has neither the headers
# nor the internet, and the example is one translation unit (~5 minutes of nvcc here or there).
# Nothing of CUTLASS enters the repository: the wheel is downloaded into a cache outside it.
#   bash scripts/cutlass_fmha.sh          # then: run_plan.sh cutlass $OUT (with carry .carry)
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${CUTLASS_CACHE:-/tmp/attnkit_cutlass}
out=.carry/cutlass_fmha
src=$cache/x/cutlass_library/source
if [[ ! -d $src/examples/88_hopper_fmha ]]; then
  mkdir -p "$cache"
  python3 -m pip download --no-deps -q -d "$cache" nvidia-cutlass==4.2.0.0
  rm -rf "$cache/x" && python3 -m zipfile -e "$cache"/nvidia_cutlass-4.2.0.0-py3-none-any.whl \
    "$cache/x"
fi
grep -qx '/.carry/' .git/info/exclude 2>/dev/null || echo '/.carry/' >> .git/info/exclude
mkdir -p "$out"
nvcc=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
t0=$(date +%s)
"$nvcc" -std=c++17 -O3 -DNDEBUG --use_fast_math --expt-relaxed-constexpr \
  --generate-code=arch=compute_90a,code=sm_90a \
  -I"$src/include" -I"$src/tools/util/include" -I"$src/examples/88_hopper_fmha" \
  -I"$src/examples/common" \
  -o "$out/fmha" "$src/examples/88_hopper_fmha/88_hopper_fmha.cu"
echo "built $out/fmha in $(( $(date +%s) - t0 )) s ($(du -h "$out/fmha" | cut -f1))"
