#!/usr/bin/env bash
# Quality per compute (issue 19): variants of a config train PER_GPU at a time on each GPU (chains of variants, queued
# behind the earlier ones when there are more variants than GPUs x PER_GPU), timed by the shell
# (compile included, each run with a cold compile cache of its own), then one table read from the runs' log.jsonl.
#   bash dev/quality.sh                                  # config/gutenberg.py: unseen-author bpb, val bpb, wall
#   MODE=shakespeare bash dev/quality.sh                 # config/shakespeare_char.py: best val loss, wall
#   VARIANTS="base:;muon:--optimizer=muon" bash dev/quality.sh
#   PER_GPU=4 bash dev/quality.sh                        # 4 runs share each GPU: no faster in all, and risky (below)
#   CPU=1 DATA=/tmp/fake bash dev/quality.sh             # smoke run on the CPU (tiny model): checks the script only
# VARIANTS: "name:flags;name:flags", flags split on spaces (write dicts without spaces). Runs go to $Q_DIR/<name>,
# their output to $Q_DIR/<name>.log; the table is printed last and kept in $Q_DIR/table_$MODE.txt.
set -uo pipefail
set -f  # flags such as --curriculum=[(...)] are not file patterns
cd "$(dirname "$0")/.."
SRC=${SRC:-.cache/data}  # gpt2.tiktoken, gutenberg/{train,val}.parquet, tinyshakespeare/input.txt
DATA=${DATA:-data}  # prepared here once: $DATA/gutenberg (with an unseen_authors split), $DATA/shakespeare_char
Q_DIR=${Q_DIR:-out/q}
MODE=${MODE:-gutenberg}
CPU=${CPU:-0}
# runs sharing one GPU at once: the bpb of a fixed number of steps is the same, but "wall s" is then not a solo run's,
# and sharing buys no throughput (H100: three runs at 133k tokens/s each; one alone, 434k). Shared runs also die:
# 6 of 19 (Xid 43, on an H100 after Xid 13, an SM exception), with cuDNN attention on or off (attention.py); alone,
# none ever did: a row that fails sharing runs again alone, after the others.
PER_GPU=${PER_GPU:-1}
export TIKTOKEN_GPT2_FILE=${TIKTOKEN_GPT2_FILE:-$SRC/gpt2.tiktoken} PYTHONUNBUFFERED=1

# The rows of BENCHMARKS.md's table, in its order. The config now: Muon, 1800 steps, dropout 0, weight decay 1.0 (head)
# and 0.2 (Muon), AdamW lr 7.5e-4. OLD puts back the earlier config's regularisation (dropout 0.1, weight decay 0.1 and
# 0.01); every row but "config" starts from the earlier AdamW lr (1.5e-3, for embeddings and head beside Muon).
S=$((32 * 1024))  # tokens per step
MO="--model_overrides={'n_layer':12"  # config/gutenberg.py's model_overrides, closed with more fields (in quotes)
OLD_WD="--weight_decay=0.1 --muon_weight_decay=0.01"
OLD="$MO,'dropout':0.1} $OLD_WD"
L15="--lr=1.5e-3 --min_lr=1.5e-4"
row() { echo "$1:--max_tokens=$(($2 * S)) --eval_every_steps=$2 $L15 ${*:3}"; }  # name, steps, flags: one eval, at end
GUTENBERG_VARIANTS="$(row adamw_1800 1800 --optimizer=adamw $OLD);$(row adamw_1490 1490 --optimizer=adamw $OLD);\
$(row muon_1050 1050 $OLD);$(row muon_1650 1650 $OLD);$(row ctx2048 1050 $OLD --block_size=2048 --micro_batch=16);\
$(row drop0 1050 "$MO,'dropout':0.0}" $OLD_WD);$(row drop2 1050 "$MO,'dropout':0.2}" $OLD_WD);\
$(row wd 1050 "$MO,'dropout':0.1}" --weight_decay=0.5 --muon_weight_decay=0.1);\
$(row d1_wd2 1050 "$MO,'dropout':0.1}");$(row drop0_wd2 1050);\
$(row wd4_1400 1400 --weight_decay=2.0 --muon_weight_decay=0.4);$(row adamw_wd_1900 1900 --optimizer=adamw);\
$(row wd2_1400 1400);$(row lr15 1800);$(row mwd3 1800 --muon_weight_decay=0.3);$(row dec5 1800 --decay_fraction=0.5);\
$(row mlr4 1800 --muon_lr=0.04 --muon_weight_decay=0.1);$(row mlr1 1800 --muon_lr=0.01 --muon_weight_decay=0.4);\
$(row cap30 1800 "$MO,'dropout':0.0,'logit_softcap':30.0}");$(row lr3 1800 --lr=3e-3 --min_lr=3e-4);config:;\
$(row lr05 1800 --lr=5e-4 --min_lr=5e-5)"
# config/shakespeare_char.py now (Muon, weight decay 1.0 and 0.2), Muon with the usual decay, nanoGPT's AdamW recipe
SHAKESPEARE_VARIANTS="config:;muon:$OLD_WD;adamw:--optimizer=adamw --weight_decay=0.1"
case $MODE in
    gutenberg) CONFIG=config/gutenberg.py; NAME=gutenberg; VARIANTS=${VARIANTS:-$GUTENBERG_VARIANTS} ;;
    shakespeare) CONFIG=config/shakespeare_char.py; NAME=shakespeare_char
        VARIANTS=${VARIANTS:-$SHAKESPEARE_VARIANTS} ;;
    *) echo "MODE must be gutenberg or shakespeare, not '$MODE'" >&2; exit 2 ;;
esac

if [ "$CPU" = 1 ]; then  # after the variant's flags, so they win: the debug preset, the variant's layers, a few steps
    EXTRA="--device=cpu --compile=False --preset=debug --block_size=32 --micro_batch=4 \
--warmup_tokens=256 --max_tokens=1280 --eval_every_steps=5 --eval_tokens=512 --log_every_steps=5"
    GPUS=2
    export OMP_NUM_THREADS=1  # two runs side by side on a small CPU: oversubscribed threads stall each other
else
    EXTRA=""
    GPUS=$(nvidia-smi -L | wc -l)
    [ "$GPUS" -gt 0 ] || { echo "no GPU found (nvidia-smi -L); CPU=1 runs the smoke test" >&2; exit 1; }
fi
# each run compiles with its share of the cores (16 on an 8-GPU host: as on the 1-GPU machine of the 188 s bar)
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-$(( $(nproc) / (GPUS * PER_GPU) > 0 ?
    $(nproc) / (GPUS * PER_GPU) : 1 ))}

# ---- data, once ----
has_split() {  # meta.json, split name
    python -c "import json, sys; sys.exit(sys.argv[2] not in json.load(open(sys.argv[1]))['splits'])" "$@" 2>/dev/null
}
if [ "$MODE" = gutenberg ] && ! has_split "$DATA/gutenberg/meta.json" unseen_authors; then
    python prepare_data.py --source "$SRC/gutenberg/train.parquet" --val-source "$SRC/gutenberg/val.parquet" \
        --holdout-authors 6 --out "$DATA/gutenberg" --overwrite || exit 1
fi
if [ "$MODE" = shakespeare ] && ! has_split "$DATA/shakespeare_char/meta.json" val; then
    python prepare_data.py --tokenizer char --source "$SRC/tinyshakespeare/input.txt" --val-fraction 0.1 \
        --out "$DATA/shakespeare_char" --overwrite || exit 1
fi

# ---- runs: one chain of variants per GPU, all chains at once ----
IFS=';' read -ra SPECS <<< "$VARIANTS"
NAMES=()
for spec in "${SPECS[@]}"; do NAMES+=("${spec%%:*}"); done
mkdir -p "$Q_DIR"
run_variant() {  # name, GPU, flags...
    local name=$1 gpu=$2
    shift 2
    rm -rf "${Q_DIR:?}/$name" "$Q_DIR/$name.cache"
    local start=$EPOCHREALTIME
    # a fresh Inductor / Triton cache per run: a later run would otherwise reuse an earlier one's compiled kernels
    CUDA_VISIBLE_DEVICES=$gpu TORCHINDUCTOR_CACHE_DIR="$Q_DIR/$name.cache/inductor" \
        TRITON_CACHE_DIR="$Q_DIR/$name.cache/triton" python train.py "$CONFIG" --data_dir="$DATA/$NAME" \
        --out_dir="$Q_DIR/$name" "$@" $EXTRA > "$Q_DIR/$name.log" 2>&1
    local rc=$?
    echo "$start $EPOCHREALTIME $rc" > "$Q_DIR/$name.wall"
    rm -rf "$Q_DIR/$name.cache"
    echo "$name: exit $rc on GPU $gpu ($Q_DIR/$name.log)"
}
CHAINS=$((GPUS * PER_GPU))
for ((chain = 0; chain < CHAINS && chain < ${#SPECS[@]}; chain++)); do
    (
        for ((i = chain; i < ${#SPECS[@]}; i += CHAINS)); do
            spec=${SPECS[i]}
            read -ra flags <<< "${spec#*:}"
            run_variant "${NAMES[i]}" "$((chain % GPUS))" "${flags[@]}"
        done
    ) &
done
wait
# a run that died sharing its GPU (Xid 43 on an H200; alone, never) runs again alone, its first log kept as .shared.log
if [ "$PER_GPU" -gt 1 ]; then
    for i in "${!SPECS[@]}"; do
        read -r _ _ rc < "$Q_DIR/${NAMES[i]}.wall"
        [ "$rc" = 0 ] && continue
        mv "$Q_DIR/${NAMES[i]}.log" "$Q_DIR/${NAMES[i]}.shared.log"
        echo "${NAMES[i]}: failed sharing its GPU; again, alone"
        read -ra flags <<< "${SPECS[i]#*:}"
        run_variant "${NAMES[i]}" 0 "${flags[@]}"
    done
fi

# ---- table ----
python - "$MODE" "$Q_DIR" "${NAMES[@]}" <<'EOF' | tee "$Q_DIR/table_$MODE.txt"
import json, os, statistics, sys
mode, q_dir, names = sys.argv[1], sys.argv[2], sys.argv[3:]
if mode == "gutenberg":
    print("| variant | unseen-author bpb | val bpb | train loss (last 50 steps) | wall s | tokens/s |")
else:
    print("| variant | best val loss (step) | final val loss | wall s | tokens/s |")
print("|---" * (6 if mode == "gutenberg" else 5) + "|")
for name in names:
    start, end, rc = open(os.path.join(q_dir, f"{name}.wall")).read().split()
    wall = f"{float(end) - float(start):.0f}"
    path = os.path.join(q_dir, name, "log.jsonl")
    records = [json.loads(line) for line in open(path)] if os.path.isfile(path) else []
    evals = [r for r in records if "val/loss" in r]
    if rc != "0" or not evals:
        print(f"| {name} | failed (exit {rc}, see {q_dir}/{name}.log) |" + " |" * (4 if mode == "gutenberg" else 3))
        continue
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]  # the first interval holds the compile
    speed = f"{statistics.median(speeds):,.0f}" if speeds else "-"
    if mode == "gutenberg":
        last = evals[-1]
        train = [r["loss"] for r in records if "loss" in r and "skipped" not in r][-50:]
        unseen = f"{last['unseen_authors/bpb']:.4f}" if "unseen_authors/bpb" in last else "-"
        print(f"| {name} | {unseen} | {last['val/bpb']:.4f} | {sum(train) / len(train):.3f} | {wall} | {speed} |")
    else:
        best = min(evals, key=lambda r: r["val/loss"])
        print(f"| {name} | {best['val/loss']:.4f} ({best['step']}) | {evals[-1]['val/loss']:.4f} | {wall} | {speed} |")
EOF
