"""
Evaluate a train.py or grpo.py checkpoint on a task with a checkable answer:

    python eval.py --ckpt out/usmle/ckpt.pt --task medqa --data path/to/medqa/dev.jsonl --mode both
    python eval.py --ckpt out/gsm8k/ckpt.pt --task gsm8k --data path/to/gsm8k/train.jsonl --n 500
    python eval.py --ckpt out/add/ckpt.pt --task addition                # the generated held-out split

Multiple choice (medqa / medmcqa / pubmedqa), two ways, each with a Wilson 95% interval:
  loglik    the prompt (ending "Answer:") continued by " A", " B", ...: the most likely letter is the answer,
            as lm-evaluation-harness medqa_4options; never unparsable.
  generate  greedy completion, letter extracted by tasks.py; unparsable = no letter found.
GSM8K and addition: greedy completion, number extracted and compared exactly (tasks.py normalises it).
The functions live in grpo.py (grpo.py's eval_only runs the same code). A bad --data file stops with its
file:line and what is wrong with that line.
"""
import argparse
import json
import os
import sys
from contextlib import nullcontext

import torch

import grpo
import attention as A
import tasks

MCQ_FIELDS = ("question", "options", "answer_idx")


def check_data(path, task):
    """Check every row of a --data jsonl as tasks.load_task will read it: a bad line is one error with file:line."""
    need = {"gsm8k": ("question", "answer"), "addition": ("prompt", "answer")}.get(task, MCQ_FIELDS)
    rows = 0
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            where = f"{path}:{i}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise SystemExit(f"{where}: not UTF-8 at byte {e.start} of the line; re-encode the file as UTF-8")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{where}: bad JSON ({e})")
            if not isinstance(row, dict):
                raise SystemExit(f"{where}: a row must be a JSON object, not {type(row).__name__}")
            if not {"prompt", "answer"} <= row.keys():  # uniform rows (prompt/answer) suit every task
                missing = [k for k in need if k not in row]
                if missing:
                    raise SystemExit(f"{where}: a {task} row needs the fields {', '.join(need)} (or prompt and "
                                     f"answer); missing {', '.join(missing)}; fields are {sorted(row)}")
                opts, ans = row.get("options"), row.get("answer_idx")
                if "options" in need and not (isinstance(opts, dict) and isinstance(ans, str) and ans in opts):
                    keys = sorted(opts) if isinstance(opts, dict) else opts
                    raise SystemExit(f"{where}: answer_idx {ans!r} is not one of the options {keys!r}")
            rows += 1
    if not rows:
        raise SystemExit(f"{path}: no examples (the file is empty)")


def main(argv=None):
    ap = argparse.ArgumentParser(description="accuracy of a checkpoint on MedQA-style MCQ, GSM8K or addition")
    ap.add_argument("--ckpt", required=True, help="a train.py / grpo.py checkpoint (.pt) or a Qwen3-layout folder")
    ap.add_argument("--task", default="medqa", choices=tasks.TASKS)
    ap.add_argument("--data", default="",
                    help="jsonl of the task's schema ('' = generated for addition, else the HF hub)")
    ap.add_argument("--mode", default="both", choices=["loglik", "generate", "both"], help="MCQ only; others generate")
    ap.add_argument("--n", type=int, default=0, help="a seeded subset of n examples (0 = all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shuffle_options", action="store_true", help="MCQ: shuffle options (exposes position bias)")
    ap.add_argument("--digits", default="1-4", help="addition: operand digits lo-hi")
    ap.add_argument("--max_new_tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    ap.add_argument("--json", default="", help="also write the results here")
    ap.add_argument("--show", type=int, default=0, help="print this many greedy completions")
    a = ap.parse_args(argv)

    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no GPU is visible; use --device cpu")
    dev = torch.device(device)
    dtype = ("bfloat16" if dev.type == "cuda" else "float32") if a.dtype == "auto" else a.dtype
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    lo, _, hi = a.digits.partition("-")
    if a.data and os.path.isfile(a.data):
        check_data(a.data, a.task)
    examples = grpo.load_examples(a.task, a.data, a.n, a.seed, a.shuffle_options, "eval", (int(lo), int(hi or lo)))
    if not examples:  # an accuracy over nothing would print 0.0000 and exit 0
        raise SystemExit(f"no {a.task} examples in {a.data or 'the generated/HF split'}")
    model, tok, ckpt = grpo.load_model_and_tokenizer(a.ckpt, dev)
    print(f"{a.ckpt} ({ckpt.get('kind', '?')}, step {ckpt.get('step', '?')}): {model.num_params():,} parameters, "
          f"tokenizer {ckpt['tokenizer']['tokenizer']}; {len(examples)} {a.task} examples from "
          f"{a.data or 'generated/HF'}; ATTENTION={A.ATTENTION} dtype={dtype} device={dev}")
    results = grpo.evaluate(model, tok, examples, a.mode, a.max_new_tokens, a.batch, autocast)
    print(grpo.format_eval(results))
    for e in examples[:a.show]:
        with autocast:
            out, n = model.generate([tok.encode(e["prompt"])], a.max_new_tokens, 0.0, eos_id=tok.eos_id)
        print(f"--- {e['prompt'][-200:]}\n>>> {grpo.decode(tok, out[0, :n[0]].tolist())!r}  [answer {e['answer']}]")
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump({"ckpt": a.ckpt, "task": a.task, "data": a.data, "n": len(examples), "results": results}, f,
                      indent=1)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
