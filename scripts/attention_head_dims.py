"""Causal attention forward + backward through SDPA's cuDNN backend at medium-large's training shape (16 x 2048,
16 query heads, 4 KV heads) for several head dims, and head_dim 72 zero-padded to 80, 96 and 128 (pad, attend with
72's scale, slice; the pad and slice included): is a wider head cheaper than 72 on this GPU's kernels?
    python scripts/attention_head_dims.py"""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

B, H, Hkv, T = 16, 16, 4, 2048


def fwd_bwd(d, pad_to=None):
    q = torch.randn(B, H, T, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(B, Hkv, T, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    g = torch.randn(B, H, T, d, device="cuda", dtype=torch.bfloat16)

    def run():
        a, b, c = (F.pad(x, (0, pad_to - d)) for x in (q, k, v)) if pad_to else (q, k, v)
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            y = F.scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=True, scale=d ** -0.5)
        y[..., :d].backward(g)
    return do_bench(run, warmup=10, rep=100)


rows = [(f"head_dim {d}", fwd_bwd(d)) for d in (64, 72, 80, 96, 128)]
rows += [(f"head_dim 72 zero-padded to {p}", fwd_bwd(72, p)) for p in (80, 96, 128)]
base = dict(rows)["head_dim 72"]
print(f"{'cuDNN SDPA, causal fwd+bwd, 16 x 16 x 2048':<40} {'ms':>7} {'vs 72':>7}")
for name, ms in rows:
    print(f"{name:<40} {ms:7.3f} {base / ms:6.2f}x")
