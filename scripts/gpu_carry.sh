#!/usr/bin/env bash
# Assembles .carry/ (git-ignored through .git/info/exclude) from this machine's Debian packages,
# for the GPU machine, which has no Debian -dev packages and no internet: Highway (headers and
# shared library) as .carry/hwy, and nlohmann-json, CLI11 and GoogleTest under the prefix
# .carry/deps (what scripts/gpu_cuda.sh and scripts/gpu_python.sh read). Send it with the
# device tool's carry: [".carry"].
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh
grep -qx '/.carry/' .git/info/exclude 2>/dev/null || echo '/.carry/' >> .git/info/exclude
lib=/usr/lib/x86_64-linux-gnu
rm -rf .carry/hwy .carry/deps && mkdir -p .carry/hwy/include .carry/hwy/lib .carry/deps/include \
  .carry/deps/share/cmake .carry/deps/lib/x86_64-linux-gnu/cmake
cp -r /usr/include/hwy .carry/hwy/include/
cp -a "$lib"/libhwy.so* .carry/hwy/lib/
cp -r /usr/include/nlohmann /usr/include/CLI /usr/include/gtest /usr/include/gmock .carry/deps/include/
cp -r /usr/share/cmake/nlohmann_json /usr/share/cmake/CLI11 .carry/deps/share/cmake/
cp "$lib"/libgtest*.a "$lib"/libgmock*.a .carry/deps/lib/x86_64-linux-gnu/
cp -r "$lib"/cmake/GTest .carry/deps/lib/x86_64-linux-gnu/cmake/
du -sh .carry
