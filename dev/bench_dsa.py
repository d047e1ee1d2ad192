"""
DeepSeek Sparse Attention (model.py's DSA section) measured: speed against dense SDPA, and quality from a checkpoint.
BENCHMARKS.md's DSA section holds the commands and the numbers.

  python dev/bench_dsa.py speed       # fwd+bwd of one attention layer, dense vs DSA, T = 2k/8k/32k, medium-large shape
  python dev/bench_dsa.py decode      # one new token against a T-long KV cache (batch 16): dense vs DSA
  python dev/bench_dsa.py quality --ckpt out/dsa_warmup/ckpt.pt --data_dir data/gutenberg
                                  # val loss of dense vs DSA at k = T/8, T/4 (and a recent-k window), indexer recall
  python dev/bench_dsa.py all --device cpu --tiny    # every part at tiny sizes on the CPU: a smoke check

quality takes a dense checkpoint too: --warmup_steps N then trains a fresh indexer here (stage 1 only, the
main model frozen) before measuring; train.py with config/dsa_warmup.py and config/dsa_sparse.py runs both stages.
"""
import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from dev/: the project's modules
import attention as A  # noqa: E402
import dsa  # noqa: E402
import model as M  # noqa: E402
from model import GPT, GPTConfig, make_config  # noqa: E402


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed_ms(fn, dev, iters):
    """Mean wall time of fn in ms after two untimed calls (kernel selection, allocator warm-up); 'OOM' when it does
    not fit."""
    try:
        for _ in range(2):
            fn()
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync(dev)
        return (time.perf_counter() - t0) / iters * 1e3
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return float("nan")


def copy_bandwidth(dev):
    """Device memory bandwidth in bytes/s from a large copy (read + write): the floor for a memory-bound kernel."""
    n = (1 << 28) if dev.type == "cuda" else (1 << 24)
    a = torch.empty(n, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    ms = timed_ms(lambda: b.copy_(a), dev, 10)
    return 2 * n / (ms / 1e3)


def fmt(ms):
    return "-" if ms is None else "OOM" if math.isnan(ms) else f"{ms:.2f}"


# ---------------------------------------------------------------------------------------------
def speed(args, dev):
    """One attention layer, forward + backward, on random q/k/v of the model's shape. DSA = the indexer's projections
    and top-k (no gradient: the LM loss cannot train it) + attention over the selected keys. Tokens per call are
    fixed (B = tokens / T), so each row is the same amount of training data."""
    cfg = make_config(args.preset, dsa_top_k=1, **json.loads(args.overrides))
    H, Hkv, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if dev.type == "cuda" else nullcontext()
    indexer = dsa.Indexer(cfg).to(dev)
    bw = copy_bandwidth(dev)
    print(f"speed: preset {args.preset} (H={H}, Hkv={Hkv}, D={D}, d={cfg.n_embd}), indexer {cfg.dsa_heads} heads x "
          f"{cfg.dsa_head_dim} (RoPE {cfg.dsa_rope_dim}), {args.tokens} tokens per call, {dtype}, {dev} "
          f"({torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}), copy bandwidth {bw / 1e9:.0f} GB/s")
    print("times in ms per layer; DSA columns include selection; "
          "'floor' = selected K/V bytes of one forward / bandwidth")
    cols = ["T", "B", "k", "dense fwd", "dense f+b", "select", "mask f+b", "gather f+b", "gather fwd", "floor fwd",
            "L_I (train)"]
    print(" | ".join(f"{c:>11}" for c in cols))
    results = []
    for T in args.lengths:
        B = max(1, args.tokens // T)
        torch.manual_seed(0)
        x = torch.randn(B, T, cfg.n_embd, device=dev, dtype=dtype)
        q = torch.randn(B, T, H, D, device=dev, dtype=dtype, requires_grad=True)
        k = torch.randn(B, T, Hkv, D, device=dev, dtype=dtype, requires_grad=True)
        v = torch.randn(B, T, Hkv, D, device=dev, dtype=dtype, requires_grad=True)
        dy = torch.randn_like(q)
        cos, sin = (t[None, :, None].to(dev) for t in M.rope_tables(cfg.dsa_rope_dim, T, cfg.rope_theta))
        iters = max(1, args.iters * 2048 // T)

        def dense(backward=True):
            y = A.attend(q, k, v)
            if backward:
                y.backward(dy)

        def select(top_k):
            with torch.no_grad(), autocast:
                iq, ik, iw = indexer(x, cos, sin)
                return dsa.select_topk(iq, ik, iw, top_k)

        def sparse(impl, top_k, backward=True):
            idx, valid = select(top_k)
            y = dsa.sparse_attend(q, k, v, idx, valid, impl=impl)
            if backward:
                y.backward(dy)

        def indexer_loss(top_k):  # the sparse stage's L_I over the selected keys, forward with its gradient
            with autocast:
                iq, ik, iw = indexer(x, cos, sin)
            idx, valid = select(top_k)
            dsa.IndexerKL.apply(iq, ik, iw, q.detach(), k.detach(), idx, valid, True).backward()

        t_dense_f = timed_ms(lambda: dense(False), dev, iters)
        t_dense = timed_ms(dense, dev, iters)
        for top_k in sorted({T // 8, min(2048, T // 2)}):
            t_sel = timed_ms(lambda: select(top_k), dev, iters)
            t_mask = timed_ms(lambda: sparse("mask", top_k), dev, iters)
            t_gather = timed_ms(lambda: sparse("gather", top_k), dev, iters)
            t_gather_f = timed_ms(lambda: sparse("gather", top_k, False), dev, iters)
            floor = B * T * top_k * Hkv * D * 2 * q.element_size() / bw * 1e3
            t_kl = timed_ms(lambda: indexer_loss(top_k), dev, max(1, iters // 2)) if T <= args.kl_max_T else None
            row = dict(T=T, B=B, k=top_k, dense_fwd=t_dense_f, dense=t_dense, select=t_sel, mask=t_mask,
                       gather=t_gather, gather_fwd=t_gather_f, floor_fwd=floor, indexer_loss=t_kl)
            results.append(row)
            print(" | ".join(f"{v:>11}" if isinstance(v, int) else f"{fmt(v):>11}" for v in row.values()), flush=True)
        del x, q, k, v, dy
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    for name in ("mask", "gather"):
        wins = sorted((r["T"], r["k"]) for r in results if r[name] < r["dense"])
        print(f"crossover ({name}): DSA fwd+bwd is faster than dense SDPA from " +
              (f"T = {wins[0][0]} (k = {wins[0][1]})" if wins else "no measured T: it is slower at every size here"))
    wins = [r for r in results if r["select"] + r["floor_fwd"] < r["dense_fwd"]]
    print("an ideal memory-bound kernel (selection + floor) would beat the dense forward from " +
          (f"T = {min(r['T'] for r in wins)}" if wins else "no measured T"))
    return results


def decode(args, dev):
    """One new token per row against a T-long KV cache, the serving step DSA is built for: dense reads every cached
    K/V row; DSA reads the indexer keys (D_I numbers per token) and the k selected K/V rows."""
    cfg = make_config(args.preset, dsa_top_k=1, **json.loads(args.overrides))
    H, Hkv, D, HI, DI = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.dsa_heads, cfg.dsa_head_dim
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    B = args.decode_batch
    print(f"decode: batch {B}, one query token, preset {args.preset}, {dtype}; ms per layer")
    print(" | ".join(f"{c:>10}" for c in ["T", "k", "dense", "DSA", "speed-up"]))
    results = []
    for T in args.decode_lengths:
        torch.manual_seed(0)
        q = torch.randn(B, 1, H, D, device=dev, dtype=dtype)
        k, v = (torch.randn(B, T, Hkv, D, device=dev, dtype=dtype) for _ in range(2))
        iq, iw, ik = (torch.randn(B, 1, HI, DI, device=dev, dtype=dtype),
                      torch.randn(B, 1, HI, device=dev, dtype=dtype),
                      torch.randn(B, T, DI, device=dev, dtype=dtype))
        visible = torch.ones(B, 1, 1, T, dtype=torch.bool, device=dev)
        iters = max(5, args.iters * 10)

        def dense():
            return torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                                    v.transpose(1, 2), enable_gqa=True)

        t_dense = timed_ms(dense, dev, iters)
        for top_k in sorted({T // 8, min(2048, T // 2)}):
            def sparse_step():
                idx, valid = dsa.select_topk(iq, ik, iw, top_k, visible)
                return dsa.gather_attend(q, k, v, idx, valid)
            with torch.no_grad():
                t_dsa = timed_ms(sparse_step, dev, iters)
            results.append(dict(T=T, k=top_k, dense=t_dense, dsa=t_dsa))
            print(" | ".join([f"{T:>10}", f"{top_k:>10}", f"{fmt(t_dense):>10}", f"{fmt(t_dsa):>10}",
                              f"{t_dense / t_dsa:>9.2f}x"]), flush=True)
    return results


# ---------------------------------------------------------------------------------------------
def load_split(data_dir, split):
    with open(os.path.join(data_dir, "meta.json")) as f:
        meta = json.load(f)
    files = [np.memmap(os.path.join(data_dir, name), dtype=np.dtype(meta["dtype"]), mode="r")
             for name in meta["splits"][split]["files"]]
    return max(files, key=len)


def quality_model(args, dev):
    """The model to measure and its block size: a checkpoint (dense or DSA) or, with --tiny and no checkpoint, a
    random one."""
    if args.ckpt:
        from checkpoint import load_checkpoint
        ckpt = load_checkpoint(args.ckpt)
        base = ckpt["model_config"]
        state = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
    else:
        assert args.tiny, "quality needs --ckpt (or --tiny for a smoke check on a random model)"
        base, state = None, None
    T = args.block_size or (base["block_size"] if base else 256)
    if base is None:
        cfg = make_config("debug", vocab_size=512, block_size=T, dsa_top_k=T // 8)
    else:
        top_k = base.get("dsa_top_k") or T // 8
        cfg = GPTConfig(**{**base, "block_size": max(T, base["block_size"]), "dsa_top_k": top_k, "dsa_stage": "sparse",
                           "dropout": 0.0})
    model = GPT(cfg)
    fresh = False
    if state is not None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if "indexer" not in k]:
            raise SystemExit(f"{args.ckpt} does not fit: missing {missing[:4]}, unexpected {unexpected[:4]}")
        fresh = bool(missing)
    return model.to(dev), T, fresh or state is None


def set_attention(model, mode, top_k=0):
    """mode: "dense" | "dsa" (the indexer's top_k) | "window" (the top_k most recent keys: a baseline)."""
    for b in model.blocks:
        b.attn.stage = "warmup" if mode == "dense" else "sparse"
        b.attn.top_k = top_k
    dsa.select_topk = window_topk if mode == "window" else _select_topk


_select_topk = dsa.select_topk


@torch.no_grad()
def window_topk(iq, ik, iw, top_k, mask=None):
    """The recent-k baseline in select_topk's format: query t keeps keys t-k+1..t (no cache)."""
    B, T = iq.shape[:2]
    idx = torch.arange(T, device=iq.device)[:, None] - torch.arange(top_k, device=iq.device)[None, :]
    return idx.clamp(min=0).expand(B, T, top_k), (idx >= 0).expand(B, T, top_k)


def indexer_warmup(model, args, dev, train, T, autocast):
    """Stage 1 here (the short path; train.py + config/dsa_warmup.py is the full one): dense attention, main model
    frozen, AdamW on the indexer's KL loss alone."""
    params = [p for n, p in model.named_parameters() if "indexer" in n]
    for n, p in model.named_parameters():
        p.requires_grad = "indexer" in n
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    set_attention(model, "dense")
    model.train()
    rng = np.random.default_rng(0)
    t0 = time.time()
    for step in range(args.warmup_steps):
        lr = args.lr * min(1.0, (step + 1) / max(1, args.warmup_steps // 10))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = rng.integers(0, len(train) - T - 1, size=args.batch)
        x = torch.from_numpy(np.stack([train[s:s + T] for s in starts]).astype(np.int64)).to(dev)
        with autocast:
            _, loss = model.losses(x, x)  # the targets do not matter: only L_I has a gradient
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % max(1, args.warmup_steps // 10) == 0 or step == args.warmup_steps - 1:
            print(f"indexer warm-up step {step + 1}/{args.warmup_steps}: L_I {loss.item():.4f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad = True


@torch.no_grad()
def recall(model, windows, T, ks, autocast):
    """Per layer, for rows with more than k visible keys: the share of the dense attention's k highest keys (p =
    head-averaged probabilities) that the indexer picks, and the share of p's mass on the indexer's k keys."""
    captured = []
    hooks = [b.attn.register_forward_pre_hook(lambda mod, a: captured.append((mod, a[0], a[1], a[2], a[6])))
             for b in model.blocks]
    set_attention(model, "dense")
    with autocast:
        model.hidden(windows)
    for h in hooks:
        h.remove()
    hit = {k: [] for k in ks}
    mass = {k: [] for k in ks}
    window_mass = {k: [] for k in ks}
    for attn, x, cos, sin, irope in captured:
        with autocast:
            q, k_, _ = attn.project(x, cos, sin)
            iq, ik, iw = attn.indexer(x, *irope)
        B = x.shape[0]
        for t0, t1 in dsa._row_chunks(T, B * max(attn.n_head, iq.shape[2]) * T):
            keep = dsa._allowed(None, t0, t1, T, x.device)
            p = dsa.attention_probs(q[:, t0:t1].float(), k_.float(), keep)
            with autocast:
                scores = dsa.index_scores(iq[:, t0:t1], ik, iw[:, t0:t1]).masked_fill(~keep, float("-inf"))
            rows = torch.arange(t0, t1, device=x.device)
            for k in ks:
                long_rows = rows + 1 > k
                if not long_rows.any():
                    continue
                mine = scores.topk(k, -1).indices
                picked = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, mine, True)
                hit[k].append(picked.gather(-1, p.topk(k, -1).indices).float().mean(-1)[:, long_rows].flatten())
                mass[k].append(p.gather(-1, mine).sum(-1)[:, long_rows].flatten())
                recent = rows[:, None] - torch.arange(T, device=x.device)[None, :] < k
                window_mass[k].append((p * (recent & keep)).sum(-1)[:, long_rows].flatten())
    return {k: (torch.cat(hit[k]).mean().item(), torch.cat(mass[k]).mean().item(),
                torch.cat(window_mass[k]).mean().item()) for k in ks if hit[k]}


def quality(args, dev):
    model, T, fresh = quality_model(args, dev)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if dev.type == "cuda" else nullcontext()
    vocab = model.cfg.vocab_size
    if args.data_dir:
        train, val = load_split(args.data_dir, "train"), load_split(args.data_dir, "val")
    else:  # smoke check without data: random tokens
        assert args.tiny, "quality needs --data_dir"
        rng = np.random.default_rng(0)
        train, val = rng.integers(0, vocab, 200_000).astype(np.uint16), rng.integers(0, vocab, 20_000).astype(np.uint16)
    print(f"quality: {args.ckpt or 'random tiny model'}, T = {T}, "
          f"indexer {model.cfg.dsa_heads} x {model.cfg.dsa_head_dim}, "
          f"{'fresh indexer' if fresh else 'indexer from the checkpoint'}")
    if args.warmup_steps:
        indexer_warmup(model, args, dev, train, T, autocast)
    elif fresh:
        print("warning: the indexer is untrained (a dense checkpoint): DSA numbers below measure a random selection")
    model.eval()
    n = max(1, min((len(val) - 1) // T, args.eval_tokens // T))
    windows = [torch.from_numpy(np.stack([val[(w + i) * T:(w + i + 1) * T + 1]
                                          for i in range(min(args.batch, n - w))]).astype(np.int64))
               for w in range(0, n, args.batch)]
    ks = [T // 8, T // 4]
    settings = ([("dense", "dense", 0)] + [(f"DSA k={k}", "dsa", k) for k in ks]
                + [(f"window k={k}", "window", k) for k in ks])
    print(f"val loss on {n} windows of {T} tokens ({n * T:,} tokens)")
    results = {}
    for name, mode, k in settings:
        set_attention(model, mode, k)
        total, count = 0.0, 0
        with torch.no_grad():
            for xy in windows:
                xy = xy.to(dev)
                with autocast:
                    losses, _ = model.token_stats(xy[:, :-1], xy[:, 1:])
                total += losses.double().sum().item()
                count += losses.numel()
        results[name] = total / count
        print(f"  {name:>14}: {results[name]:.4f}"
              + (f"  ({results[name] - results['dense']:+.4f} vs dense)" if name != "dense" else ""), flush=True)
    rec = recall(model, windows[0].to(dev)[:, :-1][: args.recall_batch], T, ks, autocast)
    for k, (hits, mass, window_mass) in rec.items():
        print(f"  indexer recall of the dense top-{k}: {hits:.3f}; dense attention mass on the indexer's {k} keys: "
              f"{mass:.3f} (on the {k} most recent keys: {window_mass:.3f})")
    set_attention(model, "dsa", model.cfg.dsa_top_k)
    return results, rec


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["speed", "decode", "quality", "all"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny sizes, for a CPU smoke check")
    p.add_argument("--preset", default=None,
                   help="model shape for speed/decode (default medium-large; debug with --tiny)")
    p.add_argument("--overrides", default="{}", help='GPTConfig fields as JSON, e.g. \'{"dsa_heads": 8}\'')
    p.add_argument("--lengths", default=None, help="comma-separated T (default 2048,8192,32768; 64,128 with --tiny)")
    p.add_argument("--tokens", type=int, default=None,
                   help="tokens per speed call (default 32768 = B16 x 2k; 256 with --tiny)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--kl_max_T", type=int, default=8192, help="time L_I (dense-masked here, O(T^2)) up to this T")
    p.add_argument("--decode_batch", type=int, default=None)
    p.add_argument("--decode_lengths", default=None, help="cache lengths for decode (default 2048,8192,32768,131072)")
    p.add_argument("--ckpt", default=None, help="quality: a checkpoint, dense or DSA")
    p.add_argument("--data_dir", default=None, help="quality: prepare_data.py output (train/val + meta.json)")
    p.add_argument("--block_size", type=int, default=None, help="quality: T (default: the checkpoint's)")
    p.add_argument("--eval_tokens", type=int, default=1_000_000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--recall_batch", type=int, default=2)
    p.add_argument("--warmup_steps", type=int, default=0, help="quality: train the indexer here first (stage 1)")
    p.add_argument("--lr", type=float, default=1e-3, help="indexer warm-up learning rate (DeepSeek: 1e-3)")
    args = p.parse_args()
    dev = torch.device(args.device)
    args.preset = args.preset or ("debug" if args.tiny else "medium-large")
    args.lengths = ([int(t) for t in args.lengths.split(",")] if args.lengths
                    else ([64, 128] if args.tiny else [2048, 8192, 32768]))
    args.tokens = args.tokens or (256 if args.tiny else 32768)
    args.decode_batch = args.decode_batch or (2 if args.tiny else 16)
    args.decode_lengths = ([int(t) for t in args.decode_lengths.split(",")] if args.decode_lengths
                           else (args.lengths if args.tiny else args.lengths + [131072]))
    if args.tiny:
        args.eval_tokens, args.iters, args.batch = min(args.eval_tokens, 4096), min(args.iters, 2), min(args.batch, 4)
        args.warmup_steps = args.warmup_steps or (10 if not args.ckpt else 0)
    if dev.type == "cuda":
        # as train.py: fp32 matmuls (the KL's attention probabilities) in TF32
        torch.backends.cuda.matmul.allow_tf32 = True
    print(f"torch {torch.__version__}, device {dev}")
    if args.what in ("speed", "all"):
        speed(args, dev)
    if args.what in ("decode", "all"):
        decode(args, dev)
    if args.what in ("quality", "all"):
        quality(args, dev)


if __name__ == "__main__":
    main()
