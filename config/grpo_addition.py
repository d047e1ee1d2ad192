# The synthetic check: multi-digit addition (tasks.make_addition; training and eval pairs are disjoint by construction),
# from a checkpoint pretrained on Gutenberg mixed with `tasks.py synth --task addition` text. Minutes on one GPU.
#   python grpo.py config/grpo_addition.py --init_from=out/gutenberg_addition/ckpt.pt
init_from = "out/gutenberg_addition/ckpt.pt"
out_dir = "out/grpo_addition"
task = "addition"
train_data = ""  # generated: 100k training pairs
addition_digits = (1, 4)  # as `tasks.py synth` writes the pretraining text
eval_task = "addition"
eval_data = ""  # generated from the held-out half of all pairs
eval_n = 1000
eval_every = 25
eval_max_new_tokens = 8
eval_batch = 500
prompts_per_step = 32
samples_per_prompt = 16
max_new_tokens = 8  # " 12345" + EOS fits; the stop string "\nQ:" cuts a model that runs on
temperature = 1.0
lr = 2e-5
warmup_steps = 10
kl_coef = 0.01
micro_batch = 256
max_steps = 200
save_every = 100
