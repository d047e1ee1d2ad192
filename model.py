"""
The model, in one file: a pre-norm decoder of the Qwen3 shape (RMSNorm, RoPE, QK-norm, grouped-query
attention, SwiGLU, no biases), weight-for-weight convertible to transformers' Qwen3ForCausalLM
(to_hf_state_dict / from_hf_state_dict; tests/test_model.py checks the logits match).

Read it top to bottom: switches, config + presets, layers, GPT (loss, generation with a KV cache),
conversion to and from the transformers layout.
"""
import functools
import math
import weakref
from dataclasses import dataclass, asdict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.utils.checkpoint import checkpoint

import kernels

# ---------------------------------------------------------------------------------------------
# Module-level switches. train.py / grpo.py / bench.py set them from their config and print them.
ATTENTION = "sdpa"  # "sdpa": torch SDPA (cuDNN backend first on Hopper); "flash": the flash-attn package
PRECISION = "bf16"  # "bf16": bf16 autocast over fp32 master weights; "fp8": FP8 matmuls in the blocks (fp8.py)
RESIDUAL = "autocast"  # the residual stream under autocast: "autocast" (its dtype, bf16, as Megatron; 1.04x, same loss) | "fp32"
DECODE_CUDA_GRAPH = True  # generate() on CUDA replays each decoding step as one CUDA graph
FLEX_PACKED = True  # packed rows (GRPO's shared prompts) in compiled CUDA forwards: flex_attention skips masked tiles; False = SDPA, dense mask
PREFILL_BUCKET = 32  # generate(keep_decoder=True) left-pads prompts to a multiple of this: one prefill CUDA graph per width
DECODE_KERNEL = True  # decoding attention on CUDA through kernels.py's Triton kernel (where triton is installed); False = decode_attend
LOSS_CHUNK_ROWS = 4096  # rows of logits made at once by the loss: 4096 x 50304 fp32 = 0.8 GB, never B x T x V
DSA_IMPL = "mask"  # DSA's selected-key attention: "mask" (selection as a mask for dense SDPA) | "gather" (O(T k))
DSA_CHUNK_ELEMS = 1 << 26  # DSA works on query chunks of at most this many T x S score elements (256 MB in fp32)


# ---------------------------------------------------------------------------------------------
@dataclass
class GPTConfig:
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for fast matmuls
    n_layer: int = 12
    n_embd: int = 768
    n_head: int = 12
    n_kv_head: int = 4  # grouped-query attention: n_head / n_kv_head query heads share one K/V head
    head_dim: int = 64
    mlp_hidden: int = 2112  # SwiGLU hidden size
    block_size: int = 2048  # context length (RoPE tables are built this long)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False  # share the input embedding with the output head (seed 004)
    embed_rank: int = 0  # >0: factorized embeddings V x r then r x d (seed 002 uses r=128)
    dropout: float = 0.0
    logit_softcap: float = 0.0  # >0: logits = c * tanh(logits / c), in the loss too (modded-nanogpt, Gemma 2); 0 = off
    checkpoint_activations: bool = False  # recompute each block in backward: less memory, ~25% more compute
    # DeepSeek Sparse Attention (the DSA section below); dsa_top_k = 0 is plain dense attention, no indexer
    dsa_top_k: int = 0  # keys each query attends to, chosen by the lightning indexer
    dsa_stage: str = "sparse"  # "warmup": dense attention, the indexer learns it | "sparse": top-k attention
    dsa_heads: int = 4  # indexer query heads (DeepSeek: 64 on a 7168-wide model)
    dsa_head_dim: int = 32  # indexer head size (DeepSeek: 128)
    dsa_rope_dim: int = 16  # indexer dims that get RoPE, the first ones (DeepSeek: 64 of 128)
    dsa_loss_weight: float = 1.0  # weight of the indexer's KL loss beside the LM loss


# The seed's table; KV heads = heads / 4, SwiGLU hidden a multiple of 32 near 2.75 x d.
PRESETS = {
    "debug": GPTConfig(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, head_dim=16, mlp_hidden=192, block_size=256),
    "tiny": GPTConfig(n_layer=12, n_embd=512, n_head=8, n_kv_head=2, head_dim=64, mlp_hidden=1408),
    "small": GPTConfig(n_layer=16, n_embd=768, n_head=12, n_kv_head=3, head_dim=64, mlp_hidden=2112),
    "medium": GPTConfig(n_layer=24, n_embd=1024, n_head=16, n_kv_head=4, head_dim=64, mlp_hidden=2816),
    "medium-large": GPTConfig(n_layer=20, n_embd=1152, n_head=16, n_kv_head=4, head_dim=72, mlp_hidden=3168),
    "large": GPTConfig(n_layer=24, n_embd=1536, n_head=16, n_kv_head=4, head_dim=96, mlp_hidden=4224),
}


def make_config(preset, **overrides):
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    bad = set(overrides) - set(GPTConfig.__dataclass_fields__)
    if bad:
        raise ValueError(f"unknown model field(s) {sorted(bad)}; GPTConfig has {sorted(GPTConfig.__dataclass_fields__)}")
    return GPTConfig(**{**asdict(PRESETS[preset]), **overrides})


# ---------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # computed in float32 like Qwen3's RMSNorm, then back to the input dtype
        return (F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)) * self.weight.to(x.dtype)


def rope_tables(head_dim, length, theta):
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)  # the "rotate half" layout of Qwen/Llama
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    # x: (B, T, H, D); cos/sin: (B or 1, T, 1, D)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


@functools.cache  # the device does not change in a process; attend() asks on every call
def _sdpa_backends():
    # On Hopper, cuDNN attention measured 1.6x faster than SDPA's flash backend at head_dim 72 (../shared/README.md)
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
        # zero dims change no score. flash-attn 4.0.0b36's Hopper backward returned wrong gradients at head_dim 72 and
        # 80 and right ones at 64, 96 and 128 (BENCHMARKS.md, "flash-attn 4"): other sizes run padded to the next of those
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


def attend(q, k, v, mask=None, dropout_p=0.0):
    """Causal attention. q: (B, T, H, D); k, v: (B, S, Hkv, D); mask: bool (B, 1, T, S), a BlockMask (packed_mask,
    compiled on CUDA) or None (causal)."""
    if ATTENTION not in ("sdpa", "flash"):
        raise ValueError(f"unknown ATTENTION={ATTENTION!r}; use 'sdpa' or 'flash'")
    if isinstance(mask, BlockMask):  # packed rows, compiled (GPT.hidden): only the tiles the mask reaches are computed
        y = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask, enable_gqa=True)
        return y.transpose(1, 2)
    if ATTENTION == "flash" and mask is None:  # masked (cached, padded) decoding always goes through SDPA
        flash = _load_flash()
        if not q.is_cuda:
            raise RuntimeError("ATTENTION='flash' runs on CUDA only; use ATTENTION='sdpa' on the CPU")
        return flash(q, k, v, dropout_p)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if q.is_cuda and mask is None:
        from torch.nn.attention import sdpa_kernel
        # cuDNN takes GQA as it is: 2.25 ms fwd+bwd at medium-large vs 2.44 with K/V repeated, 3.63 for flash (BENCHMARKS.md)
        with sdpa_kernel(_sdpa_backends(), set_priority=True):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, enable_gqa=True)
    elif mask is not None and q.shape[1] != k.shape[1]:
        # cached decoding: fold each K/V head's group of query heads into the query axis, so no backend needs
        # K/V repeated (the math fallback would copy the whole cache per layer and step)
        B, H, T, D = q.shape
        Hkv, S = k.shape[1], k.shape[2]
        rep = H // Hkv
        decoding = q.is_cuda and T == 1 and dropout_p == 0.0 and k.is_contiguous() and v.is_contiguous()
        if decoding and DECODE_KERNEL and kernels.available():  # Triton: K and V read once, 3.5x decode_attend at GRPO's shape
            return kernels.decode_attention(q.reshape(B, Hkv, rep, D), k, v, mask.expand(B, 1, 1, S)[:, 0, 0]
                                            ).reshape(B, H, T, D).transpose(1, 2)
        mask = mask.expand(B, 1, T, S)[:, :, None].expand(B, 1, rep, T, S).reshape(B, 1, rep * T, S)
        q = q.reshape(B, Hkv, rep * T, D)
        if decoding:
            y = decode_attend(q, k, v, mask).reshape(B, H, T, D)
        else:
            y = _masked_sdpa(q, k, v, mask, dropout_p).reshape(B, H, T, D)
    elif mask is not None:
        y = _masked_sdpa(q, k, v, mask, dropout_p)
    else:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, enable_gqa=True)
    return y.transpose(1, 2)


def decode_attend(q, k, v, mask):
    """One decoding step's attention: q (B, Hkv, R, D) (the group's query heads folded), k, v (B, Hkv, S, D)
    contiguous, mask (B, 1, R, S). Two batched matmuls with float32 scores; the memory-efficient kernel pads the R = 4
    query rows to a 64-row tile and took half of a decoding step's GPU time (BENCHMARKS.md)."""
    B, H, R, D = q.shape
    S = k.shape[2]
    a, b = q.reshape(B * H, R, D), k.reshape(B * H, S, D).transpose(1, 2)
    scores = torch.bmm(a, b, out_dtype=torch.float32) if a.is_cuda and a.dtype != torch.float32 else torch.bmm(a.float(), b.float())
    scores = scores.view(B, H, R, S).mul_(D ** -0.5).masked_fill_(~mask, float("-inf"))
    p = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.bmm(p.view(B * H, R, S), v.reshape(B * H, S, D)).view(B, H, R, D)


def _masked_sdpa(q, k, v, mask, dropout_p):
    """SDPA with a boolean mask. On CUDA the memory-efficient kernel: cuDNN would build a new graph (~1 s) for
    every new cache length, and GRPO's prompt lengths change every step."""
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


# ---------------------------------------------------------------------------------------------
# DeepSeek Sparse Attention (DSA; DeepSeek-V3.2-Exp report, section 2.1), adapted to grouped-query attention.
#
# A small "lightning indexer" per layer scores every visible key s for each query t,
#     I[t, s] = sum_j w[t, j] * ReLU(q[t, j] . k[s]),
# with dsa_heads small query heads q[t, j], one key k[s] shared by them all (MQA style, RoPE on its first
# dsa_rope_dim dims) and per-head weights w[t, j], all projected from the layer's normed input. Every head of
# query t then attends only to the dsa_top_k keys of highest I[t, :]. Rows t < top_k have fewer visible keys
# than top_k and pick masked slots too, so the causal mask is applied again after the selection; top_k >= T
# selects every visible key and is exactly dense attention.
#
# Training, two stages (config/dsa_warmup.py, then config/dsa_sparse.py, each from the previous checkpoint):
#   "warmup": attention stays dense and only the indexer trains (train.py's trainable="indexer"), on
#       L_I = KL(p[t, :] || softmax(I[t, :])), p = the main attention summed over heads and L1-normalised;
#   "sparse": attention uses the selection, everything trains, and L_I is the same KL over the selected keys.
# The indexer reads a detached input and p is detached, so L_I never reaches the main model; top-k indices
# carry no gradient, so the LM loss never reaches the indexer. L_I is averaged over tokens and layers (the
# report sums over tokens): the same minimiser, at a scale that does not grow with the batch.
#
# Cost: the indexer is quadratic too (T x S scores) but narrow (4 x 32 against 16 x 72 at medium-large), and
# it runs in bf16 here where DeepSeek uses FP8. DSA_IMPL picks how the selected keys are attended: "mask" makes
# the selection a boolean mask for SDPA (exact and simple, but it pays for dense attention and more: for
# training at T <= 4k); "gather" gathers each query's k keys and values (O(T k) work and memory). A fused
# kernel that streams the selected rows (as DeepSeek's FlashMLA sparse kernels do) belongs in gather_attend.
class Indexer(nn.Module):
    """The lightning indexer of one layer. Its parameter names all contain "indexer" (train.py freezes by name)."""

    def __init__(self, cfg):
        super().__init__()
        if cfg.dsa_stage not in ("warmup", "sparse"):
            raise ValueError(f"unknown dsa_stage={cfg.dsa_stage!r}; use 'warmup' or 'sparse'")
        if cfg.dsa_rope_dim % 2 or not 0 < cfg.dsa_rope_dim <= cfg.dsa_head_dim:
            raise ValueError(f"dsa_rope_dim={cfg.dsa_rope_dim} must be even and in 2..dsa_head_dim ({cfg.dsa_head_dim})")
        self.heads, self.head_dim, self.rope_dim = cfg.dsa_heads, cfg.dsa_head_dim, cfg.dsa_rope_dim
        self.wq = nn.Linear(cfg.n_embd, cfg.dsa_heads * cfg.dsa_head_dim, bias=False)
        self.wk = nn.Linear(cfg.n_embd, cfg.dsa_head_dim, bias=False)
        self.k_norm = RMSNorm(cfg.dsa_head_dim, cfg.norm_eps)  # the report's indexer normalises its key (LayerNorm)
        self.w = nn.Linear(cfg.n_embd, cfg.dsa_heads, bias=False)

    def forward(self, x, cos, sin):
        """x (B, T, d): the layer's normed input, detached. Returns q (B, T, H_I, D_I), k (B, T, D_I), w (B, T, H_I)."""
        B, T, _ = x.shape
        r = self.rope_dim
        q = self.wq(x).view(B, T, self.heads, self.head_dim)
        k = self.k_norm(self.wk(x)).view(B, T, 1, self.head_dim)
        q = torch.cat([apply_rope(q[..., :r], cos, sin), q[..., r:]], dim=-1)
        k = torch.cat([apply_rope(k[..., :r], cos, sin), k[..., r:]], dim=-1)
        w = self.w(x) * (self.heads * self.head_dim) ** -0.5  # DeepSeek's code: 1/sqrt(H_I) times the 1/sqrt(D_I) scale
        return q, k[:, :, 0], w


def _row_chunks(T, elems_per_row):
    step = max(1, DSA_CHUNK_ELEMS // max(1, elems_per_row))
    return [(t0, min(T, t0 + step)) for t0 in range(0, T, step)]


def _allowed(mask, t0, t1, S, device):
    """Keys that queries t0..t1 may see, (B or 1, t1 - t0, S): causal (no cache: query t is key t) or the cache's mask."""
    if mask is None:
        return torch.arange(S, device=device)[None, None, :] <= torch.arange(t0, t1, device=device)[None, :, None]
    return mask[:, 0, t0:t1]


def _keep(idx, valid, t0, t1, S, device):
    """Keys kept for queries t0..t1: all causal ones (warm-up, idx None) or the selected valid ones."""
    if idx is None:
        return _allowed(None, t0, t1, S, device)
    i = idx[:, t0:t1]
    return torch.zeros(i.shape[:2] + (S,), dtype=torch.bool, device=device).scatter_(-1, i, valid[:, t0:t1])


def index_scores(iq, ik, iw):
    """I[t, s] = sum_j w[t, j] ReLU(q[t, j] . k[s]). iq (B, T, H_I, D_I), ik (B, S, D_I), iw (B, T, H_I) -> (B, T, S) fp32."""
    return torch.einsum("bths,bth->bts", torch.einsum("bthd,bsd->bths", iq, ik).relu(), iw).float()


@torch.no_grad()
def select_topk(iq, ik, iw, top_k, mask=None):
    """Each query's top_k keys by index score among those it may see (mask: None = causal, or the cache's).
    Returns idx (B, T, K) and valid (B, T, K) with K = min(top_k, S); valid is False on the masked slots that a
    row with fewer than K visible keys had to pick: the causal mask again, after the selection."""
    B, T, HI, _ = iq.shape
    S = ik.shape[1]
    idx, valid = [], []
    for t0, t1 in _row_chunks(T, B * HI * S):
        ok = _allowed(mask, t0, t1, S, iq.device).expand(B, -1, -1)
        scores = index_scores(iq[:, t0:t1], ik, iw[:, t0:t1]).masked_fill(~ok, float("-inf"))
        i = scores.topk(min(top_k, S), dim=-1, sorted=False).indices
        idx.append(i)
        valid.append(ok.gather(-1, i))
    return torch.cat(idx, 1), torch.cat(valid, 1)


def masked_attend(q, k, v, keep, dropout_p=0.0):
    """SDPA under a boolean mask keep (B, T, S). K/V heads are repeated to the query heads, so both masked kernels
    can run it (memory-efficient takes no grouped K/V; without a kernel SDPA falls back to its slow math path);
    cuDNN goes first on Hopper: 6.3 ms fwd+bwd against 15.9 at B16 T2048 medium-large (BENCHMARKS.md)."""
    keep = keep | ~keep.any(-1, keepdim=True)  # a query with no visible key (left padding) sees all: finite, never read
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if k.shape[1] != q.shape[1]:
        k, v = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1), v.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    if q.is_cuda:
        from torch.nn.attention import sdpa_kernel
        with sdpa_kernel(_sdpa_backends(), set_priority=True):
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None], dropout_p=dropout_p)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None], dropout_p=dropout_p)
    return y.transpose(1, 2)


def _gather_attend_chunk(q, k, v, idx, valid):
    B, Tc, H, D = q.shape
    S, Hkv, K = k.shape[1], k.shape[2], idx.shape[-1]
    rows = (idx + S * torch.arange(B, device=idx.device)[:, None, None]).reshape(-1)
    ks = k.reshape(B * S, Hkv, D)[rows].view(B, Tc, K, Hkv, D)
    vs = v.reshape(B * S, Hkv, D)[rows].view(B, Tc, K, Hkv, D)
    scores = torch.einsum("btngd,btknd->btngk", q.view(B, Tc, Hkv, H // Hkv, D), ks).float() * D ** -0.5
    scores = scores.masked_fill(~valid[:, :, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a query with no visible key (left padding) gives 0, as SDPA
    return torch.einsum("btngk,btknd->btngd", probs.to(vs.dtype), vs).reshape(B, Tc, H, D)


def gather_attend(q, k, v, idx, valid):
    """Each query over its K selected keys, by gathering them: O(T K) work and memory, in query chunks that are
    recomputed in backward so one chunk's gathered K/V is alive at a time. The place for a fused kernel."""
    B, T, H, D = q.shape
    outs = []
    for t0, t1 in _row_chunks(T, B * idx.shape[-1] * (k.shape[2] * D * 2 + H)):
        args = (q[:, t0:t1], k, v, idx[:, t0:t1], valid[:, t0:t1])
        outs.append(checkpoint(_gather_attend_chunk, *args, use_reentrant=False) if torch.is_grad_enabled()
                    else _gather_attend_chunk(*args))
    return torch.cat(outs, dim=1)


def sparse_attend(q, k, v, idx, valid, dropout_p=0.0):
    """Attention of each query over its selected keys only. q (B, T, H, D); k, v (B, S, Hkv, D); idx, valid (B, T, K)."""
    if DSA_IMPL == "mask":
        B, T, S = q.shape[0], q.shape[1], k.shape[1]
        keep = torch.zeros(B, T, S, dtype=torch.bool, device=q.device).scatter_(-1, idx, valid)
        return masked_attend(q, k, v, keep, dropout_p)
    if DSA_IMPL == "gather":
        if dropout_p:
            raise ValueError("DSA_IMPL='gather' has no attention dropout: set dropout=0.0 or use DSA_IMPL='mask'")
        return gather_attend(q, k, v, idx, valid)
    raise ValueError(f"unknown DSA_IMPL={DSA_IMPL!r}; use 'mask' or 'gather'")


@torch.no_grad()
def attention_probs(q, k, keep):
    """The indexer's target p: the main attention's distribution summed over heads, L1-normalised (= their mean).
    q (B, Tc, H, D), k (B, S, Hkv, D), keep (B or 1, Tc, S) bool -> (B, Tc, S). SDPA never returns it."""
    B, Tc, H, D = q.shape
    Hkv = k.shape[2]
    scores = torch.einsum("btngd,bsnd->btngs", q.view(B, Tc, Hkv, H // Hkv, D), k).float() * D ** -0.5
    return scores.masked_fill(~keep[:, :, None, None], float("-inf")).softmax(dim=-1).mean(dim=(2, 3))


class IndexerKL(torch.autograd.Function):
    """sum over queries t of KL(p[t, :] || softmax(I[t, :])) over the keys each query keeps (all causal ones, or
    the selected ones), with its gradient made in the forward pass a chunk of queries at a time, as
    LinearCrossEntropy does: no pass holds more than one chunk of T x S scores and nothing T x S waits for
    backward. p comes from the main attention's q, k, passed detached; gradients go to iq, ik, iw only."""

    @staticmethod
    def forward(ctx, iq, ik, iw, q, k, idx, valid, want_grad):
        B, T, HI, _ = iq.shape
        S = ik.shape[1]
        ctx.dtypes = (iq.dtype, ik.dtype, iw.dtype)
        with torch.autocast(iq.device.type, enabled=False):  # float32: a KL between sharp distributions
            iq, ik, iw, q, k = iq.float(), ik.float(), iw.float(), q.float(), k.float()
            # out-of-place throughout, like LinearCrossEntropy: slice writes gave zero gradients under torch.compile on CUDA
            loss, grad_q, grad_k, grad_w = 0.0, [], 0.0, []
            for t0, t1 in _row_chunks(T, B * max(HI, q.shape[2]) * S):
                keep = _keep(idx, valid, t0, t1, S, iq.device)
                p = attention_probs(q[:, t0:t1], k, keep)
                dots = torch.einsum("bthd,bsd->bths", iq[:, t0:t1], ik)
                relu = dots.relu()
                scores = torch.einsum("bths,bth->bts", relu, iw[:, t0:t1])
                logq = scores.masked_fill(~keep, float("-inf")).log_softmax(dim=-1)
                loss = loss + (torch.xlogy(p, p) - p * logq.masked_fill(~keep, 0.0)).sum()
                if want_grad:
                    g = logq.exp() - p  # d KL / d I = softmax(I) - p on the kept keys, 0 elsewhere
                    grad_w.append(torch.einsum("bts,bths->bth", g, relu))
                    g = g[:, :, None] * iw[:, t0:t1, :, None] * (dots > 0)  # d KL / d (q . k)
                    grad_q.append(torch.einsum("bths,bsd->bthd", g, ik))
                    grad_k = grad_k + torch.einsum("bths,bthd->bsd", g, iq[:, t0:t1])
        if want_grad:
            ctx.save_for_backward(torch.cat(grad_q, 1), grad_k, torch.cat(grad_w, 1))
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grads = [(g * grad_out).to(dt) for g, dt in zip(ctx.saved_tensors, ctx.dtypes)]
        return *grads, None, None, None, None, None


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        assert cfg.n_head % cfg.n_kv_head == 0, "n_head must be a multiple of n_kv_head"
        self.qkv = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=False)
        self.proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.dropout = cfg.dropout
        self.indexer = Indexer(cfg) if cfg.dsa_top_k else None  # DSA; absent when dense, so dense checkpoints stay as they are
        self.dsa_top_k, self.dsa_stage = cfg.dsa_top_k, cfg.dsa_stage
        self.indexer_loss = None  # L_I of the last forward that asked for it (GPT.losses collects it)

    def project(self, x, cos, sin):
        """q (B, T, H, D), k and v (B, T, Hkv, D), normed and rotated: what attention sees (bench_dsa.py reads it too)."""
        B, T, _ = x.shape
        hq, hkv = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = self.qkv(x).split([hq, hkv, hkv], dim=-1)
        q = self.q_norm(q.view(B, T, self.n_head, self.head_dim))  # QK-norm before RoPE, as Qwen3
        k = self.k_norm(k.view(B, T, self.n_kv_head, self.head_dim))
        v = v.view(B, T, self.n_kv_head, self.head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin, cache=None, layer=0, mask=None, irope=None, indexer_loss=False):
        q, k, v = self.project(x, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        dropout_p = self.dropout if self.training else 0.0
        if self.indexer is None or (self.dsa_stage == "warmup" and not indexer_loss):
            y = attend(q, k, v, mask, dropout_p)
        else:
            y = self.sparse(x, q, k, v, cache, layer, mask, irope, indexer_loss, dropout_p)
        return self.out(y)

    def out(self, y):
        """Attention's output (B, T, H, D) -> the output projection (B, T, d)."""
        return F.dropout(self.proj(y.flatten(2)), self.dropout, self.training)

    def sparse(self, x, q, k, v, cache, layer, mask, irope, indexer_loss, dropout_p):
        """DSA: the indexer, the top-k selection (sparse stage) and the indexer's KL loss (when asked, no cache)."""
        iq, ik, iw = self.indexer(x.detach(), *irope)  # detached input: L_I never reaches the main model
        if cache is not None:
            ik = cache.update_indexer(layer, ik)
        sel = select_topk(iq, ik, iw, self.dsa_top_k, mask) if self.dsa_stage == "sparse" else (None, None)
        if indexer_loss:
            assert cache is None, "the indexer loss is for training forwards, without a KV cache"
            want_grad = torch.is_grad_enabled() and iq.requires_grad
            kl = IndexerKL.apply(iq, ik, iw, q.detach(), k.detach(), *sel, want_grad)  # p from detached q, k
            self.indexer_loss = kl / (x.shape[0] * x.shape[1])
        if sel[0] is None:
            return attend(q, k, v, mask, dropout_p)
        return sparse_attend(q, k, v, *sel, dropout_p)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_up = nn.Linear(cfg.n_embd, 2 * cfg.mlp_hidden, bias=False)  # gate and up fused: one matmul
        self.down = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return F.dropout(self.down(F.silu(gate) * up), self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache=None, layer=0, mask=None, irope=None, indexer_loss=False):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer, mask, irope, indexer_loss)
        return x + self.mlp(self.mlp_norm(x))


# ---------------------------------------------------------------------------------------------
class LinearCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropy of (h @ W.T) against targets, made LOSS_CHUNK_ROWS rows at a time.

    The gradient is computed during the forward pass, chunk by chunk, so neither the forward nor the
    backward ever holds more than one chunk of float32 logits (the full B x T x V would be 6.6 GB at
    16 x 2048 x 50304). Targets < 0 are ignored. softcap > 0: the logits are softcap * tanh(h @ W.T / softcap).
    """

    @staticmethod
    def forward(ctx, h, weight, targets, softcap=0.0):
        # out-of-place on purpose: slice writes into tensors made here came back as zero gradients under
        # torch.compile on CUDA (train.py's grad-norm read 0.000), while the same code was right on the CPU
        loss, grad_h, grad_w = 0.0, [], 0.0
        for i in range(0, h.shape[0], LOSS_CHUNK_ROWS):
            hc, tc = h[i:i + LOSS_CHUNK_ROWS], targets[i:i + LOSS_CHUNK_ROWS]
            logits = (hc @ weight.t()).float()
            if softcap:
                squashed = torch.tanh(logits / softcap)
                logits = softcap * squashed
            valid = (tc >= 0).float()
            lse = torch.logsumexp(logits, dim=-1)
            tgt = tc.clamp(min=0)
            loss = loss + ((lse - logits.gather(1, tgt[:, None]).squeeze(1)) * valid).sum()
            onehot = torch.arange(logits.shape[1], device=h.device)[None, :] == tgt[:, None]  # a compare, not a scatter:
            dlogits = (torch.exp(logits - lse[:, None]) - onehot.float()) * valid[:, None]  # one fused pass
            if softcap:  # through the tanh: d(c tanh(z / c)) / dz = 1 - tanh^2
                dlogits = dlogits * (1 - squashed * squashed)
            dlogits = dlogits.to(h.dtype)
            grad_h.append(dlogits @ weight)
            grad_w = grad_w + (dlogits.t() @ hc).float()
        ctx.save_for_backward(torch.cat(grad_h), grad_w.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None, None


class KVCache:
    """Static K/V buffers for batched decoding. Prompts are left-padded, so every row writes the same slot
    at each step; row b's real tokens start at slot pad[b] and its RoPE position is slot - pad[b]."""

    def __init__(self, cfg, batch_size, max_len, pad, dtype, device):
        # heads before slots: a layer's keys are (B * Hkv, S, D) without a copy, as decode_attend's matmuls want them
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # DSA: the indexer's one key per token, kept like K/V so each new token scores every cached one
        self.ik = torch.zeros((cfg.n_layer, batch_size, max_len, cfg.dsa_head_dim), dtype=dtype, device=device) if cfg.dsa_top_k else None
        self.pad = pad.to(device)
        self.slots = torch.arange(max_len, device=device)
        self.pos = torch.zeros((), dtype=torch.long, device=device)  # next slot, on the device: CUDA graphs replay it
        self.length = 0  # the same count on the host, for bounds checks

    def update(self, layer, k, v):
        """k, v (B, T, Hkv, D) written at the next T slots; returns the layer's whole cache as (B, S, Hkv, D) views."""
        idx = self.pos + self.slots[:k.shape[1]]
        self.k[layer].index_copy_(2, idx, k.transpose(1, 2).to(self.k.dtype))
        self.v[layer].index_copy_(2, idx, v.transpose(1, 2).to(self.v.dtype))
        return self.k[layer].transpose(1, 2), self.v[layer].transpose(1, 2)

    def reset(self, pad):
        """Empty again, for new prompts of the same batch size (generate(keep_decoder=True)): in place, since a
        captured decoding graph reads these very tensors. Old K/V stay in the slots, masked until overwritten."""
        self.pad.copy_(pad)
        self.pos.zero_()
        self.length = 0

    def fill_from(self, other, rows):
        """Slot s < other.length of row b from other's row rows[b] (the distinct prompts' prefill, shared by their
        repeats), a layer at a time: no second copy of the whole cache. The caller advances."""
        n = other.length
        for layer in range(self.k.shape[0]):
            self.k[layer, :, :, :n].copy_(other.k[layer, rows, :, :n])
            self.v[layer, :, :, :n].copy_(other.v[layer, rows, :, :n])
            if self.ik is not None:
                self.ik[layer, :, :n].copy_(other.ik[layer, rows, :n])

    def update_indexer(self, layer, ik):
        self.ik[layer].index_copy_(1, self.pos + self.slots[:ik.shape[1]], ik.to(self.ik.dtype))
        return self.ik[layer]

    def advance(self, T):
        self.pos += T
        self.length += T

    def mask_and_positions(self, T):
        q_slots = self.pos + self.slots[:T]
        keep = (self.slots[None, None, :] <= q_slots[None, :, None]) & (self.slots[None, None, :] >= self.pad[:, None, None])
        positions = (q_slots[None, :] - self.pad[:, None]).clamp(min=0)
        return keep[:, None], positions  # (B, 1, T, S) and (B, T)


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        r = cfg.embed_rank
        self.wte = nn.Embedding(cfg.vocab_size, r or cfg.n_embd)
        self.embed_proj = nn.Linear(r, cfg.n_embd, bias=False) if r else None  # factorized: V x r then r x d
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.head_proj = nn.Linear(cfg.n_embd, r, bias=False) if r else None
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(r or cfg.n_embd, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.head_dim, cfg.block_size, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if cfg.dsa_top_k:  # the DSA indexer's RoPE, over its first dsa_rope_dim dims
            cos, sin = rope_tables(cfg.dsa_rope_dim, cfg.block_size, cfg.rope_theta)
            self.register_buffer("dsa_rope_cos", cos, persistent=False)
            self.register_buffer("dsa_rope_sin", sin, persistent=False)
        self.last_losses = {}  # DSA: {"lm", "indexer"} of the last forward with targets, detached, for logging
        if PRECISION not in ("bf16", "fp8"):
            raise ValueError(f"unknown PRECISION={PRECISION!r}; use 'bf16' or 'fp8'")
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("attn.proj.weight") or name.endswith("mlp.down.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        if PRECISION == "fp8":  # the blocks' matmuls in FP8 (fp8.py); head, embeddings, norms stay high precision
            from fp8 import convert_to_fp8
            convert_to_fp8(self)

    def _apply(self, fn, *args, **kwargs):
        """Keep the RoPE tables in float32 when the model is cast (model.to(torch.bfloat16) for decoding)."""
        super()._apply(fn, *args, **kwargs)
        _KEPT.pop(self, None)  # a kept decoder holds the old tensors
        for name in [n for n, b in self.named_buffers(recurse=False) if n.endswith(("_cos", "_sin"))]:
            setattr(self, name, getattr(self, name).float())
        return self

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # ---- sizes ----
    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def matmul_params(self):
        """Weights that take part in a matmul: every Linear, the output head included (tied or not)."""
        n = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return n + (self.wte.weight.numel() if self.cfg.tie_embeddings else 0)

    def flops_per_token(self, seq_len):
        """PaLM appendix B, as nanoGPT / nanochat / llm.c: 6 N_matmul + 12 L H D T (attention)."""
        c = self.cfg
        return 6 * self.matmul_params() + 12 * c.n_layer * c.n_head * c.head_dim * seq_len

    # ---- forward ----
    def head_weight(self):
        return self.wte.weight if self.lm_head is None else self.lm_head.weight

    def hidden(self, idx, cache=None, indexer_loss=False, layout=None, block_fn=None):
        """Final-norm hidden states (B, T, d) and, for the head, their projection when embeddings are factorized.
        indexer_loss: DSA layers also compute their indexer's KL loss (GPT.losses collects it).
        layout: (segments (B, T), positions (B, T)) of rows packed by the caller (GRPO: one prompt, then each of its
        completions at the positions after it, seeing the prompt and itself; see packed_mask); None = causal rows from
        position 0.
        block_fn: runs each block as block_fn(block, *args) (compiled_hidden's compiled Block.forward); None = block(*args)."""
        B, T = idx.shape
        mask = None
        if cache is not None:
            if cache.length + T > self.cfg.block_size:
                raise ValueError(f"generation would pass the model's context ({self.cfg.block_size} tokens)")
            mask, positions = cache.mask_and_positions(T)
        elif layout is not None:
            if self.cfg.dsa_top_k:
                raise ValueError("DSA layers take causal rows or a KV cache, not a packed layout")
            seg, positions = layout
            # flex_attention's kernel needs torch.compile (block_fn) and CUDA, and takes no dropout
            mask = packed_mask(seg, FLEX_PACKED and block_fn is not None and idx.is_cuda and not (self.training and self.cfg.dropout))
        elif T > self.cfg.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than the model's context ({self.cfg.block_size})")
        if mask is None:
            cos, sin = self.rope_cos[None, :T, None], self.rope_sin[None, :T, None]
        else:
            cos, sin = self.rope_cos[positions][:, :, None], self.rope_sin[positions][:, :, None]
        irope = None
        if self.cfg.dsa_top_k:  # the indexer's RoPE tables at the same positions
            pos = torch.arange(T, device=idx.device)[None] if cache is None else positions
            irope = (self.dsa_rope_cos[pos][:, :, None], self.dsa_rope_sin[pos][:, :, None])
        x = self.wte(idx)
        if self.embed_proj is not None:
            x = self.embed_proj(x)
        x = F.dropout(x, self.cfg.dropout, self.training)
        if RESIDUAL not in ("fp32", "autocast"):
            raise ValueError(f"unknown RESIDUAL={RESIDUAL!r}; use 'fp32' or 'autocast'")
        if RESIDUAL == "autocast" and torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        for i, block in enumerate(self.blocks):
            if block_fn is not None:
                block = functools.partial(block_fn, block)
            if self.cfg.checkpoint_activations and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, None, i, mask, irope, indexer_loss, use_reentrant=False)
            else:
                x = block(x, cos, sin, cache, i, mask, irope, indexer_loss)
        if cache is not None:
            cache.advance(T)
        x = self.norm(x)
        return self.head_proj(x) if self.head_proj is not None else x

    def logits(self, h):
        logits = F.linear(h, self.head_weight()).float()
        c = self.cfg.logit_softcap
        return c * torch.tanh(logits / c) if c else logits

    def forward(self, idx, targets=None, cache=None, block_fn=None):
        """Without targets: float32 logits (B, T, V); with a KVCache (decoding), after its tokens and for the last
        position only, (B, 1, V); block_fn as in hidden() (decoding steps pass decode_block_fn()'s).
        With targets (-1 = ignore): mean cross-entropy.
        With DSA on (dsa_top_k > 0) and targets: in training mode the objective lm + dsa_loss_weight * L_I, in eval
        mode the LM loss alone; self.last_losses holds both, detached."""
        if targets is None:
            h = self.hidden(idx, cache, block_fn=block_fn)
            return self.logits(h if cache is None else h[:, -1:])
        if cache is not None:
            raise ValueError("a KV cache is for decoding: forward(idx, cache=...) without targets")
        lm, indexer = self.losses(idx, targets)
        if indexer is None:
            return lm
        self.last_losses = {"lm": lm.detach(), "indexer": indexer.detach()}
        return lm + self.cfg.dsa_loss_weight * indexer if self.training else lm

    def losses(self, idx, targets):
        """(mean cross-entropy, DSA indexer loss L_I averaged over tokens and layers, or None when DSA is off)."""
        dsa = self.cfg.dsa_top_k > 0
        h = self.hidden(idx, indexer_loss=dsa)
        indexer = None
        if dsa:
            indexer = sum(b.attn.indexer_loss for b in self.blocks) / len(self.blocks)
            for b in self.blocks:
                b.attn.indexer_loss = None
        dt = self._compute_dtype()  # run the head in the autocast dtype, as a Linear would
        h, w = h.to(dt), self.head_weight().to(dt)
        h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
        with torch.autocast(h.device.type, enabled=False):
            loss_sum = LinearCrossEntropy.apply(h, w, targets, self.cfg.logit_softcap)
        return loss_sum / (targets >= 0).sum().clamp(min=1), indexer

    @torch.no_grad()
    def token_stats(self, idx, targets):
        """Per-token loss (nats) and whether argmax hit the target, chunked: for eval of loss/bpb/accuracy."""
        h = self.hidden(idx)
        h = h.reshape(-1, h.shape[-1])
        targets = targets.reshape(-1)
        losses, correct = [], []
        for i in range(0, h.shape[0], LOSS_CHUNK_ROWS):
            logits = self.logits(h[i:i + LOSS_CHUNK_ROWS])
            t = targets[i:i + LOSS_CHUNK_ROWS]
            losses.append(F.cross_entropy(logits, t, reduction="none"))
            correct.append(logits.argmax(-1) == t)
        return torch.cat(losses), torch.cat(correct)

    # ---- generation ----
    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None,
                 generator=None, use_cache=True, compile=False, keep_decoder=False):
        """Batched sampling from prompts of different lengths (a list of lists of token ids).

        Returns (tokens, lengths): tokens (B, max_new_tokens) long, padded with eos_id (or 0) after a
        row stops; lengths (B,) the number of new tokens per row, its EOS included. temperature 0 = greedy.
        compile: the prompt block through compiled_hidden() (eager, its unfused elementwise kernels were three
        quarters of a GRPO prefill's GPU time), and on CUDA the decoding step's blocks as decode_block_fn's compiled
        halves (1.5-1.9x a GRPO rollout; BENCHMARKS.md); decoding steps replay CUDA graphs either way. Compiling
        costs seconds once per process: worth it for many calls (GRPO), not for one (sample.py).
        keep_decoder: keep the KV cache (its slots rounded up to a multiple of 128) and the captured CUDA graphs for
        the next call with as many rows, at most as many slots and the same compile: GRPO's rollouts skip a capture per
        step, and hold the cache between calls (3 GB at batch 1024 and 256 slots, medium-large). The prompts are
        left-padded to a multiple of PREFILL_BUCKET tokens, and on CUDA the prefill of the distinct ones is a CUDA graph
        too, one per (distinct prompts, width): a prefill of 16 short prompts was bound by launching its kernels.
        """
        device = self.rope_cos.device
        B, longest = len(prompts), max(len(p) for p in prompts)
        if min(len(p) for p in prompts) == 0:
            raise ValueError("every prompt needs at least one token")
        if longest + max_new_tokens > self.cfg.block_size:
            raise ValueError(f"a prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the model's context "
                             f"of {self.cfg.block_size}; shorten the prompt or lower max_new_tokens")
        fill = 0 if eos_id is None else eos_id
        width = longest
        if keep_decoder and use_cache:  # a few widths cover every step's prompts: a graph each; the padding is masked
            width = min(-(-longest // PREFILL_BUCKET) * PREFILL_BUCKET, self.cfg.block_size - max_new_tokens)
        idx, pad = left_pad(prompts, fill, device, width)
        out = torch.full((B, max_new_tokens), fill, dtype=torch.long, device=device)
        lengths = torch.full((B,), max_new_tokens, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        seq = idx
        if use_cache:
            slots = width + max_new_tokens
            if keep_decoder:  # a few sizes cover every step's prompts; the Triton kernel skips the unused blocks
                slots = min(-(-slots // 128) * 128, self.cfg.block_size)
            key = (B, slots, self._compute_dtype(), compile)
            kept = _KEPT.get(self) if keep_decoder else None
            if kept and kept[0][0] == B and kept[0][2:] == key[2:] and kept[0][1] >= slots:  # a longer kept cache serves too
                key, cache, decode = kept
                cache.reset(pad)
                if hasattr(decode, "refresh"):
                    decode.refresh()
            else:
                if keep_decoder:
                    _KEPT.pop(self, None)  # one kept decoder per model: free the old one before making another
                cache = KVCache(self.cfg, B, slots, pad, key[2], device)
                decode = self._decoder(cache, B, device, compile)
            if keep_decoder:
                _KEPT[self] = (key, cache, decode)
            graphs = decode if keep_decoder and isinstance(decode, _Graphs) else None
            logits = self._prefill(prompts, idx, cache, compiled_hidden() if compile else GPT.hidden, graphs)
        checksum = torch.zeros((), device=device)  # NaN or inf once any sampled logit is: checked once, after the loop
        for t in range(max_new_tokens):
            if not use_cache:  # a full forward over the (left-padded) sequence each step; for tests and checks
                logits = self.logits(self._hidden_padded(seq, pad)[:, -1])
            elif t > 0:
                logits = decode(nxt[:, None])
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            checksum += logits.gather(1, nxt[:, None]).sum()  # a NaN hidden state makes its row's every logit NaN
            nxt = torch.where(done, torch.full_like(nxt, fill), nxt)
            out[:, t] = nxt
            if eos_id is not None:
                newly = (nxt == eos_id) & ~done
                lengths = torch.where(newly, torch.full_like(lengths, t + 1), lengths)
                done |= newly
                if t % 8 == 7 and bool(done.all()):  # check now and then: each check syncs with the GPU
                    break
            if not use_cache:
                seq = torch.cat([seq, nxt[:, None]], dim=1)
        if not torch.isfinite(checksum):
            raise RuntimeError("generate(): the model's logits are NaN or inf (its weights, or a state they produce)")
        return out, lengths

    def _prefill(self, prompts, idx, cache, hidden, graphs=None):
        """Logits after each row's prompt, its K/V written to the cache. Rows that repeat a prompt (GRPO samples G per
        prompt) share one forward: only the distinct rows run, and their cache rows are copied to the repeats. The
        repeats are found on the host, from the lists (torch.unique on the GPU took ~2 ms and a sync at 256 rows).
        graphs: a kept decoder's _Graphs, which replays that forward and copy as a CUDA graph."""
        distinct, firsts, inv = {}, [], []  # prompt -> its index among the distinct ones; their first rows; each row's
        for r, p in enumerate(prompts):
            j = distinct.setdefault(tuple(p), len(distinct))
            if j == len(firsts):
                firsts.append(r)
            inv.append(j)
        if len(firsts) == len(idx) and graphs is None:
            return self.logits(hidden(self, idx, cache)[:, -1])
        firsts, inv = torch.tensor(firsts, device=idx.device), torch.tensor(inv, device=idx.device)
        if graphs is not None:
            return graphs.prefill(idx[firsts], cache.pad[firsts], inv)
        small = KVCache(self.cfg, len(firsts), idx.shape[1], cache.pad[firsts], cache.k.dtype, idx.device)
        h = hidden(self, idx[firsts], small)[:, -1]
        cache.fill_from(small, inv)
        cache.advance(idx.shape[1])
        return self.logits(h)[inv]

    def _decoder(self, cache, B, device, compile=False):
        """One decoding step, token (B, 1) -> logits (B, V): on CUDA a _Graphs, which replays it as a CUDA graph."""
        if not (DECODE_CUDA_GRAPH and device.type == "cuda") or self.cfg.dsa_top_k:
            return lambda tok: self(tok, cache=cache)[:, -1]
        return _Graphs(self, cache, B, compile)

    def _compute_dtype(self):
        """The dtype activations come out in: autocast's, else the weights' (the RoPE tables stay float32 either way)."""
        device = self.wte.weight.device.type
        return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.wte.weight.dtype

    def _hidden_padded(self, seq, pad):
        cache = KVCache(self.cfg, seq.shape[0], seq.shape[1], pad, self._compute_dtype(), seq.device)
        return self.hidden(seq, cache)

    # ---- optimizer ----
    def configure_optimizer(self, lr, weight_decay, betas, device_type, muon=None):
        """Fused AdamW; weight decay only on matmul weights (not norms, embeddings, biases).
        muon=dict(lr=, momentum=, weight_decay=): [torch.optim.Muon over the blocks' Linear weights, that AdamW over
        the rest] (Muon orthogonalizes 2-D hidden-layer updates; embeddings, head and norms want Adam)."""
        hidden = {id(m.weight) for m in self.blocks.modules() if isinstance(m, nn.Linear)} if muon else set()
        matmul = {id(m.weight) for m in self.modules() if isinstance(m, nn.Linear)}
        trained = [p for p in self.parameters() if p.requires_grad and id(p) not in hidden]
        groups = [{"params": [p for p in trained if id(p) in matmul], "weight_decay": weight_decay},
                  {"params": [p for p in trained if id(p) not in matmul], "weight_decay": 0.0}]
        adamw = torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type == "cuda")
        if not muon:
            return adamw
        muon_params = [p for p in self.parameters() if p.requires_grad and id(p) in hidden]
        return ([torch.optim.Muon(muon_params, **muon)] if muon_params else []) + ([adamw] if trained else [])


_KEPT = weakref.WeakKeyDictionary()  # model -> ((rows, slots, dtype, compile), KVCache, _Graphs or a step): generate(keep_decoder=True)


def _capture(fn, pool=None):
    """fn() recorded as a CUDA graph, after a warm-up run on a side stream (library handles, workspaces, compiling)
    -> (graph, fn's output, which each replay rewrites)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()  # recorded, not run
    return graph, out


class _Graphs:
    """generate()'s CUDA graphs over one KVCache, each captured once and replayed: the decoding step, token (B, 1) ->
    logits (B, V), a step of 980 small kernels (300 compiled) whose launches would cost more than running them, its
    blocks eager or (compile) decode_block_fn's compiled halves; and, for a kept decoder, the prefill of n distinct
    prompts of `width` tokens (prefill()). They read their own copies of the Linear weights in the autocast dtype,
    made here and again by refresh(): autocast's cached casts, which they would read otherwise, are freed when the
    caller's autocast ends (a kept decoder outlives it) and go stale when an optimizer steps."""

    def __init__(self, model, cache, B, compile):
        dt = model._compute_dtype()
        linear = {f"{n}.weight" for n, m in model.named_modules() if type(m) is nn.Linear}  # what autocast would cast
        self.own = {n: p for n, p in model.named_parameters() if n in linear and p.dtype != dt}
        self.copies = {n: p.detach().to(dt) for n, p in self.own.items()}
        self.model, self.cache, self.compile = model, cache, compile
        self.prefills, self.pool = {}, torch.cuda.graph_pool_handle()  # (n, width) -> static inputs, graph, output
        self.tok = torch.zeros(B, 1, dtype=torch.long, device=cache.pos.device)
        block_fn = decode_block_fn() if compile else None
        pos, length = cache.pos.clone(), cache.length
        self.graph, self.logits = _capture(lambda: self._call(self.tok, cache=cache, block_fn=block_fn)[:, -1])
        cache.pos.copy_(pos)  # undo the warm-up step: the replays advance cache.pos on the device, from where it is
        cache.length = length

    def _call(self, *args, **kw):
        return torch.func.functional_call(self.model, self.copies, args, kw)

    def __call__(self, tok):
        self.tok.copy_(tok)
        self.graph.replay()
        self.cache.length += 1
        return self.logits

    def refresh(self):
        """The weight copies made again from the weights as they are now (after an optimizer step)."""
        for n, p in self.own.items():
            self.copies[n].copy_(p.detach())

    def prefill(self, idx, pad, rows):
        """_prefill's forward of the distinct prompts idx (n, width), left-padded by pad (n,), into a cache of their
        own, then row b of the kept cache from distinct row rows[b]: logits (B, V) after each row's prompt. The graphs
        of all widths share one memory pool, so each output is read before another prefill replays."""
        n, width = idx.shape
        if (n, width) not in self.prefills:
            small = KVCache(self.model.cfg, n, width, pad, self.cache.k.dtype, idx.device)
            static = (idx.clone(), small, rows.clone())
            block_fn = compiled_block() if self.compile else None

            def run():
                small.pos.zero_()
                small.length = 0
                logits = self._call(static[0], cache=small, block_fn=block_fn)[:, -1]
                self.cache.fill_from(small, static[2])
                return logits[static[2]]
            self.prefills[n, width] = static + _capture(run, self.pool)
        static_idx, small, static_rows, graph, logits = self.prefills[n, width]
        static_idx.copy_(idx)
        small.pad.copy_(pad)
        static_rows.copy_(rows)
        graph.replay()
        self.cache.advance(width)
        return logits


def left_pad(prompts, fill, device, width=None):
    """Prompts (lists of ids) as one left-padded block, as generate() prefills it: (ids (B, width), pad (B,) cpu);
    width defaults to the longest prompt's length."""
    width = width or max(len(p) for p in prompts)
    pad = torch.tensor([width - len(p) for p in prompts])
    rows = np.full((len(prompts), width), fill, dtype=np.int64)  # numpy: torch.tensor on 1024 lists took 18 ms
    for r, p in enumerate(prompts):
        rows[r, width - len(p):] = p
    return torch.from_numpy(rows).to(device), pad


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
    return BlockMask.from_kv_blocks(*blocks(partial), *blocks(full), BLOCK_SIZE=128, mask_mod=mask_mod, seq_lengths=(T, T))


@functools.cache
def compiled_block():
    """One torch.compile(Block.forward), shared by every model and layer (each passes itself): compiling one block,
    not the 20-layer hidden(), is what makes it quick to compile (BENCHMARKS.md). dynamic: batch and length change
    from call to call."""
    return torch.compile(Block.forward, dynamic=True)


def compiled_hidden():
    """GPT.hidden with each block through compiled_block(): GRPO's log-prob and update forwards and generate()'s
    prefill."""
    return lambda model, idx, cache=None, layout=None: model.hidden(idx, cache, layout=layout, block_fn=compiled_block())


def _attn_in(block, x, cos, sin):
    """A block up to attention: its norm, q/k/v, QK-norm and RoPE (decode_block_fn compiles it as one piece)."""
    return block.attn.project(block.attn_norm(x), cos, sin)


def _attn_out(block, x, y):
    """A block after attention: output projection and residual, then the MLP and its residual."""
    x = x + block.attn.out(y)
    return x + block.mlp(block.mlp_norm(x))


@functools.cache
def decode_block_fn(compiled=True):
    """Block.forward for a decoding step (a block_fn for hidden()) as two halves, each compiled, around the cache
    write and attention, which stay eager: compiled, the write into the cache (a CUDA graph's input) copied whole
    cache layers (BENCHMARKS.md). At GRPO's batch a step is bound by its kernel count: 49 small ones per layer eager
    (norms in float32, RoPE, SwiGLU), 15 this way, 2.1x faster at 256 rows. Dense blocks only (no DSA)."""
    pre, post = (torch.compile(f) if compiled else f for f in (_attn_in, _attn_out))

    def block_fn(block, x, cos, sin, cache, layer, mask, irope=None, indexer_loss=False):
        q, k, v = pre(block, x, cos, sin)
        k, v = cache.update(layer, k, v)
        return post(block, x, attend(q, k, v, mask))
    return block_fn


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token per row from float logits (B, V). temperature 0 = argmax."""
    if temperature == 0:
        return logits.argmax(-1)
    if temperature != 1.0:
        logits = logits / temperature
    probs = torch.softmax(filter_logits(logits, top_k, top_p), dim=-1)
    # torch.multinomial(probs, 1)'s own draw, argmax(probs / E) with E ~ Exp(1), the same tokens from the same
    # generator, without its check that probs are finite, which syncs with the GPU at every step (generate checks once)
    return probs.div_(torch.empty_like(probs).exponential_(generator=generator)).argmax(-1)


def filter_logits(logits, top_k=None, top_p=None):
    """Set to -inf every logit outside the top-k and outside the smallest set with probability >= top_p."""
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop_sorted = probs.cumsum(-1) - probs >= top_p  # keep the token that crosses top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


# ---------------------------------------------------------------------------------------------
# The transformers (Qwen3ForCausalLM) layout: for tests, export (export_hf.py) and import.
def hf_config_dict(cfg):
    if cfg.embed_rank:
        raise ValueError("factorized embeddings (embed_rank > 0) have no Qwen3 equivalent; export refuses them")
    if cfg.dsa_top_k:  # exporting would drop the indexer and silently turn the model dense
        raise ValueError("DSA (dsa_top_k > 0) has no Qwen3 equivalent; export refuses it")
    return dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=cfg.vocab_size,
                hidden_size=cfg.n_embd, intermediate_size=cfg.mlp_hidden, num_hidden_layers=cfg.n_layer,
                num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head, head_dim=cfg.head_dim,
                max_position_embeddings=cfg.block_size, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps,
                tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, hidden_act="silu",
                attention_dropout=0.0, use_sliding_window=False)


def to_hf_state_dict(model):
    c, sd = model.cfg, {}
    hq, hkv = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    sd["model.embed_tokens.weight"] = model.wte.weight
    for i, b in enumerate(model.blocks):
        p = f"model.layers.{i}."
        q, k, v = b.attn.qkv.weight.split([hq, hkv, hkv], dim=0)
        gate, up = b.mlp.gate_up.weight.chunk(2, dim=0)
        sd.update({p + "input_layernorm.weight": b.attn_norm.weight, p + "self_attn.q_proj.weight": q,
                   p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
                   p + "self_attn.o_proj.weight": b.attn.proj.weight, p + "self_attn.q_norm.weight": b.attn.q_norm.weight,
                   p + "self_attn.k_norm.weight": b.attn.k_norm.weight, p + "post_attention_layernorm.weight": b.mlp_norm.weight,
                   p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up, p + "mlp.down_proj.weight": b.mlp.down.weight})
    sd["model.norm.weight"] = model.norm.weight
    sd["lm_head.weight"] = model.head_weight()
    return {k: v.detach().contiguous() for k, v in sd.items()}


def from_hf_state_dict(sd, cfg):
    """Our state_dict from a Qwen3-layout one (the inverse of to_hf_state_dict)."""
    out = {"wte.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"]}
    for i in range(cfg.n_layer):
        p = f"model.layers.{i}."
        g = lambda name: sd[p + name]
        out.update({f"blocks.{i}.attn_norm.weight": g("input_layernorm.weight"),
                    f"blocks.{i}.attn.qkv.weight": torch.cat([g("self_attn.q_proj.weight"), g("self_attn.k_proj.weight"), g("self_attn.v_proj.weight")]),
                    f"blocks.{i}.attn.proj.weight": g("self_attn.o_proj.weight"),
                    f"blocks.{i}.attn.q_norm.weight": g("self_attn.q_norm.weight"),
                    f"blocks.{i}.attn.k_norm.weight": g("self_attn.k_norm.weight"),
                    f"blocks.{i}.mlp_norm.weight": g("post_attention_layernorm.weight"),
                    f"blocks.{i}.mlp.gate_up.weight": torch.cat([g("mlp.gate_proj.weight"), g("mlp.up_proj.weight")]),
                    f"blocks.{i}.mlp.down.weight": g("mlp.down_proj.weight")})
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    return out
