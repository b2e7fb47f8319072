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
echo "== pytest: the test suite"
.venv/bin/python -m pytest -n "${PYTEST_WORKERS:-2}" -q -p no:cacheprovider tests "$@"
# Every GPU kernel compiled for sm_80 and sm_90 as a GPU would (the
# interpreter and the emulation compile nothing): errors, spills, shared
# memory; with the installed Triton here. .ci/run adds the other Triton
# versions and the AddressSanitizer pass after this script (scripts/slow_gates.sh).
AOT_TRITON_VERSIONS="" PYTHON=.venv/bin/python bash scripts/aot_check.sh
