"""
Cold compile and step time of train.py's compile choices at config/gutenberg.py's shape (small preset, 12 layers,
32 x 1024 tokens, bf16): the whole model vs its blocks and loss (compile_scope), and Muon's step eager or compiled.
Each variant runs in its own process with empty Inductor and Triton caches: "first step" is a cold compile.

    python dev/compile_bench.py                  # every variant, then a table
    python dev/compile_bench.py whole blocks_muon_cg
    python dev/compile_bench.py --cpu            # smoke run: debug preset on the CPU (checks the script only)
A step is as train.py's: forward, backward, clipping, one .item() sync, the optimizers; the same batch every step.
"""
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402

# name: (shape, compile scope, optimizer, how Muon's step runs)
VARIANTS = {
    "whole": ("gutenberg", "model", "adamw", None),
    "blocks_eager_loss": ("gutenberg", "blocks_only", "adamw", None),
    "blocks": ("gutenberg", "blocks", "adamw", None),
    "muon_eager": ("gutenberg", "model", "muon", "eager"),
    "muon_inductor": ("gutenberg", "model", "muon", "inductor"),
    "muon_ro": ("gutenberg", "model", "muon", "reduce-overhead"),
    "blocks_muon_ro": ("gutenberg", "blocks", "muon", "reduce-overhead"),
    "blocks_muon_cg": ("gutenberg", "blocks", "muon", "cudagraphs"),  # train.py's compile of config/gutenberg.py
    "ml_whole": ("medium-large", "model", "adamw", None),
    "ml_blocks": ("medium-large", "blocks", "adamw", None),
}


def measure(name, cpu, steps=25):
    shape, scope, optimizer, muon_mode = VARIANTS[name]
    dev = "cpu" if cpu else "cuda"
    if cpu:
        cfg, (B, T) = M.make_config("debug", vocab_size=512, block_size=32), (4, 32)
    elif shape == "medium-large":
        cfg, (B, T) = M.make_config("medium-large", vocab_size=50304, block_size=2048), (16, 2048)
    else:
        cfg, (B, T) = M.make_config("small", n_layer=12, vocab_size=50304, block_size=1024), (32, 1024)
    torch.manual_seed(0)
    m = M.GPT(cfg).to(dev)
    x, y = torch.randint(0, cfg.vocab_size - 64, (2, B, T), device=dev)
    fwd = m
    if scope == "model":
        fwd = torch.compile(m)
    elif scope == "blocks":
        M.compile_regions(m)
    else:  # the blocks alone, the loss eager
        for block in m.blocks:
            block.compile()
    muon = dict(lr=0.02, momentum=0.95, weight_decay=0.2) if optimizer == "muon" else None
    opts = m.configure_optimizer(1.5e-3, 1.0, (0.9, 0.95), dev, muon=muon)
    opts = opts if isinstance(opts, list) else [opts]
    steps_fn = [o.step for o in opts]
    if muon_mode not in (None, "eager"):  # as train.py: the lr a tensor, so a new value needs no new graph
        for group in opts[0].param_groups:
            group["lr"] = torch.tensor(0.02, device=dev)
        kw = {"inductor": {}, "reduce-overhead": {"mode": "reduce-overhead"}, "cudagraphs": {"backend": "cudagraphs"}}
        steps_fn[0] = torch.compile(opts[0].step, **kw[muon_mode])
    sync = (lambda: None) if cpu else torch.cuda.synchronize

    def step():
        with torch.autocast(dev, torch.bfloat16):
            loss = fwd(x, y)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        loss_val, _ = loss.item(), norm.item()
        for opt, opt_step in zip(opts, steps_fn):
            opt_step()
            opt.zero_grad(set_to_none=True)
        return loss_val

    sync()
    t = time.perf_counter()
    first_loss = step()
    sync()
    first = time.perf_counter() - t
    for _ in range(3):
        step()
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        last_loss = step()
    sync()
    ms = (time.perf_counter() - t) / steps * 1e3
    # the same batch every step: the loss must fall, or the compiled step is wrong however fast
    print(f"RESULT {name} {first:.1f} {ms:.2f} {B * T / ms * 1e3:.0f} {first_loss:.3f} {last_loss:.3f}", flush=True)


def main(argv):
    cpu = "--cpu" in argv
    names = [a for a in argv if a != "--cpu"] or list(VARIANTS)
    bad = [n for n in names if n not in VARIANTS]
    if bad:
        raise SystemExit(f"unknown variant(s) {bad}; choose from {list(VARIANTS)}")
    rows = []
    for name in names:
        with tempfile.TemporaryDirectory() as cache:  # cold: nothing compiled by an earlier variant is reused
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": f"{cache}/inductor", "TRITON_CACHE_DIR": f"{cache}/triton"}
            p = subprocess.run([sys.executable, __file__, "--one", name] + ["--cpu"] * cpu, env=env, text=True,
                               capture_output=True)
        line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT")), None)
        if p.returncode or line is None:
            print(f"{name}: failed (exit {p.returncode}): {p.stderr.strip().splitlines()[-1:]}", flush=True)
            continue
        rows.append(line.split()[1:])
        print(line, flush=True)
    print("\n| variant | cold first step s | ms/step | tokens/s | loss first -> last |\n|---|---:|---:|---:|---|")
    for name, first, ms, tok_s, l0, l1 in rows:
        print(f"| {name} | {first} | {ms} | {int(tok_s):,} | {l0} -> {l1} |")
    return 0 if len(rows) == len(names) else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        measure(sys.argv[2], "--cpu" in sys.argv)
    else:
        sys.exit(main(sys.argv[1:]))
