# The seed's grpo_usmle_2day: GRPO on MedQA-style multiple choice from the 2-day pretraining checkpoint.
# 16 prompts x 16 samples per step, lr 1e-5, KL 0.01; MedMCQA prompts (options shuffled), MedQA dev as held-out eval.
#   python grpo.py config/usmle.py                                   (the Hub instead: --train_data= --eval_data=)
init_from = "out/a100_2day/ckpt.pt"  # config/a100_2day.py's out_dir
out_dir = "out/usmle"
task = "medmcqa"
train_data = "../shared/data/medmcqa/questions.jsonl"
shuffle_options = True
eval_task = "medqa"
eval_data = "../shared/data/medqa/dev.jsonl"
eval_mode = "both"
eval_every = 50
eval_max_new_tokens = 32
prompts_per_step = 16
samples_per_prompt = 16
max_new_tokens = 32  # the pretraining text answers " X" then EOS; room for a short justification
temperature = 1.0  # untruncated sampling: training log-probs over the same full softmax
lr = 1e-5
warmup_steps = 10
kl_coef = 0.01
eps_low = 0.2
eps_high = 0.28  # DAPO clip-higher: low-probability answers can grow, against entropy collapse
micro_batch = 256  # samples per forward: memory against speed, the kept rollout cache included (BENCHMARKS.md)
compile = True  # compiled log-prob and update forwards, prefill, decoding blocks, head chunks: the first step compiles
# share_prompts = 1024 (the default): a prompt's 16 samples in one packed row (flex_attention when compiled on CUDA)
max_steps = 3000  # 48k rollouts: fits inside 2 days on one GPU with evaluations (BENCHMARKS.md)
save_every = 100
