#!/usr/bin/env bash
# A whole GRPO step at medium-large (BENCHMARKS.md, "GRPO step time"): a GPT-2-BPE checkpoint from 10 training steps,
# then STEPS (5) GRPO steps of config/usmle.py at 64 x 16 samples for each micro_batch in MBS (256) and each variant
# in VARIANTS (";"-separated name:grpo.py flags; default base = the two-pass eager step, new = fused old log-probs +
# compiled), one run after another. Last, a line per (variant, micro_batch): mean phase times of steps 2-STEPS from
# log.jsonl (t_rollout, t_score, t_logprobs, t_train, t_step) and the step's speed-up over the first variant.
#   bash dev/grpo_speed.sh                                      (SRC: data folder; RUNS: out/grpo_speed)
#   STEPS=30 MBS=256 VARIANTS="x:--prompts_per_step=16 --rollout_batch=256" bash dev/grpo_speed.sh   # 16 x 16
#   STEPS=12 MBS=1024 VARIANTS="step64x16:" bash dev/grpo_speed.sh                                   # 64 x 16
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-out/grpo_speed}
STEPS=${STEPS:-5}
MBS=${MBS:-256}
VARIANTS=${VARIANTS:-"base:--fuse_old_logprobs=False --compile=False;new:--fuse_old_logprobs=True --compile=True"}
source dev/gutenberg_data.sh
python train.py "${MEDIUM_LARGE[@]}" --block_size=2048 --micro_batch=16 \
    --max_tokens=327680 --warmup_tokens=32768 --eval_every_steps=0 --compile=False --out_dir="$RUNS/ml" \
    | grep -E "saved"
IFS=";" read -ra VARIANT_LIST <<< "$VARIANTS"
DONE=()
for MB in $MBS; do
    for V in "${VARIANT_LIST[@]}"; do
        NAME=${V%%:*}
        # shellcheck disable=SC2086  # the variant's flags split into words
        python grpo.py config/usmle.py --init_from="$RUNS/ml/ckpt.pt" --out_dir="$RUNS/$NAME-mb$MB" \
            --train_data="$SRC/medmcqa/questions.jsonl" --eval_data="$SRC/medqa/dev.jsonl" --max_steps="$STEPS" \
            --eval_every=0 --eval_n=32 --save_every=1000 --drop_zero_std=False --prompts_per_step=64 \
            --rollout_batch=1024 --micro_batch="$MB" ${V#*:} | grep -E "^(switches|step)"
        DONE+=("$NAME-mb$MB")
    done
done
python - "$RUNS" "${DONE[@]}" <<'PY'
import json, sys
base = {}  # micro_batch -> the first variant's step time
for run in sys.argv[2:]:
    name, mb = run.rsplit("-mb", 1)
    recs = [r for r in map(json.loads, open(f"{sys.argv[1]}/{run}/log.jsonl")) if "t_step" in r]
    recs = recs[1:]  # step 1 warms up (and compiles)
    avg = lambda k: sum(r[k] for r in recs) / len(recs)
    seq = sum(r["train_tok_s"] * r["t_train"] for r in recs) / len(recs)
    base.setdefault(mb, avg("t_step"))
    print(f"{name:>8} micro_batch {mb}: t_rollout {avg('t_rollout'):.2f} s, t_score {avg('t_score'):.3f} s, "
          f"t_logprobs {avg('t_logprobs'):.2f} s, "
          f"t_train {avg('t_train'):.2f} s, t_step {avg('t_step'):.2f} s ({base[mb] / avg('t_step'):.2f}x; median "
          f"{sorted(r['t_step'] for r in recs)[len(recs) // 2]:.3f} s); "
          f"{avg('train_tokens') / avg('t_step'):,.0f} completion and {seq / avg('t_step'):,.0f} sequence tokens/s; "
          f"peak {max(r['mem_gib'] for r in recs):.1f} GiB")
PY
