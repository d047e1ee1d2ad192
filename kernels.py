"""
A Triton kernel for one decoding step's attention at GRPO's shape (model.decode_attend's job).

Why: at GRPO's rollout shape (batch 1024, 4 KV heads x 4 query heads each, head_dim 72, ~183 cached slots,
bf16) decode_attend's two cuBLAS batched matmuls take ~300 us per layer on an H100 whatever the cache length:
4,096 products of 4 x 72 by 72 x S are per-product overhead, not bandwidth, while reading K and V once
(216 MB) would take ~65 us at 3.35 TB/s (BENCHMARKS.md, scripts/decode_attention.py). That read is the target.
Measured (H100, torch 2.11, triton 3.6, batch 1024): 95 us at 183 slots (2.3 TB/s of K+V; decode_attend 333 us),
188 us at 400 (306 us), 445 us at 1024 (2.7 TB/s); the defaults (32 slots a block, 1 warp, 2 stages) were the
fastest of 64 settings or within 1% of it at each length; BLOCK_S 128 with 1 warp was 3-5x slower. Since
fully masked blocks are skipped: 79 us at 183 slots, rows starting at random slots (scripts/decode_attention.py).

How: one program per (batch row, KV head) reads that head's K and V once, in blocks of BLOCK_S slots, with an
online (flash) softmax in float32; its R query rows share every K/V block. Blocks with no visible slot are not read
(left padding, and the unused tail of a cache kept across generate() calls). Triton is imported on first use, so
`import kernels` works without it; available() says whether it is installed.
"""
import functools
import importlib
import math

import torch


@functools.cache
def available():
    """Whether triton can be imported (decode_attention needs it; on the CPU only under TRITON_INTERPRET=1). Asked
    once: attend() asks at every eager decoding call."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


@functools.cache
def _kernel():
    """Build the jitted kernel on first use. TRITON_INTERPRET is read here (at triton.jit), not at import."""
    import triton
    import triton.language as tl

    @triton.jit
    def decode_attention_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, Hkv, S, qk_scale,
                                R: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr,
                                BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
        bh = tl.program_id(0).to(tl.int64)  # int64: B * Hkv * S * D may pass 2**31
        b = bh // Hkv
        r, d, s0 = tl.arange(0, BLOCK_R), tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_S)
        rd = (r[:, None] < R) & (d[None, :] < D)
        q = tl.load(q_ptr + bh * R * D + r[:, None] * D + d[None, :], mask=rd, other=0.0)  # (BLOCK_R, BLOCK_D)
        k_base, v_base = k_ptr + bh * S * D, v_ptr + bh * S * D
        m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)  # running max of the (log2-scaled) scores
        l_i = tl.zeros([BLOCK_R], tl.float32)  # running sum of exp2(score - m_i)
        acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
        for start in range(0, S, BLOCK_S):
            s = start + s0
            in_s = s < S
            keep = in_s & (tl.load(mask_ptr + b * S + s, mask=in_s, other=0) != 0)
            if tl.max(keep.to(tl.int32), 0) > 0:  # skip blocks nobody may see: left padding, a kept cache's unused slots
                sd = in_s[:, None] & (d[None, :] < D)
                k = tl.load(k_base + s[:, None] * D + d[None, :], mask=sd, other=0.0)  # (BLOCK_S, BLOCK_D)
                v = tl.load(v_base + s[:, None] * D + d[None, :], mask=sd, other=0.0)
                scores = tl.dot(q, tl.trans(k)) * qk_scale  # float32 (BLOCK_R, BLOCK_S)
                scores = tl.where(keep[None, :], scores, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(scores, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a fully masked block so far: no NaN
                alpha = tl.exp2(m_i - m_safe)
                p = tl.exp2(scores - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
                m_i = m_new
        out = acc / l_i[:, None]
        tl.store(out_ptr + bh * R * D + r[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty), mask=rd)

    return decode_attention_kernel


def decode_attention(q, k, v, key_mask, block_s=32, num_warps=1, num_stages=2):
    """softmax(q k^T / sqrt(D), masked) v for one decoding step, scores, softmax and sums in float32.
    q: (B, Hkv, R, D), the R query heads of each KV head folded; k, v: (B, Hkv, S, D), the cache, contiguous;
    key_mask: (B, S) bool, True where a slot may be attended (at least one per row). Any R >= 1, D <= 256, S >= 1;
    bf16 or fp16. Returns (B, Hkv, R, D) in q's dtype. block_s, num_warps, num_stages: the kernel's tuning knobs."""
    B, Hkv, R, D = q.shape
    S = k.shape[2]
    if k.shape != (B, Hkv, S, D) or v.shape != k.shape or key_mask.shape != (B, S) or D > 256 or \
            not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"decode_attention: q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)} {k.dtype}, v "
                         f"{tuple(v.shape)} {v.dtype}, key_mask {tuple(key_mask.shape)}; want (B, Hkv, R, D), "
                         "(B, Hkv, S, D) twice, (B, S), D <= 256, one dtype")
    q, k, v, key_mask = q.contiguous(), k.contiguous(), v.contiguous(), key_mask.contiguous()
    out = torch.empty_like(q)
    pow2 = lambda n: max(16, 1 << (n - 1).bit_length())  # noqa: E731  tl.dot wants every side >= 16
    _kernel()[(B * Hkv,)](q, k, v, key_mask, out, Hkv, S, D ** -0.5 * math.log2(math.e),
                          R=R, D=D, BLOCK_R=pow2(R), BLOCK_D=pow2(D), BLOCK_S=block_s,
                          num_warps=num_warps, num_stages=num_stages)
    return out
