#!/usr/bin/env bash
# Quick start, command 1: install what is missing, build (default preset), run the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh
cmake --preset default >/dev/null
cmake --build --preset default
./build/attnkit bench --suite quick "$@"
