"""
The model, in one file: a pre-norm decoder of the Qwen3 shape (RMSNorm, RoPE, QK-norm, grouped-query
attention, SwiGLU, no biases), weight-for-weight convertible to transformers' Qwen3ForCausalLM
(to_hf_state_dict / from_hf_state_dict; tests/test_model.py checks the logits match).

Read it top to bottom: switches, config + presets, layers, GPT (loss, generation with a KV cache),
conversion to and from the transformers layout.
"""
import math
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# ---------------------------------------------------------------------------------------------
# Module-level switches. train.py / grpo.py / bench.py set them from their config and print them.
ATTENTION = "sdpa"  # "sdpa": torch SDPA (cuDNN backend first on Hopper); "flash": the flash-attn package
PRECISION = "bf16"  # "bf16": bf16 autocast over fp32 master weights; "fp8": FP8 matmuls in the blocks (fp8.py)
LOSS_CHUNK_ROWS = 8192  # rows of logits made at once by the loss: 8192 x 50304 fp32 = 1.6 GB, never B x T x V


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
    checkpoint_activations: bool = False  # recompute each block in backward: less memory, ~25% more compute


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


def _sdpa_backends():
    # On Hopper, cuDNN attention measured 1.6x faster than SDPA's flash backend at head_dim 72 (../shared/README.md)
    from torch.nn.attention import SDPBackend
    order = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9:
        order.insert(0, SDPBackend.CUDNN_ATTENTION)
    return order


_flash_attn_func = None


def _load_flash():
    """flash-attn 4 (flash_attn.cute) or 2/3 (flash_attn); one clear error when neither is installed."""
    global _flash_attn_func
    if _flash_attn_func is None:
        try:
            from flash_attn.cute import flash_attn_func as f  # flash-attn-4
        except ImportError:
            try:
                from flash_attn import flash_attn_func as f
            except ImportError:
                raise RuntimeError("ATTENTION='flash' needs the flash-attn package (pip install flash-attn "
                                   "--no-build-isolation, or flash-attn-4); it is not installed: use ATTENTION='sdpa'")
        _flash_attn_func = f
    return _flash_attn_func


def attend(q, k, v, mask=None, dropout_p=0.0):
    """Causal attention. q: (B, T, H, D); k, v: (B, S, Hkv, D); mask: bool (B, 1, T, S) or None (causal)."""
    if ATTENTION not in ("sdpa", "flash"):
        raise ValueError(f"unknown ATTENTION={ATTENTION!r}; use 'sdpa' or 'flash'")
    if ATTENTION == "flash" and mask is None:  # masked (cached, padded) decoding always goes through SDPA
        flash = _load_flash()
        if not q.is_cuda:
            raise RuntimeError("ATTENTION='flash' runs on CUDA only; use ATTENTION='sdpa' on the CPU")
        out = flash(q, k, v, causal=True)
        return out[0] if isinstance(out, tuple) else out
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if q.is_cuda and mask is None:
        from torch.nn.attention import sdpa_kernel
        if k.shape[1] != q.shape[1]:  # cuDNN's kernel takes no GQA: repeat K/V heads (cheap next to its speed)
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        with sdpa_kernel(_sdpa_backends(), set_priority=True):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           dropout_p=dropout_p, enable_gqa=True)
    return y.transpose(1, 2)


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

    def forward(self, x, cos, sin, cache=None, layer=0, mask=None):
        B, T, _ = x.shape
        hq, hkv = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = self.qkv(x).split([hq, hkv, hkv], dim=-1)
        q = self.q_norm(q.view(B, T, self.n_head, self.head_dim))  # QK-norm before RoPE, as Qwen3
        k = self.k_norm(k.view(B, T, self.n_kv_head, self.head_dim))
        v = v.view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        y = attend(q, k, v, mask, self.dropout if self.training else 0.0)
        return F.dropout(self.proj(y.reshape(B, T, hq)), self.dropout, self.training)


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

    def forward(self, x, cos, sin, cache=None, layer=0, mask=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer, mask)
        return x + self.mlp(self.mlp_norm(x))


# ---------------------------------------------------------------------------------------------
class LinearCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropy of (h @ W.T) against targets, made LOSS_CHUNK_ROWS rows at a time.

    The gradient is computed during the forward pass, chunk by chunk, so neither the forward nor the
    backward ever holds more than one chunk of float32 logits (the full B x T x V would be 6.6 GB at
    16 x 2048 x 50304). Targets < 0 are ignored.
    """

    @staticmethod
    def forward(ctx, h, weight, targets):
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros_like(weight, dtype=torch.float32)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        for i in range(0, h.shape[0], LOSS_CHUNK_ROWS):
            hc, tc = h[i:i + LOSS_CHUNK_ROWS], targets[i:i + LOSS_CHUNK_ROWS]
            logits = (hc @ weight.t()).float()
            valid = (tc >= 0).float()
            lse = torch.logsumexp(logits, dim=-1)
            tgt = tc.clamp(min=0)
            loss += ((lse - logits.gather(1, tgt[:, None]).squeeze(1)) * valid).sum()
            probs = torch.exp(logits - lse[:, None])  # d loss / d logits = softmax - onehot
            probs.scatter_add_(1, tgt[:, None], -torch.ones_like(probs[:, :1]))
            probs = (probs * valid[:, None]).to(h.dtype)
            grad_h[i:i + LOSS_CHUNK_ROWS] = probs @ weight
            grad_w += (probs.t() @ hc).float()
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None


class KVCache:
    """Static K/V buffers for batched decoding. Prompts are left-padded, so every row writes the same slot
    at each step; row b's real tokens start at slot pad[b] and its RoPE position is slot - pad[b]."""

    def __init__(self, cfg, batch_size, max_len, pad, dtype, device):
        shape = (cfg.n_layer, batch_size, max_len, cfg.n_kv_head, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.pad = pad.to(device)
        self.slots = torch.arange(max_len, device=device)
        self.pos = 0  # next slot to write

    def update(self, layer, k, v):
        T = k.shape[1]
        self.k[layer, :, self.pos:self.pos + T] = k
        self.v[layer, :, self.pos:self.pos + T] = v
        return self.k[layer], self.v[layer]

    def mask_and_positions(self, T):
        q_slots = self.slots[self.pos:self.pos + T]
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
        if PRECISION not in ("bf16", "fp8"):
            raise ValueError(f"unknown PRECISION={PRECISION!r}; use 'bf16' or 'fp8'")
        if PRECISION == "fp8":
            raise NotImplementedError("PRECISION='fp8' is not implemented yet; use 'bf16'")
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("attn.proj.weight") or name.endswith("mlp.down.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

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

    def hidden(self, idx, cache=None):
        """Final-norm hidden states (B, T, d) and, for the head, their projection when embeddings are factorized."""
        B, T = idx.shape
        if cache is None:
            if T > self.cfg.block_size:
                raise ValueError(f"sequence of {T} tokens is longer than the model's context ({self.cfg.block_size})")
            cos, sin, mask = self.rope_cos[None, :T, None], self.rope_sin[None, :T, None], None
        else:
            if cache.pos + T > self.cfg.block_size:
                raise ValueError(f"generation would pass the model's context ({self.cfg.block_size} tokens)")
            mask, positions = cache.mask_and_positions(T)
            cos, sin = self.rope_cos[positions][:, :, None], self.rope_sin[positions][:, :, None]
        x = self.wte(idx)
        if self.embed_proj is not None:
            x = self.embed_proj(x)
        x = F.dropout(x, self.cfg.dropout, self.training)
        for i, block in enumerate(self.blocks):
            if self.cfg.checkpoint_activations and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin, cache, i, mask)
        if cache is not None:
            cache.pos += T
        x = self.norm(x)
        return self.head_proj(x) if self.head_proj is not None else x

    def logits(self, h):
        return F.linear(h, self.head_weight()).float()

    def forward(self, idx, targets=None):
        """Without targets: float32 logits (B, T, V). With targets (-1 = ignore): mean cross-entropy."""
        h = self.hidden(idx)
        if targets is None:
            return self.logits(h)
        w = self.head_weight()
        if torch.is_autocast_enabled(h.device.type):  # run the head in the autocast dtype, as a Linear would
            dt = torch.get_autocast_dtype(h.device.type)
            h, w = h.to(dt), w.to(dt)
        h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
        with torch.autocast(h.device.type, enabled=False):
            loss_sum = LinearCrossEntropy.apply(h, w, targets)
        return loss_sum / (targets >= 0).sum().clamp(min=1)

    @torch.no_grad()
    def token_stats(self, idx, targets):
        """Per-token loss (nats) and whether argmax hit the target, chunked: for eval of loss/bpb/accuracy."""
        h = self.hidden(idx).reshape(-1, self.cfg.n_embd if self.head_proj is None else self.cfg.embed_rank)
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
                 generator=None, use_cache=True):
        """Batched sampling from prompts of different lengths (a list of lists of token ids).

        Returns (tokens, lengths): tokens (B, max_new_tokens) long, padded with eos_id (or 0) after a
        row stops; lengths (B,) the number of new tokens per row, its EOS included. temperature 0 = greedy.
        """
        device = self.rope_cos.device
        B, longest = len(prompts), max(len(p) for p in prompts)
        if min(len(p) for p in prompts) == 0:
            raise ValueError("every prompt needs at least one token")
        if longest + max_new_tokens > self.cfg.block_size:
            raise ValueError(f"a prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the model's context "
                             f"of {self.cfg.block_size}; shorten the prompt or lower max_new_tokens")
        pad = torch.tensor([longest - len(p) for p in prompts])
        fill = 0 if eos_id is None else eos_id
        idx = torch.tensor([[fill] * (longest - len(p)) + list(p) for p in prompts], device=device)
        out = torch.full((B, max_new_tokens), fill, dtype=torch.long, device=device)
        lengths = torch.full((B,), max_new_tokens, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        dtype = self.rope_cos.dtype if not torch.is_autocast_enabled(device.type) else torch.get_autocast_dtype(device.type)
        cache = KVCache(self.cfg, B, longest + max_new_tokens, pad, dtype, device) if use_cache else None
        seq, step_in = idx, idx
        for t in range(max_new_tokens):
            if cache is not None:
                h = self.hidden(step_in, cache)[:, -1]
            else:  # no cache: full forward over the (left-padded) sequence each step; for tests and checks
                h = self._hidden_padded(seq, pad)[:, -1]
            nxt = sample_next(self.logits(h), temperature, top_k, top_p, generator)
            nxt = torch.where(done, torch.full_like(nxt, fill), nxt)
            out[:, t] = nxt
            if eos_id is not None:
                newly = (nxt == eos_id) & ~done
                lengths = torch.where(newly, torch.full_like(lengths, t + 1), lengths)
                done |= newly
                if t % 8 == 7 and bool(done.all()):  # check now and then: each check syncs with the GPU
                    break
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            step_in = nxt[:, None]
        return out, lengths

    def _hidden_padded(self, seq, pad):
        cache = KVCache(self.cfg, seq.shape[0], seq.shape[1], pad, self.rope_cos.dtype, seq.device)
        return self.hidden(seq, cache)

    # ---- optimizer ----
    def configure_optimizer(self, lr, weight_decay, betas, device_type):
        """Fused AdamW; weight decay only on matmul weights (not norms, embeddings, biases)."""
        matmul = {id(m.weight) for m in self.modules() if isinstance(m, nn.Linear)}
        decay = [p for p in self.parameters() if id(p) in matmul and p.requires_grad]
        no_decay = [p for p in self.parameters() if id(p) not in matmul and p.requires_grad]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type == "cuda")


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token per row from float logits (B, V). temperature 0 = argmax."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = filter_logits(logits / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def filter_logits(logits, top_k=None, top_p=None):
    """Set to -inf every logit outside the top-k and outside the smallest set with probability >= top_p."""
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop_sorted = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the token that crosses top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


# ---------------------------------------------------------------------------------------------
# The transformers (Qwen3ForCausalLM) layout: for tests, export (export_hf.py) and import.
def hf_config_dict(cfg):
    if cfg.embed_rank:
        raise ValueError("factorized embeddings (embed_rank > 0) have no Qwen3 equivalent; export refuses them")
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
