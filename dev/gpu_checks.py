"""GPU correctness checks, run first in every GPU evidence script; exits 1 on any failure:
1. gradients of the compiled model under bf16 autocast equal eager ones (and are not zero);
2. generate()'s CUDA-graphed decoding step (its blocks eager, and as decode_block_fn's compiled halves) gives the logits
   of eager steps on the same tokens; a decoder kept from a call with other prompts, in another autocast context,
   before the weights changed (engine.Engine(compile=True), as GRPO's rollouts) decodes as a fresh one; a compiled
   prefill writes the eager prefill's hidden states and KV cache, and so does a kept decoder's prefill CUDA graph;
3. fp8.convert_to_fp8: loss and gradients near bf16's on the same weights and batch;
4. decoding's attention (decode_attend, and attention.decode_attention, which generate() runs) equals SDPA's
   memory-efficient kernel, and cached decoding steps give the logits of full forwards without a cache;
5. where flash-attn is installed: ATTENTION="flash" gives SDPA's outputs and gradients at head_dim 72 with GQA, and
   the compiled model's gradients under it equal SDPA's;
6. GRPO's shared-prompt rows (grpo.pack_rows share=512: a prompt once, its completions after it under a mask) give the
   log-probs and gradients of a row per sample, eager (SDPA, dense mask) and compiled (flex_attention on CUDA);
   repeated prompts in generate() (one shared prefill)
   decode the tokens of the prompts given once."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import attention as A  # noqa: E402
import engine  # noqa: E402
import fp8  # noqa: E402
import grpo  # noqa: E402
import model as M  # noqa: E402

torch.manual_seed(0)
dev = "cuda" if torch.cuda.is_available() else "cpu"
ok = True


def rel_diff(a, b):
    """|a - b| / |b| in float32 norms."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def grads_of(m, compiled, x, y):
    run = torch.compile(m) if compiled else m
    with torch.autocast(dev, dtype=torch.bfloat16):
        loss = run(x, y)
    loss.backward()
    g = torch.cat([p.grad.flatten().float() for p in m.parameters()])
    m.zero_grad(set_to_none=True)
    return loss.item(), g


m = M.GPT(M.make_config("small", n_layer=2, block_size=256)).to(dev)
x, y = torch.randint(0, 50304, (2, 4, 256), device=dev)
(l0, g0), (l1, g1) = grads_of(m, False, x, y), grads_of(m, True, x, y)
rel = rel_diff(g1, g0)
print(f"1. compiled vs eager: loss {l0:.5f} / {l1:.5f}, grad-norm {g0.norm():.4f} / {g1.norm():.4f}, "
      f"relative difference {rel:.2e}")
ok &= g1.norm().item() > 0 and rel < 0.05

prompts = [list(range(5, 5 + n)) for n in (7, 3, 12, 1)]


def forced_logits(way, tokens, compiled=False):
    """Logits of each decoding step after prompts, each step fed tokens' column (teacher forcing: a near-tie that
    flips a greedy token changes that one argmax, not the rest of its row): way = "graph" (generate()'s CUDA graph),
    "cache" (eager steps on a KV cache) or "uncached" (a full forward over the sequence so far); compiled: the graph's
    blocks as decode_block_fn's compiled halves (generate(compile=True))."""
    idx, pad = engine.left_pad(prompts, 0, dev)
    out = []
    with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16):
        if way == "uncached":
            for t in range(tokens.shape[1]):
                out.append(engine.full_logits(m, torch.cat([idx, tokens[:, :t]], 1), pad))
        else:
            cache = engine.KVCache(m.cfg, len(prompts), idx.shape[1] + tokens.shape[1], pad, torch.bfloat16, dev)
            out.append(m(idx, cache=cache)[:, -1])
            step = engine._decoder(m, cache, compiled) if way == "graph" else lambda tok: m(tok, cache=cache)[:, -1]
            out += [step(tokens[:, t:t + 1]).clone() for t in range(tokens.shape[1] - 1)]
    return torch.stack(out, 1)


def agree(a, b):
    """(relative difference, share of equal argmaxes) of two forced_logits."""
    return rel_diff(a, b), (a.argmax(-1) == b.argmax(-1)).float().mean().item()


with torch.autocast(dev, dtype=torch.bfloat16):
    graphed, _ = m.generate(prompts, 24, temperature=0)
    eager, _ = m.generate(prompts, 24, temperature=0, cuda_graph=False)
by_cache = forced_logits("cache", eager)
rel_e, same_e = agree(forced_logits("graph", eager), by_cache)
rel_c, same_c = agree(forced_logits("graph", eager, compiled=True), by_cache)
with torch.autocast(dev, dtype=torch.bfloat16):
    kept_engine = engine.Engine(m, compile=True)
    kept_engine.generate(prompts[::-1], 24, temperature=0)  # captures the graphs it keeps, as GRPO
kept_cache = kept_engine.cache
saved = {k: v.clone() for k, v in m.state_dict().items()}
with torch.no_grad():  # as an optimizer step between two GRPO rollouts: the weights change in place
    for p in m.parameters():
        p.add_(torch.randn_like(p), alpha=0.02)
with torch.autocast(dev, dtype=torch.bfloat16):  # another autocast context, as each rollout has
    kept, _ = kept_engine.generate(prompts, 24, temperature=0)  # replays it: other prompts, padding, weights
    reused = kept_engine.cache is kept_cache
    fresh_engine = engine.Engine(m, compile=True)
    fresh, _ = fresh_engine.generate(prompts, 24, temperature=0)  # new graphs: the same padding, kernels
m.load_state_dict(saved)
with torch.autocast(dev, dtype=torch.bfloat16):
    idx, pad = engine.left_pad(prompts, 0, dev)  # the prefill of generate(compile=True), compiled vs eager
    caches = [engine.KVCache(m.cfg, len(prompts), idx.shape[1] + 8, pad, torch.bfloat16, dev) for _ in range(2)]
    with torch.no_grad():
        h_eager, h_comp = m.hidden(idx, caches[0]), M.compiled_hidden()(m, idx, caches[1])
graphs = fresh_engine.decode
if isinstance(graphs, engine._Graphs):  # CUDA: its prefill graph (captured by the calls above) vs the eager prefill
    rows = [prompts[0], prompts[2], prompts[0], prompts[1]]  # the kept decoder's 4 rows, one prompt twice: 3 distinct
    with torch.autocast(dev, dtype=torch.bfloat16), torch.no_grad():
        graphs.refresh()
        idx, pad = engine.left_pad(rows, 0, dev, engine.PREFILL_BUCKET)
        graphs.cache.reset(pad)
        logits_g = engine._prefill(m, rows, idx, graphs.cache, M.compiled_hidden(), graphs).clone()
        eager_cache = engine.KVCache(m.cfg, len(rows), idx.shape[1], pad, torch.bfloat16, dev)
        logits_e = engine._prefill(m, rows, idx, eager_cache, M.GPT.hidden)
    prefill_graph = (rel_diff(logits_g, logits_e), rel_diff(graphs.cache.k[:, :, :, :idx.shape[1]], eager_cache.k),
                     graphs.cache.length == eager_cache.length, len(graphs.prefills))
same = (graphed == eager).float().mean().item()
same_kept = (kept == fresh).float().mean().item()
moved = (fresh != graphed).float().mean().item()  # the new weights decode other tokens, so stale ones would show
rel_h = rel_diff(h_comp, h_eager)
rel_k = rel_diff(caches[1].k, caches[0].k)
print(f"2. CUDA-graph decode vs eager steps on a cache, teacher-forced: logits' relative difference {rel_c:.1e} "
      f"with compiled halves ({100 * same_c:.1f}% of argmaxes equal), {rel_e:.1e} with eager blocks "
      f"({100 * same_e:.1f}%); free-running greedy: {100 * same:.1f}% of tokens equal; kept decoder "
      f"(reused: {reused}) vs a fresh graph after a weight change that moved {100 * moved:.0f}% of tokens: "
      f"{100 * same_kept:.1f}%; compiled prefill vs eager: hidden states {rel_h:.1e}, KV cache {rel_k:.1e} "
      f"relative difference, cache length {caches[1].length} / {caches[0].length}")
ok &= max(rel_c, rel_e) < 0.03 and min(same_c, same_e) > 0.9  # a lost cache write or a wrong position: ~1 and ~0%
ok &= same_kept > 0.95 and moved > 0.2 and reused  # stale or freed weights in a kept graph: ~0%
ok &= rel_h < 0.05 and rel_k < 0.05 and caches[1].length == caches[0].length  # a lost cache write: ~1
if isinstance(graphs, engine._Graphs):
    rel_p, rel_pk, same_len, n_graphs = prefill_graph
    print(f"   a kept decoder's prefill CUDA graph ({n_graphs} captured) vs the eager prefill, a repeated prompt "
          f"among 4 rows: logits {rel_p:.1e}, KV cache {rel_pk:.1e} relative difference, same cache length: {same_len}")
    ok &= rel_p < 0.05 and rel_pk < 0.05 and same_len and n_graphs == 2  # stale weights or rows: ~1

m8 = M.GPT(m.cfg).to(dev)
fp8.convert_to_fp8(m8)
m8.load_state_dict(m.state_dict())
l8, g8 = grads_of(m8, True, x, y)
rel8 = rel_diff(g8, g0)
print(f"3. fp8 vs bf16: loss {l8:.5f} / {l0:.5f}, gradient relative difference {rel8:.2e}")
ok &= abs(l8 - l0) / l0 < 0.01 and rel8 < 0.2
B, H, R, S, D = 64, 4, 4, 300, 72
q, k, v = (torch.randn(B, H, n, D, device=dev, dtype=torch.bfloat16) for n in (R, S, S))
mask = torch.arange(S, device=dev)[None, None, None, :] >= torch.randint(0, S - 1, (B, 1, 1, 1), device=dev)
sdpa = A._masked_sdpa(q, k, v, mask, 0.0).float()
err = (A.decode_attend(q, k, v, mask).float() - sdpa).abs().max().item()
err_t = 0.0 if dev == "cpu" else (A.decode_attention(q, k, v, mask[:, 0, 0]).float() - sdpa).abs().max().item()
rel_u, same_u = agree(by_cache, forced_logits("uncached", eager))
print(f"4. vs SDPA, max abs difference: decode_attend {err:.2e}, the Triton kernel {err_t:.2e} (0: CPU); cached vs "
      f"uncached decoding, teacher-forced: logits' relative difference {rel_u:.1e}, "
      f"{100 * same_u:.1f}% of argmaxes equal")
ok &= err < 2e-2 and err_t < 2e-2 and rel_u < 0.03 and same_u > 0.9  # a broken cache: ~1 and ~0%
try:
    flash = A._load_flash()
except RuntimeError as e:
    print(f"5. flash-attn: not installed, not checked ({str(e)[:60]}...)")
else:
    q = torch.randn(4, 512, 16, 72, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(4, 512, 4, 72, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    outs = []
    for att in ("flash", "sdpa"):
        A.ATTENTION = att
        o = A.attend(q, k, v)
        outs.append((o.float(), *(g.float() for g in torch.autograd.grad(o.float().square().sum(), (q, k, v)))))
    errs = [rel_diff(a, b) for a, b in zip(*outs)]
    A.ATTENTION = "flash"
    lf, gf = grads_of(m, True, x, y)
    A.ATTENTION = "sdpa"
    relf = rel_diff(gf, g0)
    print(f"5. flash-attn vs SDPA: relative difference out {errs[0]:.1e}, dq {errs[1]:.1e}, dk {errs[2]:.1e}, "
          f"dv {errs[3]:.1e}; compiled model with flash vs eager SDPA: loss {lf:.5f} / {l0:.5f}, "
          f"gradient relative difference {relf:.2e}")
    ok &= max(errs) < 2e-2 and relf < 0.05
g = torch.Generator().manual_seed(1)
rows = [p for p in (torch.randint(0, 50000, (n,), generator=g).tolist() for n in (40, 90, 17)) for _ in range(4)]
comps = [torch.randint(0, 50000, (int(n),), generator=g).tolist() for n in torch.randint(1, 33, (12,), generator=g)]
res = {}
for share in (0, 512):
    for compiled in (False, True):
        batch = grpo.pack_rows(rows, comps, dev, multiple=16, share=share)
        with torch.autocast(dev, dtype=torch.bfloat16):
            lp, mask = grpo.completion_logprobs(m, batch, compiled=compiled)
        lp[mask].sum().backward()
        res[share, compiled] = (lp.detach()[mask], torch.cat([p.grad.flatten().float() for p in m.parameters()]))
        m.zero_grad(set_to_none=True)
errs = {key: (rel_diff(lp, res[0, False][0]), rel_diff(gr, res[0, False][1]))
        for key, (lp, gr) in res.items() if key != (0, False)}
with torch.autocast(dev, dtype=torch.bfloat16):
    twice, _ = m.generate(prompts + prompts[::-1], 24, temperature=0)
same = (torch.cat([twice[:4], twice[4:].flip(0)]) == torch.cat([graphed, graphed])).float().mean().item()
print("6. shared-prompt rows vs a row per sample (eager), relative difference of log-probs / gradients: "
      + ", ".join(f"share {s} {'compiled' if c else 'eager'} {a:.1e} / {b:.1e}" for (s, c), (a, b) in errs.items())
      + f"; repeated prompts in generate(): {100 * same:.1f}% of greedy tokens equal")
# batch 8 vs 4: near-ties may flip; wrong cache rows give ~0%
ok &= max(max(e) for e in errs.values()) < 0.05 and same > 0.75
print("GPU checks passed" if ok else "GPU CHECKS FAILED")
sys.exit(0 if ok else 1)
