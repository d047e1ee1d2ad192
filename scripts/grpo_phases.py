"""Where a compiled GRPO step's time goes after the rollout, at config/usmle.py's settings with grpo_speed.sh's step
(medium-large, random weights, 64 prompts x 16 samples of 32 tokens, prompts of MedMCQA's lengths: median 50 tokens):
the reference log-probs (grpo.prepare_microbatches, no grad) and the update (grpo.backward_on_batch, clipping,
AdamW), timed over 3 steps after 2 compiling ones, then one step profiled: GPU kernel time against wall time and
the kernels that take it, and the GPU's idle time by what the host was doing meanwhile. Each way named on the command line runs in turn, with its compile time: flex =
model.compiled_hidden() (one compiled Block.forward for every layer) with the shared rows' attention through
flex_attention (the default), mask = the same through SDPA with the dense mask, whole = torch.compile(GPT.hidden)
(the dense mask).
    python scripts/grpo_phases.py flex mask whole"""
import copy
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import grpo  # noqa: E402
import model as M  # noqa: E402
from configurator import configure  # noqa: E402

cfg = configure(dict(grpo._DEFAULTS), [os.path.join(os.path.dirname(__file__), "..", "config", "usmle.py")])
torch.manual_seed(0)
dev = torch.device("cuda")
policy = M.GPT(M.make_config("medium-large")).to(dev)
ref = copy.deepcopy(policy).eval()
opt = policy.configure_optimizer(1e-5, 0.0, (0.9, 0.99), "cuda")
g = torch.Generator().manual_seed(0)
P, G, L = int(os.environ.get("P", 64)), 16, 32  # P=16: config/usmle.py's own step
lens = torch.normal(55.0, 18.0, (P,), generator=g).clamp(26, 224).long().tolist()
prompts = [p for p in (torch.randint(0, 50000, (n,), generator=g).tolist() for n in lens) for _ in range(G)]
completions = [torch.randint(0, 50000, (L,), generator=g).tolist() for _ in range(P * G)]
adv = torch.randn(P * G, generator=g)
ac = torch.autocast("cuda", dtype=torch.bfloat16)
sync = torch.cuda.synchronize
n_tokens = P * G * L


def step():
    """-> (seconds of the reference log-probs, seconds of the update)."""
    sync(); t0 = time.perf_counter()
    with torch.profiler.record_function("ref log-probs"):
        mbs, _ = grpo.prepare_microbatches(policy, ref, prompts, completions, adv, cfg, dev, ac)
    sync(); t1 = time.perf_counter()
    with torch.profiler.record_function("update"):
        policy.train()
        opt.zero_grad(set_to_none=True)
        grpo.backward_on_batch(policy, mbs, n_tokens, cfg, ac)
        clip(policy.parameters(), 1.0)
        adamw()
        policy.eval()
    sync()
    return t1 - t0, time.perf_counter() - t1


LABELS = ("ref log-probs", "update", "pack_rows", "packed_mask", "hidden", "loss", "backward", "clip", "adamw")


def labelled(name, fn):
    def run(*a, **kw):
        with torch.profiler.record_function(name):
            return fn(*a, **kw)
    return run


def idle_by_phase(prof):
    """The GPU's idle time in the profiled step (gaps between kernels), and how much of it fell inside each labelled host
    phase: where the host was while the GPU waited (nested phases count in each)."""
    ev = prof.events()
    busy = sorted((e.time_range.start, e.time_range.end) for e in ev  # the labels' own GPU-side ranges left out
                  if e.device_type == torch.autograd.DeviceType.CUDA and e.name not in LABELS)
    phases = [(e.name, e.time_range.start, e.time_range.end) for e in ev if e.name in LABELS]
    gaps, end = [], busy[0][1]
    for s, e in busy[1:]:
        if s > end:
            gaps.append((end, s))
        end = max(end, e)
    out = {}
    for name, r0, r1 in phases:
        wall, idle = out.get(name, (0.0, 0.0))
        out[name] = (wall + r1 - r0, idle + sum(max(0.0, min(g1, r1) - max(g0, r0)) for g0, g1 in gaps))
    total = sum(g1 - g0 for g0, g1 in gaps) / 1e3
    print(f"GPU idle between its first and last kernel: {total:.1f} ms; by host phase (ms of wall / ms the GPU idled in it):")
    print("  " + " | ".join(f"{n} {w / 1e3:.1f} / {i / 1e3:.1f}" for n, (w, i) in out.items()))


grpo.pack_rows = labelled("pack_rows", grpo.pack_rows)
M.packed_mask = labelled("packed_mask", M.packed_mask)
grpo.grpo_token_loss = labelled("loss", grpo.grpo_token_loss)
torch.Tensor.backward = labelled("backward", torch.Tensor.backward)
clip, adamw = labelled("clip", torch.nn.utils.clip_grad_norm_), labelled("adamw", opt.step)
rows = []
regional, whole = M.compiled_hidden(), torch.compile(M.GPT.hidden, dynamic=True)
for way in sys.argv[1:] or ["flex"]:
    if way not in ("flex", "mask", "whole"):
        raise SystemExit(f"unknown way {way!r}: flex | mask | whole")
    hidden = labelled("hidden", whole if way == "whole" else regional)
    M.compiled_hidden = lambda: hidden  # noqa: B023  (grpo.py asks at each call)
    M.FLEX_PACKED = way == "flex"
    t0 = time.perf_counter()
    step(); step()  # compiles: the no-grad forward, then forward + backward, for each row length met
    compile_s = time.perf_counter() - t0
    times = [step() for _ in range(3)]
    ref_s, upd_s = (sorted(t[i] for t in times)[1] for i in (0, 1))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        step()
        wall = time.perf_counter() - t0
    ev = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu = sum(e.self_device_time_total for e in ev if e.key not in LABELS) / 1e6
    print(f"--- {way}: kernels by GPU time (one profiled step: {gpu:.3f} s of kernels in {wall:.3f} s of wall)")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=90))
    idle_by_phase(prof)
    rows.append((way, compile_s, ref_s, upd_s, gpu, wall, torch.cuda.max_memory_allocated() / 2**30))
    print(f"{way}: compiling {compile_s:.1f} s, ref {ref_s:.3f} s, update {upd_s:.3f} s", flush=True)
    torch.cuda.reset_peak_memory_stats()
print(f"{'compile':>9} | {'2 compiling steps s':>19} | {'ref log-probs s':>15} | {'update s':>8} | {'profiled: GPU busy / wall':>25} | peak GiB")
for way, c, r, u, gpu, wall, mem in rows:
    print(f"{way:>9} | {c:19.1f} | {r:15.3f} | {u:8.3f} | {gpu:.3f} / {wall:.3f} s ({gpu / wall:.0%}) | {mem:.1f}")
