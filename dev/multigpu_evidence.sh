#!/usr/bin/env bash
# Issues 4 and 6 on one machine with 2 or 4 GPUs: tokens/s per GPU of DDP and FSDP against one GPU (medium-large,
# 16 x 2048 per GPU, compiled, Gutenberg tokens), then the FSDP run on all GPUs resumed on half of them. Table last.
#   bash dev/multigpu_evidence.sh
#   NGPU=4 STEPS=40 ONLY="single fsdp" bash dev/multigpu_evidence.sh
# Environment: NGPU (2 or 4; default: all visible), SRC (data folder), RUNS (output folder, out/multigpu), STEPS per
# run (25), ONLY (a subset of "single ddp2 ddp4 fsdp"; fsdp includes its resume), MB and BLOCK (16, 2048), ARGS (more
# --key=value). A CPU smoke run with gloo: NGPU=2 MB=2 BLOCK=64 ARGS="--device=cpu --preset=debug --compile=False".
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-out/multigpu}
STEPS=${STEPS:-25}
NGPU=${NGPU:-$(python -c "import torch; print(min(4, torch.cuda.device_count()))")}
[ "$NGPU" = 2 ] || [ "$NGPU" = 4 ] || { echo "needs 2 or 4 GPUs (NGPU=$NGPU)"; exit 2; }
HALF=$((NGPU / 2))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
source dev/gutenberg_data.sh
MB=${MB:-16} BLOCK=${BLOCK:-2048}
# constant lr: the resumed run continues the same curve
common=("${MEDIUM_LARGE[@]}" --block_size=$BLOCK --micro_batch=$MB
        --grad_accum=1 --eval_every_steps=0 --log_every_steps=5 --checkpoint_every_steps=0
        --lr=6e-4 --warmup_tokens=$((5 * MB * BLOCK)) --decay_fraction=0 ${ARGS:-})
launch() {  # launch N-gpus out_dir max_tokens [more args]
    local n=$1 dir=$2 tokens=$3; shift 3
    local cmd=(python train.py)
    [ "$n" -gt 1 ] && cmd=(torchrun --standalone --nproc_per_node="$n" train.py)
    echo "=== $dir on $n GPU(s): ${cmd[*]} ... $*"
    "${cmd[@]}" "${common[@]}" --out_dir="$dir" --max_tokens="$tokens" "$@" 2>&1 \
        | grep -E "^step|saved|resum|switches|Error|error" || true
}
rm -rf "$RUNS"
specs=("1 single ddp" "2 ddp2 ddp")
[ "$NGPU" = 4 ] && specs+=("4 ddp4 ddp")
specs+=("$NGPU fsdp$NGPU fsdp")
ONLY=${ONLY:-single ddp2 ddp4 fsdp}
for spec in "${specs[@]}"; do
    read -r n name mode <<< "$spec"
    [[ " $ONLY " == *" ${name%[0-9]} "* || " $ONLY " == *" $name "* ]] || continue
    launch "$n" "$RUNS/$name" $((STEPS * n * MB * BLOCK)) --parallel="$mode"
done
# resume the FSDP run on half the GPUs for STEPS more steps (the schedule counts tokens, so it carries over)
if [[ " $ONLY " == *" fsdp "* ]]; then
    launch "$HALF" "$RUNS/fsdp$NGPU" $((STEPS * (NGPU + HALF) * MB * BLOCK)) --parallel=fsdp --init_from=resume
fi
python - "$RUNS" "$STEPS" "$NGPU" <<'EOF'
import json, os, statistics, sys
runs, steps, ngpu = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def rows(name):
    return [json.loads(line) for line in open(f"{runs}/{name}/log.jsonl")]
def speed(recs):  # median tokens/s of the logged intervals after the first 10 steps (compilation)
    return statistics.median([r["tokens_per_s"] for r in recs])
table, base = [], None
fsdp = rows(f"fsdp{ngpu}") if os.path.exists(f"{runs}/fsdp{ngpu}/log.jsonl") else []
names = [(name, n) for name, n in (("single", 1), ("ddp2", 2), ("ddp4", 4))
         if os.path.exists(f"{runs}/{name}/log.jsonl")]
runs_list = [(name, n, rows(name)) for name, n in names]
if fsdp:
    runs_list += [(f"fsdp{ngpu}", ngpu, [r for r in fsdp if r["step"] <= steps]),
                  (f"fsdp{ngpu} resumed on {ngpu // 2}", ngpu // 2, [r for r in fsdp if r["step"] > steps])]
for name, n, recs in runs_list:
    start = min(r["step"] for r in recs)
    timed = [r for r in recs if "tokens_per_s" in r and r["step"] >= start + 10]
    tok_s = speed(timed) if timed else float("nan")
    base = base or tok_s
    table.append((name, n, tok_s, tok_s / n / base, max((r.get("mem_gib", 0) for r in timed), default=0)))
print(f"\n{'run':<28} {'GPUs':>4} {'tokens/s':>10} {'per GPU vs 1':>13} {'peak GiB':>9}")
for name, n, tok_s, eff, mem in table:
    print(f"{name:<28} {n:>4} {tok_s:>10,.0f} {100 * eff:>12.1f}% {mem:>9.1f}")
before = [r for r in fsdp if r["step"] <= steps][-3:]
after = [r for r in fsdp if r["step"] > steps][:3]
if fsdp:
    print(f"resume {ngpu} -> {ngpu // 2} GPUs: loss of the last steps before:", [round(r["loss"], 4) for r in before],
      "first steps after:", [round(r["loss"], 4) for r in after], "steps", after[0]["step"] if after else None)
json.dump({"table": table, "before": before, "after": after}, open(f"{runs}/multigpu.json", "w"), indent=1)
EOF
