#!/usr/bin/env bash
# Everything that needs a GPU, in stages that each fit one device call
# (10 minutes a command, 30 minutes a session):
#   bash scripts/gpu_check.sh OUT_DIR [STAGE ...]
# Stages (default: check build tests):
#   check  python -m clipfast.check (the full one): environment, every backend's
#          accuracy by the rule on CUDA, the speed/memory table at N = 32768 and
#          65536 (d = 1024, bf16); report and measured table in OUT_DIR/check,
#          log in OUT_DIR/check.log. Run first, it sees only the extensions
#          already built (carried): the cuda and cpu backends are SKIPped with
#          the reason when they are not; `build check` checks them too
#   build  the C++/CUDA extensions in place (no downloads there: the machine's
#          own pybind11), versions and nvidia-smi
#   tests  the whole suite on CUDA (GPU-only tests run instead of skipping);
#          every failure is reported, not just the first
#   cuda   only tests/backends/test_cuda.py (quick check of the CUDA backend)
#   bench-bf16 | bench-fp32 | bench-fp16   the benchmark sweep in one dtype,
#          plus backend="auto"'s table merged with its points
# Logs and results go under OUT_DIR. Each stage after `build` expects the
# extensions built (run `build` in the same call, or carry clipfast/_*.so).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-gpu_check}"
shift || true
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(check build tests)
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
rc=0
for stage in "${STAGES[@]}"; do
    case "$stage" in
    check)
        # Its measured table goes to OUT_DIR, not the per-user cache that
        # backend="auto" reads, so the tests stage below sees the usual choices.
        CLIPFAST_CACHE_DIR="$OUT/check/cache" python3 -m clipfast.check --out "$OUT/check" \
            2>&1 | tee "$OUT/check.log" | grep -v '^PASS\|^accuracy\|^speed' | tail -n 80
        status=${PIPESTATUS[0]}
        [ "$status" -ne 0 ] && { echo "check: exit status $status, see $OUT/check.log"; rc=$status; }
        ;;
    build)
        nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
        python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
            || { echo "build failed, see $OUT/build.log"; rc=1; }
        python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" \
            | tee "$OUT/versions.txt"
        ;;
    tests)
        python3 -m pytest -q -p no:cacheprovider -rf tests 2>&1 | tail -n 300 > "$OUT/tests.log"
        status=${PIPESTATUS[0]}
        tail -n 40 "$OUT/tests.log"
        [ "$status" -ne 0 ] && rc=$status
        ;;
    cuda)
        python3 -m pytest -q -p no:cacheprovider -rf tests/backends/test_cuda.py 2>&1 \
            | tail -n 300 > "$OUT/tests_cuda.log"
        status=${PIPESTATUS[0]}
        tail -n 40 "$OUT/tests_cuda.log"
        [ "$status" -ne 0 ] && rc=$status
        ;;
    bench-*)
        DTYPES="${stage#bench-}" bash benchmarks/run_gpu.sh "$OUT/$stage" 2>&1 | tail -n 60 \
            | tee "$OUT/$stage.log"
        ;;
    *)
        echo "unknown stage $stage"; rc=2
        ;;
    esac
done
echo "gpu_check exit code: $rc"
exit "$rc"
