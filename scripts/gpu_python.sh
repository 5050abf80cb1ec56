#!/usr/bin/env bash
# The Python tests where PyTorch and transformers exist (the H100 machine: PyTorch 2.11,
# transformers 5.17, nanobind, pytest): builds the extension, runs every Python test (NumPy,
# PyTorch CPU tensors, CUDA tensors refused until the CUDA backend, transformers models) and the
# per-call overhead benchmark. Highway comes from HWY_ROOT where Debian's package is missing.
# Usage: bash scripts/gpu_python.sh OUT_DIR   (results recorded in docs/python.md)
set -uo pipefail
out=${1:-/tmp/attnkit_gpu}
mkdir -p "$out"
python3 -c "import sys, torch, transformers, nanobind; print(sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'nanobind', nanobind.__version__, 'cuda', torch.cuda.is_available())"
hwy_root=${HWY_ROOT:-$PWD/.carry/hwy}
export LD_LIBRARY_PATH=$hwy_root/lib:${LD_LIBRARY_PATH:-}
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DATTNKIT_BUILD_TESTS=OFF \
  -DATTNKIT_BUILD_TOOLS=OFF -DATTNKIT_BUILD_PYTHON=ON -DHWY_ROOT="$hwy_root" \
  -DPython_EXECUTABLE="$(command -v python3)" > "$out/cmake.log" 2>&1 || { tail -30 "$out/cmake.log"; exit 1; }
cmake --build build-gpu -j "$(nproc)" > "$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }
PYTHONPATH=build-gpu/python python3 bench/diag_errors.py | tee "$out/diag.txt"
ldd build-gpu/python/attnkit/_ext*.so | grep -E "stdc|gcc_s|gomp|hwy"
PYTHONPATH=build-gpu/python timeout 120 cuda-gdb -batch -ex run -ex bt --args python3 -c "import numpy as np, attnkit; q = np.random.rand(1, 2, 16, 8).astype(np.float32); attnkit.attention(q, q, q, window=(-3, 0))" 2>&1 | grep -E "^#|signal" | cut -c1-220 | head -24
PYTHONPATH=build-gpu/python python3 -m pytest -v -n 4 -p no:cacheprovider python/tests > "$out/pytest.log" 2>&1
rc=$?
grep -E "^(FAILED|ERROR)|crashed" "$out/pytest.log" | head -20
tail -3 "$out/pytest.log"
PYTHONPATH=build-gpu/python OMP_NUM_THREADS=1 python3 bench/python_overhead.py | tee "$out/overhead.txt"
PYTHONPATH=build-gpu/python OMP_NUM_THREADS=1 python3 bench/python_profile.py > "$out/profile.txt" 2>&1; grep -A22 "tottime" "$out/profile.txt" | cut -c1-150
exit $rc
