"""CPU time of grpo.score() for one GRPO step's samples (decode, stop strings, reward, repetition check), best of 5:
64 MedMCQA prompts x 16 completions of up to 32 GPT-2 tokens, twice: random tokens, and completions like a pretrained
policy's (a letter prior per prompt; ' B' + EOS three times in four, else ' B\\nQuestion: ...' running on into random
tokens, which the stop string cuts).
    TIKTOKEN_GPT2_FILE=../shared/data/gpt2.tiktoken python scripts/score_speed.py ../shared/data/medmcqa/questions.jsonl
Another task and width (random tokens only), e.g. config/grpo_gsm8k.py's 16 prompts x 16 x 256 new tokens:
    TIKTOKEN_GPT2_FILE=../shared/data/gpt2.tiktoken python scripts/score_speed.py ../shared/data/gsm8k/train.jsonl gsm8k 16 256"""
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import grpo  # noqa: E402
import tasks  # noqa: E402
from tokenizer import get_tokenizer  # noqa: E402

tok = get_tokenizer("gpt2")
task = sys.argv[2] if len(sys.argv) > 2 else "medmcqa"
P = int(sys.argv[3]) if len(sys.argv) > 3 else 64  # prompts, 16 samples each
W = int(sys.argv[4]) if len(sys.argv) > 4 else 32  # new tokens a sample
examples = grpo.load_examples(task, sys.argv[1], P, 0, True, "train")
cfg = {**grpo._DEFAULTS, "samples_per_prompt": 16, "max_new_tokens": W}


def policy_like(rng, width=32):
    rows = []
    for _ in examples:
        prior = [rng.random() for _ in "ABCD"]
        for _ in range(16):
            L = rng.choices("ABCD", prior)[0]
            run_on = tok.encode(f" {L}\nQuestion: A 30-year-old") + [rng.randrange(tok.eos_id) for _ in range(width)]
            rows.append((tok.encode(" " + L) + [tok.eos_id] if rng.random() < 0.75 else run_on)[:width])
    tokens = torch.tensor([r + [tok.eos_id] * (width - len(r)) for r in rows])
    return tokens, torch.tensor([len(r) for r in rows])


inputs = {"random tokens": (torch.randint(0, 50257, (16 * P, W), generator=torch.Generator().manual_seed(0)),
                            torch.full((16 * P,), W))}
if task in ("medmcqa", "medqa"):
    inputs["policy-like"] = policy_like(random.Random(0), W)
for name, (tokens, lengths) in inputs.items():
    times = []
    for _ in range(5):
        t = time.perf_counter()
        grpo.score(tok, examples, tokens, lengths, cfg, lambda text, e: tasks.grade(e["task"], text, e))
        times.append(time.perf_counter() - t)
    print(f"score() of {16 * P} samples of {W} tokens, {name}: {min(times):.4f} s (best of 5)")
