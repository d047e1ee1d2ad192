#!/usr/bin/env bash
# ATTENTION="flash" (flash-attn 4) against the default SDPA/cuDNN path at medium-large, one process (BENCHMARKS.md,
# "flash-attn 4"): the GPU checks (check 5 compares flash with SDPA), then bench.py's attention table and training
# variants. Needs flash-attn 4 importable: pip install flash-attn-4 "nvidia-cutlass-dsl[cu13]".
#   bash scripts/flash_evidence.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import flash_attn.cute" || { echo "flash-attn 4 is not installed: pip install flash-attn-4"; exit 1; }
python scripts/gpu_checks.py
python bench.py --preset medium-large --steps 6 --warmup 3 --attention_table --json "${JSON:-bench_flash.json}" \
    --variant "" --variant attention=flash --variant attention=flash,precision=fp8 \
    --variant attention=flash,n_head=9,n_kv_head=3,head_dim=128
