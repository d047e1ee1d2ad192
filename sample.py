"""
Generate text from a checkpoint of train.py or grpo.py:

    python sample.py --ckpt out/gutenberg/ckpt.pt --start "It was a dark night" --num_samples 3
    python sample.py --ckpt out/gutenberg/best.pt --start FILE:prompt.txt --temperature 0.8 --top_p 0.95
"""
import argparse
import time

import torch

import attention as A
from checkpoint import gpu_faults_in_one_line, load_checkpoint, load_model, setup_device
from tokenizer import load_tokenizer

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--ckpt", required=True, help="a checkpoint .pt of train.py or grpo.py")
parser.add_argument("--start", default="\n", help="the prompt text, or FILE:path to read it from a file")
parser.add_argument("--num_samples", type=int, default=3)
parser.add_argument("--max_new_tokens", type=int, default=200)
parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
parser.add_argument("--top_k", type=int, default=None)
parser.add_argument("--top_p", type=float, default=None)
parser.add_argument("--seed", type=int, default=1337)
parser.add_argument("--device", default="auto")
parser.add_argument("--attention", default="sdpa", help="attention.ATTENTION")


def read_start(start):
    """The prompt: the text itself, or the contents of the file after nanoGPT's FILE: prefix."""
    if not start.startswith("FILE:"):
        return start
    path = start[5:]
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise SystemExit(f"sample.py: error: cannot read the prompt file of --start FILE:{path}: {e.strerror}")
    except UnicodeDecodeError as e:
        raise SystemExit(f"sample.py: error: the prompt file {path} is not UTF-8 (byte offset {e.start})")


def main(args):
    if args.temperature < 0 or not (args.top_p is None or 0 < args.top_p <= 1) or (args.top_k or 0) < 0:
        raise SystemExit("sample.py: error: need --temperature >= 0, 0 < --top_p <= 1 and --top_k >= 0")
    dev, autocast, _ = setup_device(args.device)  # bfloat16 autocast on GPU, float32 on CPU
    A.ATTENTION = args.attention
    start = read_start(args.start)  # before the checkpoint loads: a typo fails at once
    ckpt = load_checkpoint(args.ckpt)
    tok = load_tokenizer(ckpt["tokenizer"])
    model = load_model(ckpt, dev, name=args.ckpt)[0].eval()
    prompt = tok.encode(start) or [tok.eos_id]  # an empty prompt starts from a document boundary
    generator = torch.Generator(dev).manual_seed(args.seed)
    t0 = time.time()
    with autocast:
        out, lengths = model.generate([prompt] * args.num_samples, args.max_new_tokens, args.temperature, args.top_k,
                                      args.top_p, eos_id=tok.eos_id, generator=generator)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.time() - t0
    for row, n in zip(out.tolist(), lengths.tolist()):
        print(start + tok.decode([t for t in row[:n] if t != tok.eos_id]))
        print("-" * 60)
    print(f"{int(lengths.sum())} new tokens in {elapsed:.2f} s: {lengths.sum().item() / elapsed:,.0f} tokens/s "
          f"({args.num_samples} samples, batched, KV cache)")


if __name__ == "__main__":
    gpu_faults_in_one_line(lambda: "while sampling", "lower --num_samples or --max_new_tokens")
    try:
        main(parser.parse_args())
    except ValueError as e:  # e.g. a prompt longer than the context: one clear line
        raise SystemExit(f"error: {e}")
