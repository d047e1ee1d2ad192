#!/usr/bin/env bash
# One command from a fresh machine to a trained, sampled model.
#   ./run.sh                  quick demo (minutes, CPU or GPU): small dataset -> train -> sample
#   DATA=path ./run.sh        the same demo offline, on a parquet / jsonl / txt file or folder
#   MED=q.jsonl ./run.sh a100_2day   the seeds' pretraining recipe (a100_1day / a100_3day likewise)
#   ./run.sh usmle            GRPO on MedQA-style questions from out/a100_2day/ckpt.pt (grpo_gsm8k likewise)
set -euo pipefail
cd "$(dirname "$0")"
RECIPE=${1:-demo}

python3 -c "import torch" 2>/dev/null || python3 -m pip install torch   # CUDA users: pick your build at pytorch.org
python3 -m pip install -q -r requirements.txt
GPU=$(python3 -c "import torch; print(int(torch.cuda.is_available()))")
online() { python3 -c "import socket; socket.create_connection(('huggingface.co', 443), timeout=5)" 2>/dev/null; }

case "$RECIPE" in
  demo)
    if [ -n "${DATA:-}" ]; then
      python3 prepare_data.py --source "$DATA" --val-fraction 0.02 --out data/demo
    elif online; then
      python3 prepare_data.py --hf HuggingFaceFW/fineweb-edu --hf-config sample-10BT --hf-max-docs 20000 --out data/demo
    else
      echo "offline: set DATA=<parquet/jsonl/txt file or folder> and TIKTOKEN_GPT2_FILE=<gpt2.tiktoken>"
      exit 1
    fi
    if [ "$GPU" = 1 ]; then
      python3 train.py config/gutenberg.py --data_dir=data/demo --out_dir=out/demo
    else  # the debug preset with the GPT-2 vocabulary: a few minutes on a laptop CPU
      python3 train.py config/debug.py --data_dir=data/demo --out_dir=out/demo --max_tokens=200000 \
          --eval_every_steps=50 --lr=3e-3
    fi
    python3 sample.py --ckpt out/demo/ckpt.pt --start "The" --num_samples 2 --max_new_tokens 60
    ;;
  a100_1day|a100_2day|a100_3day)
    if [ ! -f data/fineweb_medqa/meta.json ]; then  # 85% FineWeb-Edu (streamed) + 15% MedQA-schema medical text
      MED=${MED:-}
      [ -f "$MED" ] || { echo "set MED=<MedQA-schema jsonl of medical questions, e.g. MedMCQA's train split>"; exit 1; }
      python3 prepare_data.py --hf HuggingFaceFW/fineweb-edu:0.85 --hf-config sample-10BT --source "$MED:0.15" \
          --max-tokens 2100000000 --shard-tokens 500000000 --out data/fineweb_medqa
    fi
    if [ "$GPU" = 1 ] && [ "$(python3 -c 'import torch; print(torch.cuda.device_count())')" -gt 1 ]; then
      N=$(python3 -c 'import torch; print(torch.cuda.device_count())')
      torchrun --standalone --nproc_per_node="$N" train.py "config/$RECIPE.py" --grad_accum=$((16 / N))
    else
      python3 train.py "config/$RECIPE.py"
    fi
    python3 sample.py --ckpt "out/$RECIPE/ckpt.pt" --start "Question: What is the most common cause of" --num_samples 2
    ;;
  usmle|grpo_gsm8k|grpo_addition)
    python3 grpo.py "config/$RECIPE.py"
    ;;
  *)
    echo "unknown recipe $RECIPE: use demo (default), a100_1day, a100_2day, a100_3day, usmle, grpo_gsm8k" \
         "or grpo_addition"
    exit 2
    ;;
esac
