"""Where generate()'s time goes at GRPO's shape (medium-large, random weights, 1024 rows of 30-119-token prompts, 32
new tokens, bf16 autocast): the eager prefill, the CUDA graph capture and the decoding steps, then a kernel profile
of the prefill alone (PROFILE=0 skips it); last, generate() with compile=True as GRPO calls it, for 64 prompts x
16 samples (repeated rows share one prefill) against 1024 distinct prompts of the same lengths (every row prefilled).
    python scripts/rollout_phases.py
`python scripts/rollout_phases.py decode` times only a decoding step's parts at this shape: the CUDA graph replay (with
the Triton attention kernel, then with decode_attend), the sampling of the next token, and the kernels of one eager
step. `python scripts/rollout_phases.py kernel`: whole generate() calls at bench.py's decoding shape (128-token prompts,
256 new tokens, bf16 weights, batch 256 and 1024) with decode_attend, then with the Triton kernel.
`python scripts/rollout_phases.py halves`: a decoding step replayed at batch 256 and 1024 with eager blocks and with
decode_block_fn's compiled halves (time, kernel count), then GRPO's kept-decoder generate() at 16 and 64 prompts x 16
samples: eager blocks with torch.multinomial, with the sync-free sampler, and compiled halves.
`python scripts/rollout_phases.py prefill`: 16 kept-decoder generate() calls as GRPO's rollouts make them (compile=True,
16 and 64 prompts of MedMCQA-like lengths x 16 samples, other prompts each call): the first, then the median, mean and
worst of calls 5-16 (new prefill widths may still be captured among them)."""
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402

torch.manual_seed(0)
m = M.GPT(M.make_config("medium-large")).cuda().eval()
g = torch.Generator().manual_seed(0)
B, new = 1024, 32
lens = torch.randint(30, 120, (B,), generator=g).tolist()
prompts = [torch.randint(0, 50000, (n,), generator=g).tolist() for n in lens]
idx, pad = M.left_pad(prompts, 0, "cuda")
longest = idx.shape[1]
sync = torch.cuda.synchronize
ac = torch.autocast("cuda", dtype=torch.bfloat16)


def per_call_ms(fn, n):
    fn()  # once untimed: lazy initialisation (the sampler's random generator, workspaces)
    sync(); t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - t0) / n * 1e3


def grpo_rows(P, gen):
    """P prompts of MedMCQA-like lengths (GPT-2 BPE: median ~55 tokens) x 16 samples, as GRPO's rollouts pass them."""
    lens = torch.normal(55.0, 18.0, (P,), generator=gen).clamp(26, 224).long().tolist()
    return [p for p in (torch.randint(0, 50000, (n,), generator=gen).tolist() for n in lens) for _ in range(16)]


def rollout_s(ps):
    """Seconds of one generate() as GRPO's rollouts call it: compiled, kept decoder, `new` sampled tokens."""
    with torch.no_grad(), ac:
        sync(); t0 = time.perf_counter()
        m.generate(ps, new, temperature=1.0, compile=True, keep_decoder=True)
        sync()
    return time.perf_counter() - t0


if sys.argv[1:] == ["kernel"]:  # whole generate() calls, bench.py's decode shape, decode_attend vs the Triton kernel
    mb = M.GPT(M.make_config("medium-large")).cuda().to(torch.bfloat16).eval()
    for B in (256, 1024):
        ps, res = torch.randint(0, 50000, (B, 128)).tolist(), {}
        for rep in range(2):  # the first round warms up
            for k in (False, True):
                M.DECODE_KERNEL = k
                sync(); t0 = time.perf_counter()
                mb.generate(ps, 256, temperature=1.0)
                sync(); res[k] = B * 256 / (time.perf_counter() - t0)
        print(f"batch {B}: decode_attend {res[False]:,.0f} new tokens/s, Triton kernel {res[True]:,.0f} "
              f"({res[True] / res[False]:.2f}x)", flush=True)
    sys.exit(0)
if sys.argv[1:] == ["prefill"]:  # GRPO's kept-decoder rollouts, new prompts each call (so new prefill widths at first)
    gen = torch.Generator().manual_seed(1)
    for P in (16, 64):
        calls = [grpo_rows(P, gen) for _ in range(16)]
        M._KEPT.pop(m, None)
        times = [rollout_s(ps) for ps in calls]
        late = sorted(times[4:])
        print(f"generate() {P} x 16, 16 calls: first {times[0]:.1f} s; calls 5-16: median {late[len(late) // 2] * 1e3:.1f} ms, "
              f"mean {sum(late) / len(late) * 1e3:.1f} ms, max {late[-1] * 1e3:.1f} ms", flush=True)
    sys.exit(0)
if sys.argv[1:] == ["halves"]:  # decode_block_fn's compiled halves against eager blocks, and the sampler's sync
    def multinomial_sampler(logits, temperature=1.0, top_k=None, top_p=None, generator=None):  # before: syncs each step
        return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(1)
    new_sampler, halves, rows = M.sample_next, M.decode_block_fn, []
    for B in (256, 1024):
        with torch.no_grad(), ac:
            cache = M.KVCache(m.cfg, B, longest + 64, pad[:B], torch.bfloat16, "cuda")
            logits = m.logits(m.hidden(idx[:B], cache)[:, -1])
            tok = logits.argmax(-1)[:, None]
            for compiled in (False, True):
                cache.pos.fill_(longest)
                cache.length = longest
                dec = m._decoder(cache, B, torch.device("cuda"), compiled)
                ms = per_call_ms(lambda: dec(tok), 20)
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    dec(tok)
                    sync()
                kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
                rows.append(f"batch {B:>4}, {'compiled halves' if compiled else 'eager blocks   '}: replay {ms:.3f} ms, "
                            f"{len(kernels)} kernels, {sum(e.device_time for e in kernels) / 1e3:.3f} ms of kernel time")
                print(rows[-1], flush=True)
                if compiled and B == 256:
                    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=20, max_name_column_width=70))
    gen = torch.Generator().manual_seed(1)
    for P in (16, 64):  # GRPO's rollouts: P prompts of MedMCQA-like lengths x 16 samples, 32 new tokens, kept decoder
        ps = grpo_rows(P, gen)
        res = {}
        for name, compiled, sampler in (("eager blocks, multinomial", False, multinomial_sampler),
                                        ("eager blocks, sync-free sampler", False, new_sampler),
                                        ("compiled halves, sync-free sampler", True, new_sampler)):
            M.sample_next = sampler
            M.decode_block_fn = halves if compiled else (lambda: None)  # None: eager blocks, the prefill still compiled
            M._KEPT.pop(m, None)
            times = [rollout_s(ps) for _ in range(5)]  # 2 warm-up calls: compiling, capture
            res[name] = sorted(times[2:])[1]
            if P == 16 and compiled and os.environ.get("PROFILE", "1") != "0":  # where one whole call's GPU time goes
                with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                    wall = rollout_s(ps)
                gpu = sum(e.device_time for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA) / 1e3
                print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70))
                print(f"profiled generate() {P} x 16: {wall * 1e3:.1f} ms of wall (with the profiler), {gpu:.1f} ms of kernel time")
                if os.environ.get("TRACE"):  # a Chrome trace of that call, for its idle gaps
                    prof.export_chrome_trace(os.environ["TRACE"])
            rows.append(f"generate() {P} x 16 rows: {name:<35} {res[name] * 1e3:6.1f} ms (median of 3), "
                        f"{next(iter(res.values())) / res[name]:.2f}x")
            print(rows[-1], flush=True)
    print("\n".join(rows))
    sys.exit(0)
if sys.argv[1:] == ["decode"]:
    with torch.no_grad(), ac:
        cache = M.KVCache(m.cfg, B, longest + 64, pad, torch.bfloat16, "cuda")
        logits = m.logits(m.hidden(idx, cache)[:, -1])
        dec = m._decoder(cache, B, torch.device("cuda"))
        tok = logits.argmax(-1)[:, None]
        replay = per_call_ms(lambda: dec(tok), 20)  # 21 steps: the cache has 64 free slots
        M.DECODE_KERNEL = False  # the same step with decode_attend's two batched matmuls
        cache.pos.fill_(longest)
        cache.length = longest
        dec_bmm = m._decoder(cache, B, torch.device("cuda"))
        replay_bmm = per_call_ms(lambda: dec_bmm(tok), 20)
        M.DECODE_KERNEL = True
        sample = per_call_ms(lambda: M.sample_next(logits, 1.0), 20)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            m.logits(m.hidden(tok, cache)[:, -1])
            M.sample_next(logits, 1.0)
            sync()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=20, max_name_column_width=80))
    print(f"decoding step at batch {B}: CUDA graph replay {replay:.2f} ms (attention by kernels.decode_attention; "
          f"{replay_bmm:.2f} ms by decode_attend: {replay_bmm / replay:.2f}x), sample_next {sample:.2f} ms")
    sys.exit(0)
for rep in range(3):
    with torch.no_grad(), ac:
        sync(); t0 = time.perf_counter()
        m.generate(prompts, new, temperature=1.0)
        sync(); t1 = time.perf_counter()
        cache = M.KVCache(m.cfg, B, longest + new, pad, torch.bfloat16, "cuda")
        sync(); t2 = time.perf_counter()
        logits = m.logits(m.hidden(idx, cache)[:, -1])
        sync(); t3 = time.perf_counter()
        dec = m._decoder(cache, B, torch.device("cuda"))
        sync(); t4 = time.perf_counter()
        tok = logits.argmax(-1)
        for _ in range(new - 1):
            tok = dec(tok[:, None]).argmax(-1)
        sync(); t5 = time.perf_counter()
    print(f"rep {rep}: generate {t1 - t0:.3f} s | prefill {t3 - t2:.3f} s ({B} x {longest}, mean prompt {sum(lens) / B:.0f}) | "
          f"capture {t4 - t3:.3f} s | {new - 1} decode steps {t5 - t4:.3f} s ({(t5 - t4) / (new - 1) * 1e3:.1f} ms each)", flush=True)
if os.environ.get("PROFILE", "1") != "0":
    with torch.no_grad(), ac, profile(activities=[ProfilerActivity.CUDA]) as prof:
        m.logits(m.hidden(idx, M.KVCache(m.cfg, B, longest + new, pad, torch.bfloat16, "cuda"))[:, -1])
        sync()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=70))
shared = [p for p in prompts[:B // 16] for _ in range(16)]
distinct = [torch.randint(0, 50000, (len(p),), generator=g).tolist() for p in shared]
times = {}
for rep in range(4):  # rep 0 compiles the prefill for each block shape
    for name, ps in (("64 prompts x 16 samples", shared), ("1024 distinct prompts", distinct)):
        with torch.no_grad(), ac:
            sync(); t0 = time.perf_counter()
            m.generate(ps, new, temperature=1.0, compile=True)
            sync()
        times.setdefault(name, []).append(time.perf_counter() - t0)
for name, t in times.items():
    print(f"generate(compile=True), {name}: {sorted(t[1:])[1]:.3f} s (median of 3 after a compiling call)")
print(f"shared prefill: {sorted(times['1024 distinct prompts'][1:])[1] / sorted(times['64 prompts x 16 samples'][1:])[1]:.2f}x")
