# Sourced by the GPU scripts that train on Gutenberg tokens: SRC (the data folder), the offline GPT-2 tokenizer file,
# unbuffered output, and data/gutenberg prepared once.
SRC=${SRC:-../shared/data}
export TIKTOKEN_GPT2_FILE=${TIKTOKEN_GPT2_FILE:-$SRC/gpt2.tiktoken} PYTHONUNBUFFERED=1
[ -e data/gutenberg/meta.json ] || python prepare_data.py --source "$SRC/gutenberg/train.parquet" \
    --val-source "$SRC/gutenberg/val.parquet" --out data/gutenberg
# the medium-large runs start from the Gutenberg config with AdamW, the usual decay and the whole model compiled, not
# the demo's Muon recipe and quick-to-compile blocks
MEDIUM_LARGE=(config/gutenberg.py --optimizer=adamw --weight_decay=0.1 --lr=1.5e-3 --min_lr=1.5e-4 --compile_scope=model
    --preset=medium-large "--model_overrides={}")
