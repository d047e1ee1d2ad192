#!/usr/bin/env bash
# Issue 4's GPU evidence in one call: correctness checks, per-GEMM bf16 vs FP8, then medium-large at 16 x 2048:
# bf16, FP8, activation checkpointing, transformers' Qwen3 compiled as the baseline, and generate() speed.
set -euo pipefail
OUT=${OUT:-out/evidence}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
[ -n "${SKIP_CHECKS:-}" ] || python scripts/gpu_checks.py || { echo "GPU checks failed: stopping"; exit 1; }
python fp8.py --preset medium-large 2>&1 | grep -v Warning | tee "$OUT/fp8_gemm.txt"
python bench.py --preset medium-large --micro_batch 16 --block_size 2048 --steps 6 --warmup 3 \
    --variant "" --variant precision=fp8 ${EXTRA_VARIANTS:-} \
    --baseline --decode --json "$OUT/bench.json" 2>&1 | grep -vE "Warning|warn\(" | tee "$OUT/bench.log"
