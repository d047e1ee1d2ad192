#!/usr/bin/env bash
# GPU evidence for grpo.py (BENCHMARKS.md, "GRPO learning"). One stage per call:
#
#   bash dev/grpo_evidence.sh mix_pretrain        # GPT-2 BPE: Gutenberg + addition + MedMCQA text (CKPT_MED)
#   bash dev/grpo_evidence.sh addition_pretrain   # Gutenberg + 25% addition text, character-level, small
#   bash dev/grpo_evidence.sh addition            # held-out addition accuracy before / GRPO / after, reward curve
#   bash dev/grpo_evidence.sh med_pretrain        # only without CKPT_MED: Gutenberg + MedMCQA text, small
#   bash dev/grpo_evidence.sh med                 # MedQA dev, loglik + generative, before / GRPO on MedMCQA / after
#   bash dev/grpo_evidence.sh bench               # rollout new tokens/s: ours vs transformers, medium-large, 256 x 256
#
# Inputs (environment; defaults in brackets or below):
#   DATA           folder with gpt2.tiktoken, gutenberg/, medmcqa/questions.jsonl, medqa/dev.jsonl
#   OUT            where everything is written                                                    [out/evidence]
#   CKPT_ADDITION  a checkpoint pretrained with the addition text in the mix  [$OUT/pretrain_addition/ckpt.pt]
#   CKPT_MED       a checkpoint pretrained with MedMCQA text in the mix       [$OUT/pretrain_med/ckpt.pt]
#   ADD_STEPS, MED_STEPS   GRPO steps                                         [200, 100]
#   PRETRAIN_TOKENS        training tokens of a *_pretrain stage [30M BPE tokens; addition_pretrain: 40M characters]
#   TRAIN_ARGS, GRPO_ARGS  extra --key=value overrides for train.py / grpo.py (e.g. a CPU smoke run)
# Results: $OUT/*.json (eval.py), $OUT/grpo_*/log.jsonl and reward_curve.png, $OUT/bench_rollout.json.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
OUT=${OUT:-out/evidence}
# pretraining: the Gutenberg model with AdamW, the usual decay and its lr (the demo's Muon recipe came later)
ADAMW=(config/gutenberg.py --optimizer=adamw --weight_decay=0.1 --lr=1.5e-3 --min_lr=1.5e-4)
export TIKTOKEN_GPT2_FILE=${TIKTOKEN_GPT2_FILE:-$DATA/gpt2.tiktoken}
CKPT_ADDITION=${CKPT_ADDITION:-$OUT/pretrain_addition/ckpt.pt}
CKPT_MED=${CKPT_MED:-$OUT/pretrain_med/ckpt.pt}
mkdir -p "$OUT"

need() { [ -e "$1" ] || { echo "missing $1: $2" >&2; exit 2; }; }

case "${1:-}" in
addition_pretrain)  # characters, so digits are tokens (GPT-2's BPE cuts numbers into irregular chunks)
    need "$DATA/gutenberg/train.parquet" "set DATA to a folder holding gutenberg/{train,val}.parquet"
    python tasks.py synth --task addition --n 600000 --seed 0 --out "$OUT/addition_text.jsonl"
    python prepare_data.py --tokenizer char --source "$DATA/gutenberg/train.parquet:0.75" \
        --source "$OUT/addition_text.jsonl:0.25" --val-source "$DATA/gutenberg/val.parquet" --max-tokens 40000000 \
        --out "$OUT/data_gutenberg_addition" --overwrite
    python train.py "${ADAMW[@]}" \
        --data_dir="$OUT/data_gutenberg_addition" --out_dir="$OUT/pretrain_addition" \
        --max_tokens="${PRETRAIN_TOKENS:-40000000}" --eval_every_steps=0 ${TRAIN_ARGS:-}
    ;;
mix_pretrain)  # one checkpoint for both experiments: Gutenberg 80% + addition text 10% + MedMCQA text 10%
    need "$DATA/medmcqa/questions.jsonl" "set DATA to a folder holding medmcqa/questions.jsonl and gutenberg/"
    python tasks.py synth --task addition --n 400000 --seed 0 --out "$OUT/addition_text.jsonl"
    python prepare_data.py --source "$DATA/gutenberg/train.parquet:0.8" --source "$OUT/addition_text.jsonl:0.1" \
        --source "$DATA/medmcqa/questions.jsonl:0.1" --val-source "$DATA/gutenberg/val.parquet" --max-tokens 20000000 \
        --out "$OUT/data_mix" --overwrite
    python train.py "${ADAMW[@]}" \
        --data_dir="$OUT/data_mix" --out_dir="$OUT/pretrain_mix" \
        --max_tokens="${PRETRAIN_TOKENS:-30000000}" --eval_every_steps=0 ${TRAIN_ARGS:-}
    ;;
addition)  # evaluations before and after GRPO
    need "$CKPT_ADDITION" "set CKPT_ADDITION, or run the addition_pretrain stage first"
    python eval.py --ckpt "$CKPT_ADDITION" --task addition --n 1000 --max_new_tokens 8 --batch 500 \
        --json "$OUT/addition_before.json"
    python grpo.py config/grpo_addition.py --init_from="$CKPT_ADDITION" --out_dir="$OUT/grpo_addition" \
        --max_steps="${ADD_STEPS:-200}" ${GRPO_ARGS:-}
    python eval.py --ckpt "$OUT/grpo_addition/ckpt.pt" --task addition --n 1000 --max_new_tokens 8 --batch 500 \
        --json "$OUT/addition_after.json"
    ;;
med_pretrain)  # Gutenberg + MedMCQA questions written as "Question ... Answer: X" documents
    need "$DATA/medmcqa/questions.jsonl" "set DATA to a folder holding medmcqa/questions.jsonl"
    python prepare_data.py --source "$DATA/gutenberg/train.parquet:0.8" --source "$DATA/medmcqa/questions.jsonl:0.2" \
        --val-source "$DATA/gutenberg/val.parquet" --max-tokens 20000000 --out "$OUT/data_gutenberg_med" --overwrite
    python train.py "${ADAMW[@]}" \
        --data_dir="$OUT/data_gutenberg_med" --out_dir="$OUT/pretrain_med" \
        --max_tokens="${PRETRAIN_TOKENS:-30000000}" --eval_every_steps=0 ${TRAIN_ARGS:-}
    ;;
med)  # evaluations before and after GRPO (config/usmle.py, shortened)
    need "$CKPT_MED" "set CKPT_MED, or run the med_pretrain stage first"
    need "$DATA/medqa/dev.jsonl" "set DATA to a folder holding medqa/dev.jsonl and medmcqa/questions.jsonl"
    python eval.py --ckpt "$CKPT_MED" --task medqa --data "$DATA/medqa/dev.jsonl" --mode both --show 2 \
        --json "$OUT/medqa_before.json"
    python grpo.py config/usmle.py --init_from="$CKPT_MED" --out_dir="$OUT/grpo_med" \
        --train_data="$DATA/medmcqa/questions.jsonl" --eval_data="$DATA/medqa/dev.jsonl" \
        --max_steps="${MED_STEPS:-100}" --eval_every=50 --save_every=1000 ${GRPO_ARGS:-}
    python eval.py --ckpt "$OUT/grpo_med/ckpt.pt" --task medqa --data "$DATA/medqa/dev.jsonl" --mode both --show 2 \
        --json "$OUT/medqa_after.json"
    ;;
bench)  # medium-large random weights, batch 256, 128-token prompts, 256 new tokens
    python dev/bench_rollout.py --json "$OUT/bench_rollout.json"
    ;;
*)
    sed -n '2,18p' "$0"
    exit 1
    ;;
esac
