#!/usr/bin/env bash
# The GPU sweep of the core issue: d = 512/768/1024, N from 4096 doubling to
# 2^20 (each provider stops at its first out-of-memory), in the dtypes of
# DTYPES (default bf16,fp32; one dtype per call keeps a run under 10 minutes).
# Usage: [DTYPES=bf16] bash benchmarks/run_gpu.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-benchmarks/results/gpu}"
python3 -m clipfast.bench --device cuda \
    --providers reference,compile,chunked,triton,hybrid,cuda,gemm4_bound \
    --dims 512,768,1024 --dtypes "${DTYPES:-bf16,fp32}" --min-n 4096 --max-n 1048576 \
    --reps 5 --max-seconds 10 --out "$OUT"
# The measured points, merged into a copy of backend="auto"'s table: copy
# OUT_DIR/auto_table.json over clipfast/auto_table.json to ship them.
cp clipfast/auto_table.json "$OUT/auto_table.json"
python3 -m clipfast.autoselect "$OUT/results.jsonl" --out "$OUT/auto_table.json" --merge --show \
    > "$OUT/auto_choices.md"
