"""CPU time of grpo.score() for one GRPO step's samples: 64 MedMCQA prompts x 16 completions of 32 random GPT-2
tokens (decode, stop strings, reward, repetition check), best of 5.
    TIKTOKEN_GPT2_FILE=../shared/data/gpt2.tiktoken python scripts/score_speed.py ../shared/data/medmcqa/questions.jsonl"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import grpo  # noqa: E402
import tasks  # noqa: E402
from tokenizer import get_tokenizer  # noqa: E402

tok = get_tokenizer("gpt2")
examples = grpo.load_examples("medmcqa", sys.argv[1], 64, 0, True, "train")
cfg = {**grpo._DEFAULTS, "samples_per_prompt": 16, "max_new_tokens": 32}
tokens = torch.randint(0, 50257, (1024, 32), generator=torch.Generator().manual_seed(0))
lengths = torch.full((1024,), 32)
times = []
for _ in range(5):
    t = time.perf_counter()
    grpo.score(tok, examples, tokens, lengths, cfg, lambda text, e: tasks.grade(e["task"], text, e))
    times.append(time.perf_counter() - t)
print(f"score() of 1024 samples: {min(times):.3f} s (best of 5)")
