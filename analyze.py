"""
Pictures of a run:

    python analyze.py loss out/gutenberg/log.jsonl --out loss.png          # train/val loss (or GRPO reward) curves
    python analyze.py attention --ckpt out/gutenberg/ckpt.pt --data data/gutenberg --out attention.png

`attention` draws, per layer, how the attention mass of every query spreads over distances t - s (log2 bins,
averaged over heads and over validation windows): local layers peak at 1-4 tokens, long-range ones further out.
"""
import argparse
import json
import math
import os

import numpy as np
import torch


def plot_loss(log_path, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(log_path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    fig, ax = plt.subplots(figsize=(8, 5))
    train = [r for r in records if "loss" in r and "skipped" not in r]
    if train:
        x = [r.get("tokens", r["step"]) for r in train]
        ax.plot(x, [r["loss"] for r in train], lw=0.8, alpha=0.7, label="train loss")
    curves = {k for r in records for k in r if k.endswith("/loss") or k.endswith("reward_mean") or k.endswith("/acc")}
    for key in sorted(curves):
        pts = [(r.get("tokens", r["step"]), r[key]) for r in records if key in r]
        ax.plot(*zip(*pts), "o-", ms=3, label=key)
    ax.set_xlabel("tokens" if train and "tokens" in train[0] else "step")
    ax.set_title(os.path.dirname(os.path.abspath(log_path)))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(out, dpi=120, bbox_inches="tight")
    print(f"wrote {out}")


@torch.no_grad()
def attention_distances(model, windows):
    """(n_layer, n_bins) attention mass per log2 distance bin: bin b holds distances in [2^b - 1, 2^(b+1) - 1)."""
    T = windows.shape[1]
    n_bins = int(math.log2(T)) + 1
    dist = torch.arange(T)[:, None] - torch.arange(T)[None, :]
    bins = torch.floor(torch.log2(dist.clamp(min=0).float() + 1)).long().clamp(max=n_bins - 1)
    causal = (dist >= 0).to(windows.device)
    inputs = {}
    hooks = [b.attn.register_forward_hook(lambda mod, args, out, i=i: inputs.__setitem__(i, args))
             for i, b in enumerate(model.blocks)]
    model(windows)
    for h in hooks:
        h.remove()
    result = np.zeros((len(model.blocks), n_bins))
    for i, block in enumerate(model.blocks):
        x, cos, sin = inputs[i][:3]
        q, k, _ = block.attn.project(x, cos, sin)  # (B, T, H, D), (B, T, Hkv, D)
        k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
        scores = torch.einsum("bthd,bshd->bhts", q.float(), k.float()) / math.sqrt(q.shape[-1])
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1).mean(dim=(0, 1))  # (T, S)
        result[i] = torch.zeros(n_bins).index_add_(0, bins[causal.cpu()], probs[causal].cpu()).numpy() / T
    return result


def plot_attention(ckpt_path, data_dir, out, n_windows, block):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from checkpoint import load_model
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(ckpt_path, device)[0].eval()
    meta = json.load(open(os.path.join(data_dir, "meta.json")))
    val = np.memmap(os.path.join(data_dir, meta["splits"]["val"]["files"][0]), dtype=meta["dtype"], mode="r")
    T = min(block, model.cfg.block_size, len(val) // n_windows)
    windows = torch.from_numpy(np.stack([val[i * T:(i + 1) * T] for i in range(n_windows)]).astype(np.int64)).to(device)
    mass = attention_distances(model, windows)
    fig, ax = plt.subplots(figsize=(9, 5))
    im = ax.imshow(mass, aspect="auto", cmap="viridis", origin="lower")
    ax.set_xticks(range(mass.shape[1]), [f"{2 ** b - 1}" for b in range(mass.shape[1])], rotation=45)
    ax.set_xlabel("distance t - s (start of log2 bin)")
    ax.set_ylabel("layer")
    ax.set_title(f"attention mass by distance: {ckpt_path}")
    fig.colorbar(im, label="share of attention")
    fig.savefig(out, dpi=120, bbox_inches="tight")
    mean_bin = (mass * np.arange(mass.shape[1])).sum(1)
    print("layer: mean log2(distance + 1) of attention = " + ", ".join(f"{i}: {m:.2f}" for i, m in enumerate(mean_bin)))
    print(f"wrote {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("loss")
    p.add_argument("log")
    p.add_argument("--out", default="loss.png")
    p = sub.add_parser("attention")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--data", required=True, help="a prepare_data.py folder; its val split is used")
    p.add_argument("--out", default="attention.png")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--block", type=int, default=512)
    args = parser.parse_args()
    if args.cmd == "loss":
        plot_loss(args.log, args.out)
    else:
        plot_attention(args.ckpt, args.data, args.out, args.windows, args.block)
