#!/usr/bin/env bash
# Installs what the tests need into .venv and runs them. Works on a fresh
# machine with only Python 3.10+. Versions come from constraints.txt, the same
# file the README's first command installs from (torch 2.13.0 is the CPU build
# here); on a GPU machine with torch already installed,
# `pip install -e '.[test]'` and `pytest tests` is all it takes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e '.[test,integrations]'
echo "== pytest 1 of 2: the test suite"
.venv/bin/python -m pytest -n "${PYTEST_WORKERS:-2}" -q -p no:cacheprovider tests "$@"
# Every GPU kernel compiled for sm_80 and sm_90 as a GPU would (the
# interpreter and the emulation compile nothing): errors, spills, shared memory.
PYTHON=.venv/bin/python bash scripts/aot_check.sh
# The CUDA kernels once more through the CPU emulation, under AddressSanitizer
# and alignment checks (CLIPFAST_ASAN=0 skips this).
if [ "${CLIPFAST_ASAN:-1}" != "0" ]; then
    echo "== pytest 2 of 2: tests/backends/test_cuda_emulated.py again, kernels built with AddressSanitizer"
    PYTHON=.venv/bin/python bash scripts/asan_emulated.sh -n "${PYTEST_WORKERS:-2}"
fi
