# CPU smoke run, ~2 minutes: the debug preset on character-level Shakespeare.
# data: python prepare_data.py --tokenizer char --source <tinyshakespeare>/input.txt --val-fraction 0.1 \
#         --out data/shakespeare_char
out_dir = "out/debug"
data_dir = "data/shakespeare_char"
preset = "debug"
block_size = 128
micro_batch = 16
lr = 2e-3
min_lr = 2e-4
warmup_tokens = 100_000
max_tokens = 2_000_000
eval_every_steps = 200
eval_tokens = 100_000
log_every_steps = 20
checkpoint_every_steps = 500
