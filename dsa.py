"""
DeepSeek Sparse Attention (DSA; DeepSeek-V3.2-Exp report, section 2.1), adapted to grouped-query attention: an
opt-in on model.py's dense model. GPT builds SparseBlock layers when cfg.dsa_top_k > 0; dense models never import
this file, and their checkpoints load into a DSA model with a fresh indexer.

A small "lightning indexer" per layer scores every visible key s for each query t,
    I[t, s] = sum_j w[t, j] * ReLU(q[t, j] . k[s]),
with dsa_heads small query heads q[t, j], one key k[s] shared by them all (MQA style, RoPE on its first
dsa_rope_dim dims) and per-head weights w[t, j], all projected from the layer's normed input. Every head of
query t then attends only to the dsa_top_k keys of highest I[t, :]. Rows t < top_k have fewer visible keys
than top_k and pick masked slots too, so the causal mask is applied again after the selection; top_k >= T
selects every visible key and is exactly dense attention.

Training, two stages (config/dsa_warmup.py, then config/dsa_sparse.py, each from the previous checkpoint):
  "warmup": attention stays dense and only the indexer trains (train.py's trainable="indexer"), on
      L_I = KL(p[t, :] || softmax(I[t, :])), p = the main attention summed over heads and L1-normalised;
  "sparse": attention uses the selection, everything trains, and L_I is the same KL over the selected keys.
The indexer reads a detached input and p is detached, so L_I never reaches the main model; top-k indices
carry no gradient, so the LM loss never reaches the indexer. L_I is averaged over tokens and layers (the
report sums over tokens): the same minimiser, at a scale that does not grow with the batch.

Cost: the indexer is quadratic too (T x S scores) but narrow (4 x 32 against 16 x 72 at medium-large), and
it runs in bf16 here where DeepSeek uses FP8. SparseAttention.impl picks how the selected keys are attended:
"mask" makes the selection a boolean mask for SDPA (exact and simple, but it pays for dense attention and more:
for training at T <= 4k); "gather" gathers each query's k keys and values (O(T k) work and memory). A fused
kernel that streams the selected rows (as DeepSeek's FlashMLA sparse kernels do) belongs in gather_attend.
"""
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import attention as A
from model import Attention, Block, RMSNorm, apply_rope

CHUNK_ELEMS = 1 << 26  # query chunks of at most this many T x S score elements: bounds the indexer's memory


class Indexer(nn.Module):
    """The lightning indexer of one layer. Its parameter names all contain "indexer" (train.py freezes by name)."""

    def __init__(self, cfg):
        super().__init__()
        if cfg.dsa_stage not in ("warmup", "sparse"):
            raise ValueError(f"unknown dsa_stage={cfg.dsa_stage!r}; use 'warmup' or 'sparse'")
        if cfg.dsa_rope_dim % 2 or not 0 < cfg.dsa_rope_dim <= cfg.dsa_head_dim:
            raise ValueError(f"dsa_rope_dim={cfg.dsa_rope_dim} must be even and in 2..dsa_head_dim "
                             f"({cfg.dsa_head_dim})")
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
    step = max(1, CHUNK_ELEMS // max(1, elems_per_row))
    return [(t0, min(T, t0 + step)) for t0 in range(0, T, step)]


def _allowed(mask, t0, t1, S, device):
    """Keys that queries t0..t1 may see, (B or 1, t1 - t0, S): causal (no cache: query t is key t) or the cache's
    mask."""
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
    """I[t, s] = sum_j w[t, j] ReLU(q[t, j] . k[s]). iq (B, T, H_I, D_I), ik (B, S, D_I), iw (B, T, H_I)
    -> (B, T, S) fp32."""
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
    cuDNN goes first on Hopper, the fastest masked kernel at training's shape (BENCHMARKS.md)."""
    keep = keep | ~keep.any(-1, keepdim=True)  # a query with no visible key (left padding) sees all: finite, never read
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    with A._sdpa_priority(q):
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None], dropout_p=dropout_p)
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


def sparse_attend(q, k, v, idx, valid, dropout_p=0.0, impl="mask"):
    """Attention of each query over its selected keys only. q (B, T, H, D); k, v (B, S, Hkv, D); idx, valid
    (B, T, K); impl "mask" or "gather" (the module docstring says which is for what)."""
    if impl == "mask":
        B, T, S = q.shape[0], q.shape[1], k.shape[1]
        keep = torch.zeros(B, T, S, dtype=torch.bool, device=q.device).scatter_(-1, idx, valid)
        return masked_attend(q, k, v, keep, dropout_p)
    if impl == "gather":
        if dropout_p:
            raise ValueError("DSA impl 'gather' has no attention dropout: set dropout=0.0 or use impl 'mask'")
        return gather_attend(q, k, v, idx, valid)
    raise ValueError(f"unknown DSA impl {impl!r}; use 'mask' or 'gather'")


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
            # out-of-place, like LinearCrossEntropy: slice writes gave zero gradients under torch.compile on CUDA
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


class SparseAttention(Attention):
    """Attention with the layer's indexer: top-k attention (sparse stage) and the indexer's KL loss."""
    impl = "mask"  # sparse_attend's impl; tests and dev/bench_dsa.py set it per layer

    def __init__(self, cfg):
        super().__init__(cfg)
        self.indexer = Indexer(cfg)
        self.top_k, self.stage = cfg.dsa_top_k, cfg.dsa_stage
        self.indexer_loss = None  # L_I of the last forward that asked for it (GPT.losses collects it)

    def forward(self, x, cos, sin, cache=None, layer=0, mask=None, irope=None, indexer_loss=False):
        q, k, v = self.project(x, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        dropout_p = self.dropout if self.training else 0.0
        if self.stage == "warmup" and not indexer_loss:
            return self.out(A.attend(q, k, v, mask, dropout_p))
        iq, ik, iw = self.indexer(x.detach(), *irope)  # detached input: L_I never reaches the main model
        if cache is not None:
            ik = cache.update_indexer(layer, ik)
        sel = select_topk(iq, ik, iw, self.top_k, mask) if self.stage == "sparse" else (None, None)
        if indexer_loss:
            assert cache is None, "the indexer loss is for training forwards, without a KV cache"
            want_grad = torch.is_grad_enabled() and iq.requires_grad
            kl = IndexerKL.apply(iq, ik, iw, q.detach(), k.detach(), *sel, want_grad)  # p from detached q, k
            self.indexer_loss = kl / (x.shape[0] * x.shape[1])
        if sel[0] is None:
            return self.out(A.attend(q, k, v, mask, dropout_p))
        return self.out(sparse_attend(q, k, v, *sel, dropout_p, self.impl))


class SparseBlock(Block):
    """A Block whose attention is SparseAttention: Block.forward passes on its extra arguments, the indexer's RoPE
    and the loss flag."""
    attention = SparseAttention


def indexer_loss(model):
    """L_I of the last forward, averaged over layers, and each layer's cleared."""
    loss = sum(b.attn.indexer_loss for b in model.blocks) / len(model.blocks)
    for b in model.blocks:
        b.attn.indexer_loss = None
    return loss
