# nanoGPT's baby GPT on character-level Shakespeare (its README: best val loss 1.4697): 64 x 256 characters per
# step, lr 1e-3 -> 1e-4 cosine, 100 warmup steps, dropout 0.2, beta2 0.99. nanoGPT runs 5000 steps; this model
# overfits sooner (its best val loss comes around step 1000-1250 of a 5000-step run), so the cosine ends at 2000
# steps: the learning rate is low where validation loss bottoms out.
# Our block: 6 layers, d 384, 6 heads (no GQA), SwiGLU 1024 (parameter-matched to its 4x GELU MLP).
# Muon with 10x the usual weight decay: best val loss 1.422 against 1.466 with nanoGPT's AdamW recipe (BENCHMARKS.md).
out_dir = "out/shakespeare_char"
data_dir = "data/shakespeare_char"
preset = "debug"
model_overrides = {"n_layer": 6, "n_embd": 384, "n_head": 6, "n_kv_head": 6, "head_dim": 64, "mlp_hidden": 1024,
                   "dropout": 0.2}
block_size = 256
micro_batch = 64
lr = 1e-3
min_lr = 1e-4
beta2 = 0.99
optimizer = "muon"
muon_weight_decay = 0.2
weight_decay = 1.0  # the head's (AdamW)
warmup_tokens = 100 * 64 * 256
max_tokens = 2000 * 64 * 256
eval_every_steps = 250
eval_tokens = 200_000
log_every_steps = 50
checkpoint_every_steps = 0  # best.pt and the final ckpt.pt only
compile = True
