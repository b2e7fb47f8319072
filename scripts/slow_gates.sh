#!/usr/bin/env bash
# The gates CI runs after the README's test command (scripts/test.sh), in the
# .venv it set up: the compile gate again with the other Triton versions
# (3.7.1: what torch 2.13's CUDA wheels pin; 3.9.0: what pip resolves today),
# then the CUDA kernels through the CPU emulation once more under
# AddressSanitizer and alignment checks (CLIPFAST_ASAN=0 skips that).
set -euo pipefail
cd "$(dirname "$0")/.."
AOT_SKIP_INSTALLED=1 PYTHON=.venv/bin/python bash scripts/aot_check.sh
if [ "${CLIPFAST_ASAN:-1}" != "0" ]; then
    echo "== pytest: tests/backends/test_cuda_emulated.py again, kernels built with AddressSanitizer"
    PYTHON=.venv/bin/python bash scripts/asan_emulated.sh -n "${PYTEST_WORKERS:-2}"
fi
