#!/usr/bin/env bash
# GRPO learning on the CPU: a 0.76M-parameter character-level model pretrained on addition text (1-3 digit
# operands), then GRPO on the same task; held-out accuracy before and after (grpo.py's evaluations).
#   bash dev/grpo_cpu_demo.sh          (OUT: out/grpo_cpu_demo)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/grpo_cpu_demo}
mkdir -p "$OUT"
python tasks.py synth --task addition --n 300000 --digits 1-3 --seed 0 --out "$OUT/add.jsonl"
python prepare_data.py --tokenizer char --source "$OUT/add.jsonl" --val-fraction 0.01 --out "$OUT/data" --overwrite
python train.py --data_dir="$OUT/data" --out_dir="$OUT/pretrain" --preset=debug --device=cpu \
    "--model_overrides={'n_layer': 4, 'n_embd': 128, 'n_head': 4, 'n_kv_head': 2, 'head_dim': 32, 'mlp_hidden': 352}" \
    --block_size=128 --micro_batch=32 --lr=3e-3 --min_lr=3e-4 --warmup_tokens=100000 --max_tokens=5000000 \
    --eval_every_steps=0 --log_every_steps=100
python grpo.py config/grpo_addition.py --init_from="$OUT/pretrain/ckpt.pt" --out_dir="$OUT/grpo" --device=cpu \
    "--addition_digits=(1, 3)" --prompts_per_step=16 --samples_per_prompt=8 --micro_batch=128 --max_new_tokens=6 \
    --eval_max_new_tokens=6 --eval_n=500 --eval_every=50 --lr=1e-4 --warmup_steps=5 --max_steps=300 --save_every=300
