# GPU demo on real books (Project Gutenberg, ~16M GPT-2 tokens), sized to run within nanoGPT's GPT-2 124M recipe's
# wall time on one H200, compile included; judged on bits per byte of authors it never saw (BENCHMARKS.md).
# data: python prepare_data.py --source path/to/gutenberg/train.parquet --val-source path/to/gutenberg/val.parquet \
#           --holdout-authors 6 --out data/gutenberg       (unseen_authors: whole authors kept out of train)
out_dir = "out/gutenberg"
data_dir = "data/gutenberg"
preset = "small"
model_overrides = {"n_layer": 12, "dropout": 0.0}  # strong weight decay regularises better than dropout
block_size = 1024
micro_batch = 32
grad_accum = 1
lr = 7.5e-4  # AdamW's, for embeddings and head beside Muon: unseen-author bpb 1.5143 at 1.5e-3, 1.5236 at 3e-3
min_lr = 7.5e-5
weight_decay = 1.0  # the head (AdamW); with Muon 0.2 below: 10x the usual decay fits unseen authors best
warmup_tokens = 100 * 32 * 1024
optimizer = "muon"  # the best held-out-author bpb per wall second among the measured rows (dev/quality.sh)
muon_weight_decay = 0.2
max_tokens = 1800 * 32 * 1024  # ~4.1 epochs, sized to the 188 s wall of nanoGPT's recipe on one H200
schedule = "wsd"
decay_fraction = 0.3
eval_every_steps = 1800  # one eval, at the end: each eval that improves also writes a checkpoint
eval_tokens = 2_000_000
log_every_steps = 50
checkpoint_every_steps = 0
compile = True
compile_scope = "blocks"  # 16 s of cold compile, not 44: the wall includes it
