#!/usr/bin/env bash
# Everything that needs a GPU, in one command (for the device machine):
#   bash scripts/gpu_check.sh [OUT_DIR]
# 1. the whole test suite on CUDA (the GPU-only tests run instead of skipping),
# 2. the benchmark sweep of the core issue (table, JSON lines, plot),
# with logs under OUT_DIR (default gpu_check/).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-gpu_check}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
# The C++ extension (no downloads there: the machine's own pybind11).
python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { echo "build failed, see $OUT/build.log"; }
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" \
    | tee "$OUT/versions.txt"
python3 -m pytest -q -x -p no:cacheprovider tests 2>&1 | tee "$OUT/tests.log"
tests_rc=${PIPESTATUS[0]}
bash benchmarks/run_gpu.sh "$OUT/bench" 2>&1 | tail -n 80 | tee "$OUT/bench.log"
echo "tests exit code: $tests_rc"
exit "$tests_rc"
