"""
Generation: a static KV cache, batched sampling, CUDA graphs of the decoding step, compiled decoding.

    tokens, lengths = engine.generate(model, prompts, max_new_tokens, temperature=1.0)  # one call
    eng = engine.Engine(model, compile=True)  # many calls (GRPO's rollouts): keeps its cache and CUDA graphs
    tokens, lengths = eng.generate(prompts, max_new_tokens, temperature=1.0)

Prompts (lists of ids) are left-padded into one block, so every row writes the same cache slot at each step. Rows
that repeat a prompt (GRPO's G samples) share one prefill. On CUDA each decoding step replays a CUDA graph.
"""
import functools
import itertools

import numpy as np
import torch
import torch.nn as nn

import model as M
from attention import attend

PREFILL_BUCKET = 32  # an Engine left-pads prompts to a multiple of this: a few widths, one prefill CUDA graph each
SLOT_BUCKET = 128  # an Engine's cache slots rounded up to this: a few sizes serve every call; unused slots are skipped


class KVCache:
    """Static K/V buffers for batched decoding. Prompts are left-padded, so every row writes the same slot
    at each step; row b's real tokens start at slot pad[b] and its RoPE position is slot - pad[b]."""

    def __init__(self, cfg, batch_size, max_len, pad, dtype, device):
        # heads before slots: a layer's keys are (B * Hkv, S, D) without a copy, as decode_attend's matmuls want them
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # DSA: the indexer's one key per token, kept like K/V so each new token scores every cached one
        self.ik = None
        if cfg.dsa_top_k:
            self.ik = torch.zeros((cfg.n_layer, batch_size, max_len, cfg.dsa_head_dim), dtype=dtype, device=device)
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
        """Empty again, for new prompts of the same batch size (an Engine's next call): in place, since a
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
        s = self.slots[None, None, :]
        keep = (s <= q_slots[None, :, None]) & (s >= self.pad[:, None, None])
        positions = (q_slots[None, :] - self.pad[:, None]).clamp(min=0)
        return keep[:, None], positions  # (B, 1, T, S) and (B, T)


@torch.no_grad()
def generate(model, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None, generator=None,
             use_cache=True, compile=False, cuda_graph=True):
    """Batched sampling from prompts of different lengths (a list of lists of token ids).

    Returns (tokens, lengths): tokens (B, max_new_tokens) long, padded with eos_id (or 0) after a row stops;
    lengths (B,) the number of new tokens per row, its EOS included. temperature 0 = greedy.
    use_cache=False: a full forward over the sequence each step (for tests and checks).
    compile: the prompt block through model.compiled_hidden() and on CUDA the decoding step's blocks as
    decode_block_fn's compiled halves; costs seconds once per process: worth it for many calls, not for one.
    cuda_graph: on CUDA, replay each decoding step as a CUDA graph (False: eager steps, e.g. to profile kernels)."""
    device = model.rope_cos.device
    _check(model, prompts, max_new_tokens)
    idx, pad = left_pad(prompts, eos_id or 0, device)  # padding is masked: any id does, eos when there is one
    sample = functools.partial(_sample, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                               top_p=top_p, eos_id=eos_id, generator=generator)
    if not use_cache:
        seq = [idx]

        def step(nxt):
            seq[0] = torch.cat([seq[0], nxt[:, None]], dim=1)
            return full_logits(model, seq[0], pad)
        return sample(full_logits(model, idx, pad), step)
    cache = KVCache(model.cfg, len(prompts), idx.shape[1] + max_new_tokens, pad, model._compute_dtype(), device)
    decode = _decoder(model, cache, compile, cuda_graph)
    logits = _prefill(model, prompts, idx, cache, M.compiled_hidden() if compile else M.GPT.hidden)
    return sample(logits, lambda nxt: decode(nxt[:, None]))


class Engine:
    """generate() for many calls on one model (GRPO's rollouts): keeps the KV cache (its slots rounded up to
    SLOT_BUCKET) and the CUDA graphs for the next call with as many rows and at most as many slots, so a call skips
    the captures; prompts are left-padded to a multiple of PREFILL_BUCKET, and on CUDA the prefill of the distinct
    ones is a CUDA graph too, one per (distinct prompts, width). A call on other rows, a longer cache, another
    dtype, or weights moved or cast since, makes a new cache (the old one freed first). Free it with the object."""

    def __init__(self, model, compile=False):
        self.model, self.compile = model, compile
        self.key, self.cache, self.decode = None, None, None

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None, generator=None):
        """As engine.generate(model, ...), with this engine's cache and graphs."""
        model = self.model
        device = model.rope_cos.device
        longest = _check(model, prompts, max_new_tokens)
        width = min(-(-longest // PREFILL_BUCKET) * PREFILL_BUCKET, model.cfg.block_size - max_new_tokens)
        idx, pad = left_pad(prompts, eos_id or 0, device, width)
        slots = min(-(-(width + max_new_tokens) // SLOT_BUCKET) * SLOT_BUCKET, model.cfg.block_size)
        # the tensors' addresses: a move or cast of the model leaves a captured graph reading freed memory
        weights = tuple(t.data_ptr() for t in itertools.chain(model.parameters(), model.buffers()))
        key = (len(prompts), model._compute_dtype(), weights)
        if key == self.key and self.cache.k.shape[3] >= slots:  # a longer cache serves too
            self.cache.reset(pad)
            if isinstance(self.decode, _Graphs):
                self.decode.refresh()
        else:
            self.key, self.cache, self.decode = None, None, None  # free the old one before making another
            self.cache = KVCache(model.cfg, len(prompts), slots, pad, key[1], device)
            self.decode = _decoder(model, self.cache, self.compile, cuda_graph=True)
            self.key = key
        graphs = self.decode if isinstance(self.decode, _Graphs) else None
        hidden = M.compiled_hidden() if self.compile else M.GPT.hidden
        logits = _prefill(model, prompts, idx, self.cache, hidden, graphs)
        return _sample(logits, lambda nxt: self.decode(nxt[:, None]), max_new_tokens, temperature, top_k, top_p, eos_id,
                       generator)


def _check(model, prompts, max_new_tokens):
    """The longest prompt's length, after the checks a caller's input can fail."""
    if not len(prompts) or max_new_tokens < 1:
        raise ValueError(f"need at least one prompt and max_new_tokens >= 1 (got {len(prompts)}, {max_new_tokens})")
    if min(len(p) for p in prompts) == 0:
        raise ValueError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > model.cfg.block_size:
        raise ValueError(f"a prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the model's context "
                         f"of {model.cfg.block_size}; shorten the prompt or lower max_new_tokens")
    return longest


def _sample(logits, step, max_new_tokens, temperature, top_k, top_p, eos_id, generator):
    """The sampling loop: logits (B, V) after the prompts, step(tokens (B,)) -> the next logits."""
    B, device = logits.shape[0], logits.device
    fill = eos_id or 0  # after a row's eos: eos again (0 when there is none)
    out = torch.full((B, max_new_tokens), fill, dtype=torch.long, device=device)
    lengths = torch.full((B,), max_new_tokens, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    checksum = torch.zeros((), device=device)  # NaN or inf once any sampled logit is: checked once, after the loop
    for t in range(max_new_tokens):
        if t > 0:
            logits = step(nxt)
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
    if not torch.isfinite(checksum):
        raise RuntimeError("generate(): the model's logits are NaN or inf (its weights, or a state they produce)")
    return out, lengths


def full_logits(model, seq, pad):
    """Logits after the last token of left-padded rows seq (B, T), by a full forward through a fresh cache."""
    cache = KVCache(model.cfg, seq.shape[0], seq.shape[1], pad, model._compute_dtype(), seq.device)
    return model.logits(model.hidden(seq, cache)[:, -1])


def _prefill(model, prompts, idx, cache, hidden, graphs=None):
    """Logits after each row's prompt, its K/V written to the cache. Rows that repeat a prompt (GRPO samples G per
    prompt) share one forward: only the distinct rows run, and their cache rows are copied to the repeats. The
    repeats are found on the host, from the lists (torch.unique on the GPU would sync).
    graphs: an Engine's _Graphs, which replays that forward and copy as a CUDA graph."""
    distinct, firsts, inv = {}, [], []  # prompt -> its index among the distinct ones; their first rows; each row's
    for r, p in enumerate(prompts):
        j = distinct.setdefault(tuple(p), len(distinct))
        if j == len(firsts):
            firsts.append(r)
        inv.append(j)
    if len(firsts) == len(idx) and graphs is None:
        return model.logits(hidden(model, idx, cache)[:, -1])
    firsts, inv = torch.tensor(firsts, device=idx.device), torch.tensor(inv, device=idx.device)
    if graphs is not None:
        return graphs.prefill(idx[firsts], cache.pad[firsts], inv)
    small = KVCache(model.cfg, len(firsts), idx.shape[1], cache.pad[firsts], cache.k.dtype, idx.device)
    h = hidden(model, idx[firsts], small)[:, -1]
    cache.fill_from(small, inv)
    cache.advance(idx.shape[1])
    return model.logits(h)[inv]


def _decoder(model, cache, compile=False, cuda_graph=True):
    """One decoding step, token (B, 1) -> logits (B, V): on CUDA a _Graphs, which replays it as a CUDA graph."""
    if not (cuda_graph and cache.pos.is_cuda) or model.cfg.dsa_top_k:
        return lambda tok: model(tok, cache=cache)[:, -1]
    return _Graphs(model, cache, cache.k.shape[1], compile)


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
    logits (B, V), a step of hundreds of small kernels whose launches would cost more than running them, its blocks
    eager or (compile) decode_block_fn's compiled halves; and, for an Engine, the prefill of n distinct prompts of
    `width` tokens (prefill()). They read their own copies of the Linear weights in the autocast dtype,
    made here and again by refresh(): autocast's cached casts, which they would read otherwise, are freed when the
    caller's autocast ends (an Engine outlives it) and go stale when an optimizer steps."""

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
            block_fn = M.compiled_block if self.compile else None

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
    rows = np.full((len(prompts), width), fill, dtype=np.int64)  # numpy: torch.tensor on many lists is slow
    for r, p in enumerate(prompts):
        rows[r, width - len(p):] = p
    return torch.from_numpy(rows).to(device), pad


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
    cache layers. At GRPO's batch a step is bound by its kernel count, which the fused halves cut. Dense blocks only."""
    pre, post = (torch.compile(f) if compiled else f for f in (_attn_in, _attn_out))

    def block_fn(block, x, cos, sin, cache, layer, mask):
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
    # generator, without its check that probs are finite, which syncs with the GPU every step (generate checks once)
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


