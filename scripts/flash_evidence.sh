#!/usr/bin/env bash
# ATTENTION="flash" (flash-attn 4) against the default SDPA/cuDNN path at medium-large (BENCHMARKS.md, "flash-attn 4"):
# the package's gradients per head_dim (scripts/flash_check.py), the GPU checks (check 5 compares flash with SDPA in
# the model), then bench.py's attention table and both training paths in one process.
# Needs flash-attn 4 importable: pip install flash-attn-4 "nvidia-cutlass-dsl[cu13]".
#   bash scripts/flash_evidence.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import flash_attn.cute" || { echo "flash-attn 4 is not installed: pip install flash-attn-4"; exit 1; }
python scripts/flash_check.py
python scripts/gpu_checks.py
python bench.py --preset medium-large --steps 6 --warmup 3 --attention_table --json "${JSON:-bench_flash.json}" \
    --variant "" --variant attention=flash
