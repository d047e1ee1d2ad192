# GRPO on GSM8K: the answer after "####" (or the last number), normalised, must equal the reference exactly.
# Evaluation holds out eval_n problems of the same file (disjoint from the training prompts).
#   python grpo.py config/grpo_gsm8k.py --init_from=out/<pretrain>/ckpt.pt       (the Hub: --train_data= --eval_data=)
init_from = "out/a100_2day/ckpt.pt"
out_dir = "out/gsm8k"
task = "gsm8k"
train_data = "../shared/data/gsm8k/train.jsonl"
eval_task = "gsm8k"
eval_data = "../shared/data/gsm8k/train.jsonl"  # the same file: its eval_n examples are left out of training
eval_n = 500
eval_mode = "generate"
eval_every = 50
eval_max_new_tokens = 256
prompts_per_step = 16
samples_per_prompt = 16
max_new_tokens = 256  # worked solutions are ~100 GPT-2 tokens; truncated ones earn nothing
temperature = 1.0
lr = 1e-5
kl_coef = 0.01
eps_high = 0.28
drop_degenerate = True  # runaway repetition and answer-less text teach nothing about arithmetic
micro_batch = 32
compile = True  # faster and smaller than eager (BENCHMARKS.md); the first step compiles
max_steps = 1000
save_every = 100
