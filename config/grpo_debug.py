# GRPO on the CPU in minutes: a random debug-preset model with a char tokenizer learns one-digit addition from
# rewards alone. Checks the whole machinery (rollouts, rewards, loss, eval, logs, checkpoint, resume), not a result.
#   python grpo.py config/grpo_debug.py
init_from = "scratch"
scratch_preset = "debug"
out_dir = "out/grpo_debug"
task = "addition"
train_data = ""  # generated; the eval split is disjoint by construction
eval_task = "addition"
eval_data = ""
eval_n = 200
addition_digits = (1, 1)  # one-digit sums: a random model hits some by chance, so groups carry signal
eval_every = 20
eval_max_new_tokens = 6
prompts_per_step = 16
samples_per_prompt = 8
max_new_tokens = 6
micro_batch = 64
lr = 3e-3  # a random model needs a large step; real checkpoints use ~1e-5
warmup_steps = 5
kl_coef = 0.01
max_steps = 60
save_every = 30
device = "cpu"
dtype = "float32"
