"""
Attention, in one place: attend() (training, prefill and decoding), its backends and the decoding kernel.

attend() runs torch SDPA (cuDNN first on Hopper) or, with ATTENTION = "flash", the flash-attn package; masked
calls (a KV cache, packed rows) always go through SDPA or flex_attention. A decoding step on CUDA runs the Triton
kernel below where triton is installed, else decode_attend's two batched matmuls. The kernel: one program per
(batch row, KV head) reads that head's K and V once, in blocks of BLOCK_S slots, with an online softmax in float32;
blocks with no visible slot (left padding, a kept cache's unused tail) are not read.
"""
import contextlib
import functools
import importlib
import math

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

ATTENTION = "sdpa"  # "sdpa": torch SDPA (cuDNN first on Hopper) | "flash": the flash-attn package; scripts set it


def attend(q, k, v, mask=None, dropout_p=0.0):
    """Causal attention. q: (B, T, H, D); k, v: (B, S, Hkv, D); mask: bool (B, 1, T, S), a BlockMask (packed_mask,
    compiled on CUDA) or None (causal)."""
    if ATTENTION not in ("sdpa", "flash"):
        raise ValueError(f"unknown ATTENTION={ATTENTION!r}; use 'sdpa' or 'flash'")
    if isinstance(mask, BlockMask):  # packed rows, compiled: only the tiles the mask reaches are computed
        y = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask, enable_gqa=True)
        return y.transpose(1, 2)
    if ATTENTION == "flash" and mask is None:  # masked (cached, padded) attention always goes through SDPA
        flash = _load_flash()
        if not q.is_cuda:
            raise RuntimeError("ATTENTION='flash' runs on CUDA only; use ATTENTION='sdpa' on the CPU")
        return flash(q, k, v, dropout_p)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if mask is None:
        with _sdpa_priority(q):  # cuDNN takes grouped K/V as they are, no repeat
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, enable_gqa=True)
    elif q.shape[1] != k.shape[1]:
        y = _grouped_masked(q, k, v, mask, dropout_p)
    else:
        y = _masked_sdpa(q, k, v, mask, dropout_p)
    return y.transpose(1, 2)


def _grouped_masked(q, k, v, mask, dropout_p):
    """Masked grouped-query attention, (B, H, T, D) layout: each K/V head's query heads are folded into the query
    axis, so no backend needs K/V repeated (the math fallback would copy the whole cache per layer and step)."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    rep = H // Hkv
    decoding = q.is_cuda and T == 1 and dropout_p == 0.0 and k.is_contiguous() and v.is_contiguous()
    if decoding and available():  # the Triton kernel: K and V read once
        return decode_attention(q.reshape(B, Hkv, rep, D), k, v, mask.expand(B, 1, 1, S)[:, 0, 0]).reshape(B, H, T, D)
    mask = mask.expand(B, 1, T, S)[:, :, None].expand(B, 1, rep, T, S).reshape(B, 1, rep * T, S)
    q = q.reshape(B, Hkv, rep * T, D)
    if decoding:
        return decode_attend(q, k, v, mask).reshape(B, H, T, D)
    return _masked_sdpa(q, k, v, mask, dropout_p).reshape(B, H, T, D)


def decode_attend(q, k, v, mask):
    """One decoding step's attention without Triton: q (B, Hkv, R, D) (the group's query heads folded), k, v
    (B, Hkv, S, D) contiguous, mask (B, 1, R, S). Two batched matmuls with float32 scores: the memory-efficient
    kernel would pad the R query rows to a 64-row tile."""
    B, H, R, D = q.shape
    S = k.shape[2]
    a, b = q.reshape(B * H, R, D), k.reshape(B * H, S, D).transpose(1, 2)
    if a.is_cuda and a.dtype != torch.float32:
        scores = torch.bmm(a, b, out_dtype=torch.float32)
    else:
        scores = torch.bmm(a.float(), b.float())
    scores = scores.view(B, H, R, S).mul_(D ** -0.5).masked_fill_(~mask, float("-inf"))
    p = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.bmm(p.view(B * H, R, S), v.reshape(B * H, S, D)).view(B, H, R, D)


def _masked_sdpa(q, k, v, mask, dropout_p):
    """SDPA with a boolean mask. On CUDA the memory-efficient kernel: cuDNN would build a new graph for every new
    cache length, and GRPO's prompt lengths change every step."""
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def _sdpa_priority(q):
    """SDPA's backends in our order on CUDA (a no-op context on the CPU)."""
    if not q.is_cuda:
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel
    return sdpa_kernel(_sdpa_backends(), set_priority=True)


@functools.cache  # the device does not change in a process; attend() asks on every call
def _sdpa_backends():
    # on Hopper cuDNN attention is the fastest backend at our head sizes (BENCHMARKS.md)
    from torch.nn.attention import SDPBackend
    order = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9:
        order.insert(0, SDPBackend.CUDNN_ATTENTION)
    return order


@functools.cache
def _fa4_causal():
    """flash-attn 4's causal attention as two torch.library custom ops: torch.compile keeps the whole model in
    one graph around them (its own autograd.Function would break the graph at every layer)."""
    from flash_attn.cute.interface import _flash_attn_bwd, _flash_attn_fwd

    @torch.library.custom_op("nanollm::fa4_fwd", mutates_args=())
    def fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = _flash_attn_fwd(q, k, v, softmax_scale=scale, causal=True, return_lse=True)[:2]
        return out, lse

    @fwd.register_fake
    def _(q, k, v, scale):
        B, T, H, _ = q.shape
        return q.new_empty(B, T, H, v.shape[-1]), q.new_empty(B, H, T, dtype=torch.float32)

    @torch.library.custom_op("nanollm::fa4_bwd", mutates_args=())
    def bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
            lse: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dq, dk, dv = _flash_attn_bwd(q, k, v, out, dout, lse, softmax_scale=scale, causal=True)[:3]
        return dq, dk, dv

    @bwd.register_fake
    def _(dout, q, k, v, out, lse, scale):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def save(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:3], *output)
        ctx.scale = inputs[3]

    def backward(ctx, dout, dlse):  # the lse output is internal: nothing flows into it
        q, k, v, out, lse = ctx.saved_tensors
        return *bwd(dout.contiguous(), q, k, v, out, lse, ctx.scale), None

    fwd.register_autograd(backward, setup_context=save)

    def causal(q, k, v):
        D = q.shape[-1]
        # zero dims change no score: flash-attn 4's Hopper backward is right at head_dim 64, 96 and 128 only
        # (BENCHMARKS.md, "flash-attn 4"), so other sizes run padded to the next of those
        pad = next((p for p in (64, 96, 128) if p >= D), D) - D
        if pad:
            q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
        out = fwd(q.contiguous(), k.contiguous(), v.contiguous(), D ** -0.5)[0]
        return out[..., :D] if pad else out
    return causal


@functools.cache
def _load_flash():
    """Causal attention (q, k, v, dropout_p) -> out, (B, T, H, D) layout, from flash-attn 4 (flash_attn.cute) or 2/3
    (flash_attn); one clear error when neither is installed."""
    try:
        fa4 = _fa4_causal()

        def flash(q, k, v, dropout_p):
            if dropout_p > 0:
                raise RuntimeError("flash-attn 4 has no attention dropout: set dropout=0.0 or use ATTENTION='sdpa'")
            return fa4(q, k, v)
        return flash
    except ImportError:
        pass
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        raise RuntimeError("ATTENTION='flash' needs the flash-attn package (pip install flash-attn-4, or flash-attn "
                           "--no-build-isolation); it is not installed: use ATTENTION='sdpa'") from None
    return lambda q, k, v, dropout_p: flash_attn_func(q, k, v, dropout_p=dropout_p, causal=True)


def packed_mask(seg, flex=False):
    """The attention mask of packed rows, from seg (B, T): 0 = the row's shared prefix (a prompt), k > 0 = its k-th
    continuation (a completion), -1 = padding. Query t sees key s <= t in the prefix or in its own segment.
    -> bool (B, 1, T, T) for SDPA, or with flex a BlockMask over 128 x 128 tiles: tiles the mask leaves empty are
    skipped, full ones run without it (built from the dense mask with a few tensor ops: create_block_mask's vmap
    cost more host time than the kernels it saved)."""
    B, T = seg.shape

    def mask_mod(b, h, q, kv):
        return (kv <= q) & ((seg[b, kv] == 0) | (seg[b, kv] == seg[b, q]))
    j = torch.arange(T, device=seg.device)
    dense = mask_mod(torch.arange(B, device=seg.device)[:, None, None], 0, j[None, :, None], j[None, None, :])
    if not flex:
        return dense[:, None]
    n = -(-T // 128)
    tiles = F.pad(dense, (0, n * 128 - T, 0, n * 128 - T)).view(B, n, 128, n, 128)
    full = tiles.all(4).all(2)  # (B, n, n): every (query, key) pair allowed
    partial = tiles.any(4).any(2) & ~full

    def blocks(m):  # (B, n, n) -> counts (B, 1, n) and key-tile indexes (B, 1, n, n), the marked tiles first, in order
        return (m.sum(-1, dtype=torch.int32)[:, None],
                m.to(torch.int8).argsort(dim=-1, descending=True, stable=True).to(torch.int32)[:, None])
    return BlockMask.from_kv_blocks(*blocks(partial), *blocks(full), BLOCK_SIZE=128, mask_mod=mask_mod,
                                    seq_lengths=(T, T))


# ---- the Triton decoding kernel ----
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
            if tl.max(keep.to(tl.int32), 0) > 0:  # skip blocks nobody may see (left padding, unused tail)
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
