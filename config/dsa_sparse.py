# DeepSeek Sparse Attention, stage 2 of 2 (DeepSeek-V3.2-Exp section 2.1, "sparse training"): from the warm-up
# checkpoint, every query attends to the indexer's top-k keys only (k = 256 = T/8, kept from stage 1) and the whole
# model trains; the indexer learns from its KL over the selected keys alone (its input is detached), the rest
# from the LM loss alone. Run after config/dsa_warmup.py; eval here is the sparse model's val loss.
init_from = "out/dsa_warmup/ckpt.pt"
out_dir = "out/dsa_sparse"
data_dir = "data/gutenberg"
model_overrides = {"dsa_stage": "sparse", "dropout": 0.0}
trainable = "all"
block_size = 2048
micro_batch = 16
grad_accum = 1
lr = 1e-4  # continued training of a converged model: well under pretraining's 1.5e-3 (DeepSeek: 7.3e-6 at 671B)
min_lr = 1e-5
weight_decay = 0.1
warmup_tokens = 20 * 16 * 2048
max_tokens = 120 * 16 * 2048  # 3.9M tokens: the dense control in BENCHMARKS.md trains as many
schedule = "cosine"
eval_every_steps = 60
eval_tokens = 250_000  # the first 122 windows of val: the same ones dev/bench_dsa.py quality reads
checkpoint_every_steps = 0
compile = False  # see config/dsa_warmup.py
