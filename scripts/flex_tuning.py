"""flex_attention at GRPO's packed shape under other kernel_options (block sizes, warps, stages): config/usmle.py's
rows (P prompts of MedMCQA-like lengths, each with its 16 completions of 32 tokens in one row; P=16 by default, as in
one micro-batch of 256 samples), 16 query and 4 KV heads of 72, bf16, compiled. For each way: forward and forward + backward time
(triton do_bench median) and the largest difference of output and gradients from the first way; then cuDNN's causal
attention over the same rows (more work: every earlier key) for scale.
    python scripts/flex_tuning.py"""
import os
import sys

import torch
from torch.nn.attention.flex_attention import flex_attention
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import grpo  # noqa: E402
import model as M  # noqa: E402

g = torch.Generator().manual_seed(0)
P, G, L = int(os.environ.get("P", 16)), 16, 32
lens = torch.normal(55.0, 18.0, (P,), generator=g).clamp(26, 224).long().tolist()
prompts = [p for p in (torch.randint(0, 50000, (n,), generator=g).tolist() for n in lens) for _ in range(G)]
comps = [torch.randint(0, 50000, (L,), generator=g).tolist() for _ in range(P * G)]
seg = grpo.pack_rows(prompts, comps, "cuda", multiple=16, share=1024)["layout"][0]
B, T = seg.shape
q = torch.randn(B, 16, T, 72, device="cuda", dtype=torch.bfloat16, requires_grad=True)
k, v = (torch.randn(B, 4, T, 72, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
do = torch.randn_like(q)
print(f"{B} rows x {T} tokens", flush=True)
ways = {  # name: kernel_options
    "defaults": {},
    "fwd 128x64 w8": {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_warps": 8, "fwd_num_stages": 3},
    "fwd 64x64 w4": {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_warps": 4, "fwd_num_stages": 3},
    "bwd 64/64 w4": {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64,
                     "bwd_num_warps": 4, "bwd_num_stages": 3},
    "bwd 32/64 w4": {"bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 32,
                     "bwd_num_warps": 4, "bwd_num_stages": 3},
    "bwd 32/128 w4": {"bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128, "bwd_BLOCK_N2": 32,
                      "bwd_num_warps": 4, "bwd_num_stages": 3},
}
rows, first = [], None
mask = M.packed_mask(seg, flex=True)
for name, opts in ways.items():
    fn = torch.compile(lambda q, k, v, mask=mask, opts=opts: flex_attention(q, k, v, block_mask=mask, enable_gqa=True,
                                                                          kernel_options=opts))
    try:
        out = fn(q, k, v)
        grads = torch.autograd.grad(out, (q, k, v), do)
    except Exception as e:  # a config the template refuses
        rows.append(f"{name:<14} failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}")
        print(rows[-1], flush=True)
        continue
    first = first or (out, grads)
    err = max((a.float() - b.float()).abs().max().item() for a, b in zip((out, *grads), (first[0], *first[1])))
    fwd = do_bench(lambda: fn(q, k, v))
    both = do_bench(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do))
    rows.append(f"{name:<14} forward {fwd * 1e3:7.1f} us, forward + backward {both * 1e3:7.1f} us, max |diff| {err:.1e}")
    print(rows[-1], flush=True)
qc, kc, vc = (x.detach().requires_grad_() for x in (q, k, v))
cudnn = do_bench(lambda: torch.autograd.grad(M.attend(qc.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)),
                                             (qc, kc, vc), do.transpose(1, 2)))
rows.append(f"'cuDNN, causal over the whole rows:' forward + backward {cudnn * 1e3:7.1f} us")
print("\n".join(rows))
