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
file:line and what is wrong with that line (grpo.check_data).
"""
import argparse
import json
import os
import re
import sys

import attention as A
import grpo
import tasks
from checkpoint import gpu_faults_in_one_line, setup_device


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
    if a.batch < 1 or a.max_new_tokens < 1 or not re.fullmatch(r"\d+(-\d+)?", a.digits):
        ap.error("need --batch >= 1, --max_new_tokens >= 1 and --digits as N or LO-HI")

    dev, autocast, dtype = setup_device(a.device, a.dtype)  # as grpo.py's eval_only
    lo, _, hi = a.digits.partition("-")
    examples = grpo.load_examples(a.task, a.data, a.n, a.seed, a.shuffle_options, "eval", (int(lo), int(hi or lo)))
    if not examples:  # an accuracy over nothing would print 0.0000 and exit 0
        raise SystemExit(f"{a.data}: no examples (the file is empty)" if a.data else
                         f"no {a.task} examples in the generated/HF split")
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
    gpu_faults_in_one_line(lambda: "while evaluating", "lower --batch")
    main(sys.argv[1:])
