#!/usr/bin/env bash
# Issue 4's precision checks: the per-GEMM table (`python fp8.py`), then medium-large trained STEPS steps of 16 x 2048
# Gutenberg tokens once per variant, same seed and data order: final train and val loss and tokens/s side by side,
# each against the first variant. VARIANTS: ";"-separated name:train.py flags (default bf16 against fp8).
#   bash dev/fp8_evidence.sh        (SRC: data folder; RUNS: out/fp8_check; STEPS: 300; MB, BLOCK: 16, 2048;
#                                    ARGS: more overrides; SKIP_GEMM_TABLE=1: train only)
#   SKIP_GEMM_TABLE=1 VARIANTS="fp32:--residual=fp32;autocast:--residual=autocast" bash dev/fp8_evidence.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-out/fp8_check}
STEPS=${STEPS:-300}
MB=${MB:-16} BLOCK=${BLOCK:-2048}
VARIANTS=${VARIANTS:-bf16:--precision=bf16;fp8:--precision=fp8}
source dev/gutenberg_data.sh
[ -n "${SKIP_GEMM_TABLE:-}" ] || python fp8.py --preset medium-large 2>&1 | grep -vi warn
IFS=";" read -ra VARIANT_LIST <<< "$VARIANTS"
NAMES=()
for v in "${VARIANT_LIST[@]}"; do
    NAMES+=("${v%%:*}")
    # shellcheck disable=SC2086  # the flags split into words on purpose
    python train.py "${MEDIUM_LARGE[@]}" --block_size=$BLOCK \
        --micro_batch=$MB --max_tokens=$((STEPS * MB * BLOCK)) --warmup_tokens=$((STEPS / 10 * MB * BLOCK)) \
        --lr=6e-4 --min_lr=6e-5 ${v#*:} --eval_every_steps="$STEPS" --eval_tokens=1000000 --log_every_steps=25 \
        --out_dir="$RUNS/${v%%:*}" ${ARGS:-} 2>&1 | grep -E "^step|eval|switches" || true
done
python - "$RUNS" "${NAMES[@]}" <<'PY'
import json, statistics, sys
out = {}
for p in sys.argv[2:]:
    recs = [json.loads(line) for line in open(f"{sys.argv[1]}/{p}/log.jsonl")]
    train = [r["loss"] for r in recs if "loss" in r][-20:]
    speed = [r["tokens_per_s"] for r in recs if "tokens_per_s" in r]
    speed = speed[2:] or speed  # after compilation
    val = [r["val/loss"] for r in recs if "val/loss" in r]
    out[p] = {"train_loss_last20": statistics.mean(train), "val_loss": val[-1],
              "tokens_per_s": statistics.median(speed)}
b = out[sys.argv[2]]
print(f"\n{'':<10} {'train loss (last 20)':>21} {'val loss':>9} {'tokens/s':>9}   "
      f"vs {sys.argv[2]}: train, val, tokens/s")
for p, r in out.items():
    print(f"{p:<10} {r['train_loss_last20']:>21.4f} {r['val_loss']:>9.4f} {r['tokens_per_s']:>9,.0f}   "
          f"{r['train_loss_last20'] / b['train_loss_last20']:.4f}, {r['val_loss'] / b['val_loss']:.4f}, "
          f"{r['tokens_per_s'] / b['tokens_per_s']:.3f}x")
json.dump(out, open(f"{sys.argv[1]}/fp8_check.json", "w"), indent=1)
PY
