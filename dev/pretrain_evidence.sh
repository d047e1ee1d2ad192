#!/usr/bin/env bash
# Issue 2's GPU evidence: the Gutenberg demo (wall clock timed by the shell, bits per byte on val.parquet, a sample,
# loss curve and attention histograms), then the shakespeare_char parity run. GPU checks first.
#   bash dev/pretrain_evidence.sh [more train.py --key=value for the Gutenberg run]
# SRC: folder with gpt2.tiktoken, gutenberg/{train,val}.parquet, tinyshakespeare/input.txt; OUT: out/evidence.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${SRC:-../shared/data}
OUT=${OUT:-out/evidence}
mkdir -p "$OUT"
export TIKTOKEN_GPT2_FILE=$SRC/gpt2.tiktoken PYTHONUNBUFFERED=1
python dev/gpu_checks.py || { echo "GPU checks failed: stopping"; exit 1; }
python prepare_data.py --source "$SRC/gutenberg/train.parquet" --val-source "$SRC/gutenberg/val.parquet" \
    --out data/gutenberg --overwrite
python prepare_data.py --tokenizer char --source "$SRC/tinyshakespeare/input.txt" --val-fraction 0.1 \
    --out data/shakespeare_char --overwrite
SECONDS=0
python train.py config/gutenberg.py "$@" 2>&1 | tee "$OUT/gutenberg.log"
echo "gutenberg wall seconds: $SECONDS" | tee -a "$OUT/gutenberg.log"
python sample.py --ckpt out/gutenberg/ckpt.pt --start "It was a dark and stormy night" --num_samples 2 \
    --max_new_tokens 120 --seed 1 2>&1 | tee "$OUT/gutenberg_sample.txt"
python analyze.py loss out/gutenberg/log.jsonl --out "$OUT/gutenberg_loss.png"
python analyze.py attention --ckpt out/gutenberg/ckpt.pt --data data/gutenberg --out "$OUT/gutenberg_attention.png" \
    | tee -a "$OUT/gutenberg.log"
python train.py config/shakespeare_char.py 2>&1 | tee "$OUT/shakespeare.log" | grep -E "eval|switches|model:"
python analyze.py loss out/shakespeare_char/log.jsonl --out "$OUT/shakespeare_loss.png"
grep -E "eval step" "$OUT/gutenberg.log" | tail -1; grep "wall seconds" "$OUT/gutenberg.log"
grep -E "eval step" "$OUT/shakespeare.log" | sort -t' ' -k6 -g | head -1
