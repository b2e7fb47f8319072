#!/usr/bin/env bash
# Compiles every GPU kernel for sm_80 and sm_90 the way a GPU would, on a
# machine without one (python -m clipfast.aot_check): the Triton kernels with
# every configuration their launchers can choose, with the installed Triton
# (the GPU machines' 3.6) and with each version in AOT_TRITON_VERSIONS (3.7.1:
# what torch 2.13's CUDA wheels pin; 3.9.0: what pip resolves today), and the
# CUDA sources with nvcc. Fails on any compile error, main-loop spill, shared
# memory over the per-block limit or logits that could round differently in
# forward and backward. Tables land in AOT_OUT (default aot_results/).
# AOT_TRITON_VERSIONS="" checks the installed Triton only (scripts/test.sh);
# AOT_SKIP_INSTALLED=1 only the other versions (.ci/run, after the tests).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
OUT="${AOT_OUT:-aot_results}"
VERSIONS="${AOT_TRITON_VERSIONS-3.7.1 3.9.0}"
mkdir -p "$OUT"
unset TRITON_INTERPRET
# Triton 3.9 warns that its default for FP contraction will change; the
# launchers set it explicitly where it matters (the tile kernels), and the
# GEMM-only kernels keep today's default.
export TRITON_DEFAULT_FP_FUSION=1
rc=0
run_check() {  # label, then python -m clipfast.aot_check's arguments
    local label="$1"; shift
    echo "== aot_check: $label"
    if "$PY" -m clipfast.aot_check --json "$OUT/$label.jsonl" "$@" > "$OUT/$label.txt" 2>&1; then
        tail -n 1 "$OUT/$label.txt"
    else
        rc=1
        cat "$OUT/$label.txt"
    fi
}
if [ "${AOT_SKIP_INSTALLED:-0}" != "1" ]; then
    run_check "installed-triton"
fi
for version in $VERSIONS; do
    target=".aot/triton-$version"
    if [ ! -d "$target/triton" ]; then
        "$PY" -m pip install -q --no-deps --target "$target" "triton==$version"
    fi
    PYTHONPATH="$PWD/$target${PYTHONPATH:+:$PYTHONPATH}" run_check "triton-$version" --no-cuda
done
echo "aot_check: $([ $rc -eq 0 ] && echo passed || echo FAILED), tables in $OUT/"
exit $rc
