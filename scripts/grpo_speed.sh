#!/usr/bin/env bash
# A whole GRPO step at medium-large (BENCHMARKS.md, "A whole GRPO step"): a GPT-2-BPE checkpoint from 10 training
# steps, then 5 GRPO steps of config/usmle.py at 64 x 16 samples for each micro_batch in MBS; the per-phase times
# are in each run's log.jsonl (t_rollout, t_logprobs, t_train, t_step).
#   SRC=../shared/data MBS="64 256 512" bash scripts/grpo_speed.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-out/grpo_speed}
source scripts/gutenberg_data.sh
python train.py config/gutenberg.py --preset=medium-large "--model_overrides={}" --block_size=2048 --micro_batch=16 \
    --max_tokens=327680 --warmup_tokens=32768 --eval_every_steps=0 --compile=False --out_dir="$RUNS/ml" | grep -E "saved"
for MB in ${MBS:-64 256 512}; do
    python grpo.py config/usmle.py --init_from="$RUNS/ml/ckpt.pt" --out_dir="$RUNS/mb$MB" --train_data="$SRC/medmcqa/questions.jsonl" \
        --eval_data="$SRC/medqa/dev.jsonl" --max_steps=5 --eval_every=0 --eval_n=32 --save_every=1000 --drop_zero_std=False \
        --prompts_per_step=64 --rollout_batch=1024 --micro_batch="$MB" | grep -E "^step"
done
python - "$RUNS" ${MBS:-64 256 512} <<'PY'
import json, sys
for mb in sys.argv[2:]:
    recs = [r for r in map(json.loads, open(f"{sys.argv[1]}/mb{mb}/log.jsonl")) if "t_step" in r][1:]  # step 1 warms up
    avg = lambda k: sum(r[k] for r in recs) / len(recs)
    seq = sum(r["train_tok_s"] * r["t_train"] for r in recs) / len(recs)
    print(f"micro_batch {mb}: rollout {avg('t_rollout'):.2f} s, log-probs {avg('t_logprobs'):.2f} s, update {avg('t_train'):.2f} s, "
          f"step {avg('t_step'):.2f} s; {avg('train_tokens') / avg('t_step'):,.0f} completion and {seq / avg('t_step'):,.0f} "
          f"sequence tokens/s; peak {max(r['mem_gib'] for r in recs):.1f} GiB")
PY
