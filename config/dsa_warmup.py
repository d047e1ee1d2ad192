# DeepSeek Sparse Attention, stage 1 of 2 (DeepSeek-V3.2-Exp section 2.1, "dense warm-up"): from a dense checkpoint,
# attention stays dense and only the lightning indexers train, on the KL from the main attention's distribution
# (dsa.py). Then config/dsa_sparse.py, then dev/bench_dsa.py quality (BENCHMARKS.md has the commands).
# The dense base, trained at the length we measure (T = 2048):
#   python train.py config/gutenberg.py --optimizer=adamw --lr=1.5e-3 --min_lr=1.5e-4 --block_size=2048 \
#       --micro_batch=16 --max_tokens=25000000 --eval_every_steps=0 --out_dir=out/gutenberg_2k
init_from = "out/gutenberg_2k/ckpt.pt"
out_dir = "out/dsa_warmup"
data_dir = "data/gutenberg"
model_overrides = {"dsa_top_k": 256, "dsa_stage": "warmup", "dropout": 0.0}  # k = T/8, used from stage 2 on
trainable = "indexer"  # the main model frozen: only parameters named *indexer* train
block_size = 2048
micro_batch = 16
grad_accum = 1
lr = 1e-3  # DeepSeek's warm-up learning rate
min_lr = 1e-4
weight_decay = 0.0
warmup_tokens = 20 * 16 * 2048
max_tokens = 150 * 16 * 2048  # 4.9M tokens, a scaled-down warm-up (DeepSeek: 1000 steps of 2.1M)
schedule = "cosine"
eval_every_steps = 0  # the main model is frozen and attention dense: its val loss cannot move
checkpoint_every_steps = 0  # one checkpoint at the end
compile = False  # compiling the DSA model takes too long: its query-chunk loops unroll
