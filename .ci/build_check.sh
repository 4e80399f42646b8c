#!/usr/bin/env bash
# CI step: install metapeft editable with the CUDA extension forced on (a compile or link error fails here),
# report what was built, run the extension's tests; with --cmake also build the same library with CMake.
# Usage (repo root, torch already installed): .ci/build_check.sh [--cmake]
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
METAPEFT_BUILD_CUDA=1 python -m pip install --no-build-isolation -e ".[test]"
echo "pip install with the extension build: $(( $(date +%s) - start )) s"
python -m metapeft.build_info
python -m pytest tests/ops/test_scaled_lora_cuda.py -q
if [[ "${1:-}" == "--cmake" ]]; then
  start=$(date +%s)
  cmake -S . -B build/cmake -G Ninja && cmake --build build/cmake
  echo "cmake build: $(( $(date +%s) - start )) s"
fi
