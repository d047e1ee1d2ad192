#!/usr/bin/env bash
# Speed of this tree against an older checkout, same commands on both (GPU): bench.py's medium-large 16 x 2048
# training tokens/s in bf16 and FP8 (compiled), generate()'s new tokens/s (bench.py --decode: batch 256, 128-token
# prompts, 256 new tokens), and config/usmle.py's GRPO step (16 prompts x 16 samples, compiled; median of steps 2..)
# from a medium-large checkpoint of a few Gutenberg steps. Prints a table last: metric, old, new, new/old.
#   OLD=/path/to/old/checkout SRC=.cache/data bash dev/perf_check.sh
#   SRC holds gpt2.tiktoken, gutenberg/*.parquet and medmcqa/questions.jsonl.
#   PARTS="bench grpo" (default both): a part each call when one call cannot hold both (10-minute device calls).
#   CPU smoke check at toy sizes: DEVICE=cpu PRESET=debug BATCH=2 BLOCK=64 GRPO_PRESET=debug bash dev/perf_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
NEW=$(pwd)
OLD=$(cd "${OLD:?set OLD to a checkout of the commit to compare with}" && pwd)
SRC=$(cd "${SRC:-.cache/data}" && pwd)
RUNS=$NEW/${RUNS:-out/perf_check}
DEVICE=${DEVICE:-cuda} PRESET=${PRESET:-medium-large} BATCH=${BATCH:-16} BLOCK=${BLOCK:-2048}
GRPO_PRESET=${GRPO_PRESET:-medium-large} GRPO_STEPS=${GRPO_STEPS:-4}
DECODE=${DECODE:---decode_batch 256 --prompt_len 128 --new_tokens 256}
PARTS=${PARTS:-bench grpo}
export TIKTOKEN_GPT2_FILE=$SRC/gpt2.tiktoken PYTHONUNBUFFERED=1
mkdir -p "$RUNS"
[ -e data/gutenberg/meta.json ] || python prepare_data.py --source "$SRC/gutenberg/train.parquet" \
    --val-source "$SRC/gutenberg/val.parquet" --out data/gutenberg
# one checkpoint of 2 optimizer steps for both trees' GRPO runs, written by the old tree (it would not load newer
# GPTConfig fields)
[[ " $PARTS " != *" grpo "* ]] || [ -e "$RUNS/ckpt/ckpt.pt" ] || (cd "$OLD" && python train.py config/gutenberg.py \
    --preset="$GRPO_PRESET" "--model_overrides={}" --block_size="$BLOCK" --micro_batch="$BATCH" --grad_accum=1 \
    --max_tokens=$((2 * BATCH * BLOCK)) --warmup_tokens=$((BATCH * BLOCK)) --eval_every_steps=0 --compile=False \
    --device="$DEVICE" --data_dir="$NEW/data/gutenberg" --out_dir="$RUNS/ckpt" | grep -E "saved")
for TREE in old new; do
    DIR=$OLD
    [ "$TREE" = new ] && DIR=$NEW
    echo "=== $TREE: $DIR"
    # shellcheck disable=SC2086  # DECODE splits into flags
    [[ " $PARTS " != *" bench "* ]] || (cd "$DIR" && python bench.py --device "$DEVICE" --preset "$PRESET" \
        --micro_batch "$BATCH" --block_size "$BLOCK" --steps 6 --warmup 3 --variant precision=bf16 \
        --variant precision=fp8 --decode $DECODE --json "$RUNS/bench_$TREE.json" | tail -n 6)
    [[ " $PARTS " != *" grpo "* ]] || (cd "$DIR" && python grpo.py config/usmle.py --init_from="$RUNS/ckpt/ckpt.pt" \
        --out_dir="$RUNS/grpo_$TREE" --device="$DEVICE" --train_data="$SRC/medmcqa/questions.jsonl" \
        --eval_task=medmcqa --eval_data="$SRC/medmcqa/questions.jsonl" --eval_every=0 --eval_n=8 --save_every=1000 \
        --drop_zero_std=False --max_steps="$GRPO_STEPS" | grep -E "^(switches|step)")  # every step updates
done
python - "$RUNS" <<'PY'
import json, os, sys
runs = sys.argv[1]
row = {}
for tree in ("old", "new"):
    b = json.load(open(f"{runs}/bench_{tree}.json")) if os.path.isfile(f"{runs}/bench_{tree}.json") else {"rows": []}
    for r in b["rows"]:
        name = "train tok/s " + ("fp8" if "precision=fp8" in r["name"] else "bf16")
        row.setdefault(name, {})[tree] = r.get("tokens_per_s", float("nan"))
    if "decode" in b:
        row.setdefault("generate new tok/s", {})[tree] = b["decode"]["new_tokens_per_s"]
    if not os.path.isfile(f"{runs}/grpo_{tree}/log.jsonl"):
        continue
    steps = [r["t_step"] for r in map(json.loads, open(f"{runs}/grpo_{tree}/log.jsonl")) if "t_step" in r]
    steps = sorted(steps[1:] or steps)  # the first step compiles
    row.setdefault("GRPO step s (median)", {})[tree] = steps[len(steps) // 2]
print(f"\n{'metric':<22} {'old':>12} {'new':>12} {'new/old':>8}")
for name, v in row.items():
    if len(v) == 2:
        print(f"{name:<22} {v['old']:>12,.2f} {v['new']:>12,.2f} {v['new'] / v['old']:>8.3f}")
PY
