# Sourced by the GPU evidence scripts that train on Gutenberg tokens: SRC (../shared/data), the offline GPT-2
# tokenizer file, unbuffered output, and data/gutenberg prepared once (prepare_data.py, ~2 s on 16 cores).
SRC=${SRC:-../shared/data}
export TIKTOKEN_GPT2_FILE=${TIKTOKEN_GPT2_FILE:-$SRC/gpt2.tiktoken} PYTHONUNBUFFERED=1
[ -e data/gutenberg/meta.json ] || python prepare_data.py --source "$SRC/gutenberg/train.parquet" \
    --val-source "$SRC/gutenberg/val.parquet" --out data/gutenberg
