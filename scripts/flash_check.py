"""flash-attn 4 on this GPU, per head_dim: output and gradients relative to float32 SDPA, for the package's own
flash_attn_func ("fa4") and for model.py's glue ("glue", which pads head_dim to 64/96/128). A right gradient is ~3e-3.
    python scripts/flash_check.py"""
import os
import sys

import torch
import torch.nn.functional as F
from flash_attn.cute import flash_attn_func

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402

def ref(q, k, v):
    qt, kt, vt = (t.float().transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True).transpose(1, 2)

def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()

torch.manual_seed(0)
for D, H, Hkv, T, how in [(64, 16, 4, 512, "fa4"), (72, 16, 4, 512, "fa4"), (72, 16, 16, 512, "fa4"), (80, 16, 4, 512, "fa4"),
                          (96, 16, 4, 512, "fa4"), (128, 16, 4, 512, "fa4"), (72, 16, 4, 2048, "fa4"),
                          (72, 16, 4, 512, "glue"), (72, 16, 4, 2048, "glue"), (80, 16, 4, 512, "glue"), (48, 16, 4, 512, "glue")]:
    q = torch.randn(4, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(4, T, Hkv, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    do = torch.randn(4, T, H, D, device="cuda", dtype=torch.bfloat16)
    o = flash_attn_func(q, k, v, causal=True)[0] if how == "fa4" else M._load_flash()(q, k, v, 0.0)
    g = torch.autograd.grad(o, (q, k, v), do)
    r = ref(q, k, v)
    gr = torch.autograd.grad(r, (q, k, v), do.float())
    print(f"{how:5} D={D:3} H={H} Hkv={Hkv:2} T={T:4}: out {rel(o, r):.1e} dq {rel(g[0], gr[0]):.1e} dk {rel(g[1], gr[1]):.1e} dv {rel(g[2], gr[2]):.1e}", flush=True)
