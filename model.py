"""
The model, in one file: a pre-norm decoder of the Qwen3 shape (RMSNorm, RoPE, QK-norm, grouped-query
attention, SwiGLU, no biases), weight-for-weight convertible to transformers' Qwen3ForCausalLM
(to_hf_state_dict / from_hf_state_dict; tests/test_model.py checks the logits match).

Read it top to bottom: config + presets, layers, GPT (forward, loss, optimizer), conversion to and from the
transformers layout. Attention kernels live in attention.py, generation in engine.py, DeepSeek Sparse Attention in
dsa.py (built when cfg.dsa_top_k > 0), FP8 matmuls in fp8.py (train.py applies them).
"""
import functools
import math
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from attention import attend, packed_mask

RESIDUAL = "autocast"  # the residual stream's dtype: "autocast" (bf16, as Megatron) | "fp32"; train.py sets it
LOSS_CHUNK_ROWS = 4096  # rows of logits the loss makes at once (4096 x V float32), never B x T x V


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
    tie_embeddings: bool = False  # share the input embedding with the output head
    embed_rank: int = 0  # >0: factorized embeddings V x r then r x d
    dropout: float = 0.0
    logit_softcap: float = 0.0  # >0: logits = c * tanh(logits / c), in the loss too (as modded-nanogpt); 0 = off
    checkpoint_activations: bool = False  # recompute each block in backward: less memory, ~25% more compute
    # DeepSeek Sparse Attention (dsa.py); dsa_top_k = 0 is plain dense attention, no indexer
    dsa_top_k: int = 0  # keys each query attends to, chosen by the lightning indexer
    dsa_stage: str = "sparse"  # "warmup": dense attention, the indexer learns it | "sparse": top-k attention
    dsa_heads: int = 4  # indexer query heads (DeepSeek: 64 on a 7168-wide model)
    dsa_head_dim: int = 32  # indexer head size (DeepSeek: 128)
    dsa_rope_dim: int = 16  # indexer dims that get RoPE, the first ones (DeepSeek: 64 of 128)
    dsa_loss_weight: float = 1.0  # weight of the indexer's KL loss beside the LM loss


# KV heads = heads / 4, SwiGLU hidden a multiple of 32 near 2.75 x d.
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
        raise ValueError(f"unknown model field(s) {sorted(bad)}; "
                         f"GPTConfig has {sorted(GPTConfig.__dataclass_fields__)}")
    cfg = GPTConfig(**{**asdict(PRESETS[preset]), **overrides})
    if cfg.n_head % cfg.n_kv_head or cfg.head_dim % 2:  # grouped queries share K/V heads; RoPE rotates pairs
        raise ValueError(f"n_head ({cfg.n_head}) must be a multiple of n_kv_head ({cfg.n_kv_head}) and head_dim "
                         f"({cfg.head_dim}) even")
    return cfg


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


def rope_at(cos, sin, T, positions=None):
    """Tables (L, D) at positions (B, T) as (B, T, 1, D), or at 0..T-1 as (1, T, 1, D) when positions is None."""
    if positions is None:
        return cos[None, :T, None], sin[None, :T, None]
    return cos[positions][:, :, None], sin[positions][:, :, None]


def apply_rope(x, cos, sin):
    # x: (B, T, H, D); cos/sin: (B or 1, T, 1, D)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


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

    def project(self, x, cos, sin):
        """q (B, T, H, D), k and v (B, T, Hkv, D), normed and rotated: what attention sees."""
        B, T, _ = x.shape
        hq, hkv = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = self.qkv(x).split([hq, hkv, hkv], dim=-1)
        q = self.q_norm(q.view(B, T, self.n_head, self.head_dim))  # QK-norm before RoPE, as Qwen3
        k = self.k_norm(k.view(B, T, self.n_kv_head, self.head_dim))
        v = v.view(B, T, self.n_kv_head, self.head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin, cache=None, layer=0, mask=None):
        q, k, v = self.project(x, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        return self.out(attend(q, k, v, mask, self.dropout if self.training else 0.0))

    def out(self, y):
        """Attention's output (B, T, H, D) -> the output projection (B, T, d)."""
        return F.dropout(self.proj(y.flatten(2)), self.dropout, self.training)


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
    attention = Attention  # dsa.SparseBlock puts its SparseAttention here

    def __init__(self, cfg):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = self.attention(cfg)
        self.mlp_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache=None, layer=0, mask=None, *extra):  # extra: dsa.SparseAttention's arguments
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer, mask, *extra)
        return x + self.mlp(self.mlp_norm(x))


# ---------------------------------------------------------------------------------------------
class LinearCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropy of (h @ W.T) against targets (< 0: ignored), made chunk_rows rows at a time, its gradient
    made in the forward pass chunk by chunk: no pass holds more than one chunk of float32 logits, never B x T x V.
    softcap > 0: the logits are softcap * tanh(h @ W.T / softcap)."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_rows=None, softcap=0.0):
        # out-of-place on purpose: slice writes into tensors made here came back as zero gradients under
        # torch.compile on CUDA (train.py's grad-norm read 0.000), while the same code was right on the CPU
        n = chunk_rows or LOSS_CHUNK_ROWS
        loss, grad_h, grad_w = 0.0, [], 0.0
        for i in range(0, h.shape[0], n):
            hc, tc = h[i:i + n], targets[i:i + n]
            logits = (hc @ weight.t()).float()
            if softcap:
                squashed = torch.tanh(logits / softcap)
                logits = softcap * squashed
            valid = (tc >= 0).float()
            lse = torch.logsumexp(logits, dim=-1)
            tgt = tc.clamp(min=0)
            loss = loss + ((lse - logits.gather(1, tgt[:, None]).squeeze(1)) * valid).sum()
            # the one-hot as a compare, not a scatter: one fused pass
            onehot = torch.arange(logits.shape[1], device=h.device)[None, :] == tgt[:, None]
            dlogits = (torch.exp(logits - lse[:, None]) - onehot.float()) * valid[:, None]
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
        return grad_h * grad_out, grad_w * grad_out, None, None, None


def linear_cross_entropy(h, weight, targets, softcap=0.0):
    """LinearCrossEntropy as a function, which torch.compile takes (compile_regions)."""
    return LinearCrossEntropy.apply(h, weight, targets, None, softcap)


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        r = cfg.embed_rank
        block = Block
        if cfg.dsa_top_k:  # DeepSeek Sparse Attention: imported only here, so dense models never load it
            import dsa
            block = dsa.SparseBlock
        self.wte = nn.Embedding(cfg.vocab_size, r or cfg.n_embd)
        self.embed_proj = nn.Linear(r, cfg.n_embd, bias=False) if r else None  # factorized: V x r then r x d
        self.blocks = nn.ModuleList(block(cfg) for _ in range(cfg.n_layer))
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
        self.loss_fn = linear_cross_entropy  # compile_regions puts its compiled version here
        self.last_losses = {}  # DSA: {"lm", "indexer"} of the last forward with targets, detached, for logging
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("attn.proj.weight") or name.endswith("mlp.down.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def _apply(self, fn, *args, **kwargs):
        """Keep the RoPE tables in float32 when the model is cast (model.to(torch.bfloat16) for decoding)."""
        super()._apply(fn, *args, **kwargs)
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

    def hidden(self, idx, cache=None, layout=None, block_fn=None, indexer_loss=False):
        """Final-norm hidden states (B, T, d) and, for the head, their projection when embeddings are factorized.
        cache: an engine.KVCache to decode with (its mask and positions; the new K/V are written to it).
        layout: (segments (B, T), positions (B, T)) of rows packed by the caller (GRPO: one prompt, then each of its
        completions at the positions after it, seeing the prompt and itself; see attention.packed_mask); None = causal
        rows from position 0.
        block_fn: runs each block as block_fn(block, *args) (compiled_block, engine's decoding halves).
        indexer_loss: DSA models also compute their indexers' KL loss (GPT.losses collects it)."""
        B, T = idx.shape
        mask = positions = None
        if cache is not None:
            if cache.length + T > self.cfg.block_size:
                raise ValueError(f"generation would pass the model's context ({self.cfg.block_size} tokens)")
            mask, positions = cache.mask_and_positions(T)
        elif layout is not None:
            if self.cfg.dsa_top_k:
                raise ValueError("DSA layers take causal rows or a KV cache, not a packed layout")
            seg, positions = layout
            # flex_attention's kernel needs torch.compile (block_fn) and CUDA, and takes no dropout
            mask = packed_mask(seg, block_fn is not None and idx.is_cuda and not (self.training and self.cfg.dropout))
        elif T > self.cfg.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than the model's context ({self.cfg.block_size})")
        cos, sin = rope_at(self.rope_cos, self.rope_sin, T, positions)
        extra = ()
        if self.cfg.dsa_top_k:  # a SparseBlock's extra arguments: the indexer's RoPE at the same positions, the flag
            extra = (rope_at(self.dsa_rope_cos, self.dsa_rope_sin, T, positions), indexer_loss)
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
                x = checkpoint(block, x, cos, sin, None, i, mask, *extra, use_reentrant=False)
            else:
                x = block(x, cos, sin, cache, i, mask, *extra)
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
        position only, (B, 1, V); block_fn as in hidden().
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
            import dsa as sparse
            indexer = sparse.indexer_loss(self)
        dt = self._compute_dtype()  # run the head in the autocast dtype, as a Linear would
        h, w = h.to(dt), self.head_weight().to(dt)
        h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
        with torch.autocast(h.device.type, enabled=False):
            loss_sum = self.loss_fn(h, w, targets, self.cfg.logit_softcap)
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

    def _compute_dtype(self):
        """The dtype activations come out in: autocast's, else the weights' (the RoPE tables stay float32)."""
        device = self.wte.weight.device.type
        return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.wte.weight.dtype

    def generate(self, prompts, max_new_tokens, *args, **kw):
        """engine.generate(self, ...): batched sampling with a KV cache (engine.py has the details)."""
        import engine
        return engine.generate(self, prompts, max_new_tokens, *args, **kw)

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


def compile_regions(model):
    """train.py's compile_scope="blocks": each block (every layer shares one compiled graph: their code is the same)
    and the head's loss, not the whole model: a 16 s cold compile, not 44, for a 3% slower step (BENCHMARKS.md)."""
    for block in model.blocks:
        block.compile()
    model.loss_fn = torch.compile(linear_cross_entropy)


@functools.cache
def _compiled_forward(cls):
    return torch.compile(cls.forward, dynamic=True)


def compiled_block(block, *args):
    """block(*args) through one torch.compile of its class's forward, shared by every layer and model (each passes
    itself): compiling one block, not the whole hidden(), keeps compiling quick. dynamic: shapes change per call."""
    return _compiled_forward(type(block))(block, *args)


def compiled_hidden():
    """GPT.hidden with each block through compiled_block: GRPO's log-prob and update forwards, generate()'s prefill."""
    return lambda model, idx, cache=None, layout=None: model.hidden(idx, cache, layout=layout, block_fn=compiled_block)


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
                   p + "self_attn.o_proj.weight": b.attn.proj.weight,
                   p + "self_attn.q_norm.weight": b.attn.q_norm.weight,
                   p + "self_attn.k_norm.weight": b.attn.k_norm.weight,
                   p + "post_attention_layernorm.weight": b.mlp_norm.weight,
                   p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                   p + "mlp.down_proj.weight": b.mlp.down.weight})
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
                    f"blocks.{i}.attn.qkv.weight": torch.cat([g(f"self_attn.{n}_proj.weight") for n in "qkv"]),
                    f"blocks.{i}.attn.proj.weight": g("self_attn.o_proj.weight"),
                    f"blocks.{i}.attn.q_norm.weight": g("self_attn.q_norm.weight"),
                    f"blocks.{i}.attn.k_norm.weight": g("self_attn.k_norm.weight"),
                    f"blocks.{i}.mlp_norm.weight": g("post_attention_layernorm.weight"),
                    f"blocks.{i}.mlp.gate_up.weight": torch.cat([g("mlp.gate_proj.weight"), g("mlp.up_proj.weight")]),
                    f"blocks.{i}.mlp.down.weight": g("mlp.down_proj.weight")})
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    return out
