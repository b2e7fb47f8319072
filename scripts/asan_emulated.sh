#!/usr/bin/env bash
# The CUDA kernels under AddressSanitizer and UBSan's alignment check, through
# the CPU emulation: any out-of-bounds access or misaligned vector load in a
# kernel aborts the run with a report. Needs the package installed
# (bash scripts/test.sh has done that; PYTHON defaults to .venv's python).
#   bash scripts/asan_emulated.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"  # absolute, venv kept
OUT=build/asan
rm -rf "$OUT"
mkdir -p "$OUT/pkg"
sources=$("$PY" csrc/emulate/rewrite_launches.py "$OUT/src")
suffix=$("$PY" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
py_include=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
pybind_include=$("$PY" -c "import pybind11; print(pybind11.get_include())")
cp -r clipfast tests "$OUT/pkg/"
rm -f "$OUT"/pkg/clipfast/_cuda_emulated*.so
# shellcheck disable=SC2086
g++ -std=c++20 -O1 -g -fPIC -shared -pthread -fno-strict-aliasing -Wno-unknown-pragmas \
    -fsanitize=address,alignment -fno-sanitize-recover=alignment -fno-omit-frame-pointer \
    -DCLIPFAST_CUDA_MODULE=_cuda_emulated -Icsrc/emulate -Icsrc -Icsrc/include \
    -I"$pybind_include" -I"$py_include" csrc/cuda_bindings.cpp $sources \
    -o "$OUT/pkg/clipfast/_cuda_emulated$suffix"
# Python itself is not instrumented: the runtimes are preloaded, leaks ignored.
cd "$OUT/pkg"
LD_PRELOAD="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libubsan.so)" \
ASAN_OPTIONS=detect_leaks=0,halt_on_error=1 PYTHONPATH=. \
    "$PY" -m pytest -q -p no:cacheprovider tests/backends/test_cuda_emulated.py \
        tests/backends/test_cuda_siglip_emulated.py "$@"
