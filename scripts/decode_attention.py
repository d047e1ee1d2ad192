"""Decoding attention at GRPO's rollout shape (batch 1024, 4 KV heads x 4 query heads each, head_dim 72, ~183 cached
slots, bf16): model.decode_attend against other ways to write the same two batched matmuls, and SDPA's
memory-efficient kernel, and kernels.decode_attention (Triton, K and V read once) at a few tile settings. Prints each
one's median time (triton do_bench) and its largest difference from SDPA, then the Triton kernel's from decode_attend.
    python scripts/decode_attention.py [batch] [slots]"""
import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernels  # noqa: E402
import model as M  # noqa: E402

B = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
S = int(sys.argv[2]) if len(sys.argv) > 2 else 183
H, R, D = 4, 4, 72
torch.manual_seed(0)
q = torch.randn(B, H, R, D, device="cuda", dtype=torch.bfloat16)
k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
mask = torch.arange(S, device="cuda")[None, None, None, :] >= torch.randint(0, S - 1, (B, 1, 1, 1), device="cuda")


def bf16_scores(q, k, v, mask):  # the first bmm in bf16, then float32 for the softmax
    a, b = q.reshape(B * H, R, D), k.reshape(B * H, S, D).transpose(1, 2)
    s = torch.bmm(a, b).float().view(B, H, R, S).mul_(D ** -0.5).masked_fill_(~mask, float("-inf"))
    return torch.bmm(torch.softmax(s, -1).to(v.dtype).view(B * H, R, S), v.reshape(B * H, S, D)).view(B, H, R, D)


def keys_first(q, k, v, mask):  # K @ q^T and V^T @ p^T: the long side (slots, head_dim) as the GEMMs' M
    kk, vv = k.reshape(B * H, S, D), v.reshape(B * H, S, D)
    s = torch.bmm(kk, q.reshape(B * H, R, D).transpose(1, 2), out_dtype=torch.float32)  # (BH, S, R)
    s = s.view(B, H, S, R).transpose(2, 3).mul(D ** -0.5).masked_fill_(~mask, float("-inf"))
    p = torch.softmax(s, -1).to(v.dtype).view(B * H, R, S)
    return torch.bmm(vv.transpose(1, 2), p.transpose(1, 2)).transpose(1, 2).reshape(B, H, R, D)


def elementwise(q, k, v, mask):  # no GEMM: broadcast multiply and sum (reads K and V once, through the cache)
    s = (q.float()[:, :, :, None, :] * k.float()[:, :, None, :, :]).sum(-1) * D ** -0.5
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)
    return (p[..., None] * v.float()[:, :, None, :, :]).sum(-2).to(v.dtype)


def triton_kernel(block_s=32, num_warps=1, num_stages=2):  # kernels.decode_attention takes the key mask (B, S)
    return lambda q, k, v, mask: kernels.decode_attention(q, k, v, mask[:, 0, 0], block_s, num_warps, num_stages)


ways = {"decode_attend (bmm, float32 scores)": M.decode_attend, "bf16 scores bmm": bf16_scores,
        "keys-first bmm": keys_first, "elementwise": elementwise,
        "elementwise, compiled": torch.compile(elementwise),
        "SDPA memory-efficient": lambda q, k, v, m: M._masked_sdpa(q, k, v, m, 0.0)}
for block_s, num_warps, num_stages in [(32, 1, 2), (64, 2, 2), (64, 4, 3), (128, 4, 2)]:  # the first: the defaults
    ways[f"Triton, BLOCK_S {block_s}, {num_warps} warps, {num_stages} stages"] = triton_kernel(
        block_s, num_warps, num_stages)
ref = M._masked_sdpa(q, k, v, mask, 0.0).float()
kv_mb = 2 * k.numel() * 2 / 1e6
print(f"batch {B}, {H} KV heads x {R} query rows, {S} slots, head_dim {D}: K and V are {kv_mb:.0f} MB")
for name, fn in ways.items():
    err = (fn(q, k, v, mask).float() - ref).abs().max().item()
    ms = do_bench(lambda: fn(q, k, v, mask), warmup=25, rep=200)
    print(f"{name:<40} {ms * 1e3:8.1f} us  {kv_mb / 1e3 / (ms / 1e3) / 1e3:6.2f} TB/s of K+V  max |diff| {err:.1e}")
err = (triton_kernel()(q, k, v, mask).float() - M.decode_attend(q, k, v, mask).float()).abs().max().item()
print(f"kernels.decode_attention (defaults) against decode_attend: max |diff| {err:.1e}")
