#!/usr/bin/env bash
# Installs what attnkit's build and tests need from Debian's packages, only what is missing.
# Idempotent: a second run installs nothing and does not touch the network.
set -euo pipefail
pkgs=(cmake ninja-build g++ pkg-config libhwy-dev libgtest-dev libgmock-dev libbenchmark-dev
      libcli11-dev nlohmann-json3-dev libopenblas-dev clang-format)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Python: the extension's build (nanobind) and its tests (NumPy, pytest), from PyPI, only what is
# missing. PyTorch and transformers are not installed here (gigabytes): their tests skip.
if command -v python3 >/dev/null; then
  py_missing=()
  for mod in nanobind:nanobind numpy:numpy pytest:pytest scikit_build_core:scikit-build-core; do
    python3 -c "import ${mod%%:*}" 2>/dev/null || py_missing+=("${mod##*:}")
  done
  if [ ${#py_missing[@]} -gt 0 ]; then
    echo "installing from PyPI: ${py_missing[*]}"
    python3 -m pip install -q --disable-pip-version-check "${py_missing[@]}" 2>&1 | grep -v "as the 'root' user" || true
  fi
fi
