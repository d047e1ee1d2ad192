"""model.py on the CPU: transformers equivalence, exact sizes, loss, KV cache, generation, options, errors."""
import pytest
import torch
import torch.nn.functional as F

import model as M
from model import GPT, KVCache, make_config, to_hf_state_dict, from_hf_state_dict, hf_config_dict


def tiny(**kw):
    torch.manual_seed(0)
    m = GPT(make_config("debug", vocab_size=320, **kw)).eval()
    with torch.no_grad():  # norms away from 1 so the test also checks where they are applied
        for name, p in m.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0, 0.2)
    return m


def hf_twin(m):
    transformers = pytest.importorskip("transformers")
    kw = {k: v for k, v in hf_config_dict(m.cfg).items() if k not in ("architectures", "model_type")}
    h = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**kw)).eval()
    h.load_state_dict(to_hf_state_dict(m), strict=True)
    return h


@pytest.mark.parametrize("tie", [False, True])
def test_matches_transformers_qwen3(tie):
    m = tiny(tie_embeddings=tie, rope_theta=1e6)
    h = hf_twin(m)
    idx = torch.randint(0, 320, (3, 40))
    with torch.no_grad():
        diff = (m(idx) - h(idx).logits.float()).abs().max().item()
    assert diff < 1e-4
    # and back: a model loaded from the transformers layout gives the same logits
    m2 = GPT(m.cfg).eval()
    m2.load_state_dict(from_hf_state_dict(h.state_dict(), m.cfg), strict=True)
    assert torch.equal(m2(idx), m(idx))


def test_medium_large_is_exactly_401_277_888_params():
    with torch.device("meta"):
        m = GPT(make_config("medium-large"))
    assert m.num_params() == 401_277_888
    c = m.cfg
    assert (c.n_head, c.n_kv_head, c.head_dim, c.mlp_hidden, c.vocab_size, c.block_size) == (16, 4, 72, 3168, 50304, 2048)


def test_every_preset_follows_the_rules():
    for name, c in M.PRESETS.items():
        assert c.n_head % c.n_kv_head == 0 and c.mlp_hidden % 32 == 0, name
        if name != "debug":
            assert c.n_kv_head == c.n_head // 4 and abs(c.mlp_hidden - 2.75 * c.n_embd) < 32, name


def test_loss_equals_plain_cross_entropy_and_gradients():
    m = tiny()
    idx, tgt = torch.randint(0, 320, (2, 64)), torch.randint(0, 320, (2, 64))
    tgt[0, :7] = -1
    old = M.LOSS_CHUNK_ROWS
    M.LOSS_CHUNK_ROWS = 24  # several chunks, the last one ragged
    try:
        loss = m(idx, tgt)
        loss.backward()
        g1 = [p.grad.clone() for p in m.parameters()]
    finally:
        M.LOSS_CHUNK_ROWS = old
    m.zero_grad()
    ref = F.cross_entropy(m(idx).view(-1, 320), tgt.view(-1), ignore_index=-1)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-5
    for a, p in zip(g1, m.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-6, rtol=1e-4)


def test_kv_cache_logits_equal_full_forward():
    m = tiny()
    seq = torch.randint(0, 320, (2, 30))
    full = m(seq)
    cache = KVCache(m.cfg, 2, 30, torch.zeros(2, dtype=torch.long), torch.float32, "cpu")
    outs = [m.logits(m.hidden(seq[:, :12], cache))]
    for t in range(12, 30):
        outs.append(m.logits(m.hidden(seq[:, t:t + 1], cache)))
    assert (torch.cat(outs, 1) - full).abs().max().item() < 1e-5


def test_decode_attention_equals_masked_sdpa():
    """decode_attend (decoding's two batched matmuls, used on CUDA) gives SDPA's output under a left-padding mask."""
    torch.manual_seed(0)
    B, H, R, S, D = 3, 2, 4, 10, 8
    q, k, v = torch.randn(B, H, R, D), torch.randn(B, H, S, D), torch.randn(B, H, S, D)
    mask = torch.ones(B, 1, R, S, dtype=torch.bool)
    mask[0, :, :, :3] = False  # row 0 is left-padded by 3 slots, row 2 sees only its last 4 slots
    mask[2, :, :, :6] = False
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.allclose(M.decode_attend(q, k, v, mask), want, atol=1e-5)
    assert not torch.allclose(M.decode_attend(q, k, v, torch.ones_like(mask)), want, atol=1e-3)  # the mask matters


def test_batched_generation_of_different_lengths_matches_one_by_one():
    m = tiny()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3], [100, 200, 300]]
    with_cache, lens = m.generate(prompts, 12, temperature=0)
    without, _ = m.generate(prompts, 12, temperature=0, use_cache=False)
    assert torch.equal(with_cache, without)
    for i, p in enumerate(prompts):  # each row equals greedy decoding of that prompt alone, by full forwards
        seq = list(p)
        for _ in range(12):
            seq.append(m(torch.tensor([seq]))[0, -1].argmax().item())
        assert seq[len(p):] == with_cache[i].tolist()
    assert lens.tolist() == [12, 12, 12]


def test_kept_decoder_is_reused_and_decodes_like_a_fresh_one():
    """generate(keep_decoder=True), as GRPO's rollouts call it: the second call with as many rows reuses the first
    call's cache (its slots rounded up to 128, the stale K/V of the first prompts still in them, masked; the prompts
    left-padded to a multiple of 32 tokens) and gives a fresh call's greedy tokens; a call that needs more slots
    replaces it, and that longer cache serves shorter prompts; another batch size replaces it; moving the model
    drops it."""
    m = tiny()
    first = [[5, 6, 7, 8, 9, 10, 11], [3], [100, 200, 300]]
    second = [[9, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [42]]  # other lengths, so other left padding
    kept_first, _ = m.generate(first, 12, temperature=0, keep_decoder=True)
    key, cache, _ = M._KEPT[m]
    assert key[:2] == (3, 128) and cache.k.shape[3] == 128
    assert cache.pad.tolist() == [32 - 7, 32 - 1, 32 - 3] and cache.length == 32 + 11  # prompts padded to PREFILL_BUCKET
    kept_second, _ = m.generate(second, 12, temperature=0, keep_decoder=True)
    assert M._KEPT[m][:2] == (key, cache)  # the same tensors: no new cache, no new capture
    for prompts, kept in ((first, kept_first), (second, kept_second)):
        assert torch.equal(kept, m.generate(prompts, 12, temperature=0)[0])
    assert M._KEPT[m][:2] == (key, cache)  # calls that keep nothing leave it alone
    m.generate([[7] * 130, [1, 2], [3]], 12, temperature=0, keep_decoder=True)  # 142 slots: a 256-slot cache replaces it
    key256, cache256, _ = M._KEPT[m]
    assert key256[:2] == (3, 256)
    again, _ = m.generate(second, 12, temperature=0, keep_decoder=True)  # 22 slots: the longer kept cache serves
    assert M._KEPT[m][1] is cache256 and torch.equal(again, kept_second)
    m.generate(second[:2], 12, temperature=0, keep_decoder=True)
    assert M._KEPT[m][0] == (2, 128, torch.float32, False)  # one kept decoder per model: the other went
    m.float()
    assert m not in M._KEPT
    with pytest.raises(ValueError, match="a KV cache is for decoding"):
        m(torch.tensor([[1, 2]]), torch.tensor([[2, 3]]), cache=cache)


def test_generation_stops_at_eos_and_reports_lengths():
    m = tiny()
    first, _ = m.generate([[1, 2, 3], [4, 5]], 6, temperature=0)
    eos = first[0, 2].item()  # make row 0's third greedy token the EOS
    out, lens = m.generate([[1, 2, 3], [4, 5]], 6, temperature=0, eos_id=eos)
    assert lens[0].item() == 3 and out[0, :3].tolist() == first[0, :3].tolist()
    assert (out[0, 3:] == eos).all()
    row1 = first[1].tolist()
    expect = row1.index(eos) + 1 if eos in row1 else 6
    assert lens[1].item() == expect


def test_sampling_filters():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert torch.isinf(M.filter_logits(logits, top_k=2)[0, :2]).all()
    # probabilities ~ [0.03, 0.09, 0.24, 0.64]: top_p 0.7 keeps the two largest
    kept = ~torch.isinf(M.filter_logits(logits, top_p=0.7))
    assert kept.tolist() == [[False, False, True, True]]
    g = torch.Generator().manual_seed(0)
    draws = [M.sample_next(logits, 1.0, top_k=1, generator=g).item() for _ in range(5)]
    assert draws == [3] * 5


def test_sampling_draws_what_multinomial_draws():
    """sample_next's draw without torch.multinomial (whose check synced with the GPU every step) gives multinomial's
    very tokens from the same generator state, here over 64 rows x 5 draws."""
    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(1)) * 3
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for _ in range(5):
        want = torch.multinomial(torch.softmax(logits, -1), 1, generator=g1).squeeze(1)
        assert torch.equal(M.sample_next(logits, 1.0, generator=g2), want)
    assert M.sample_next(logits, 1.0).unique().numel() > 30  # sampled, not argmax


def test_nan_logits_stop_generation_with_one_error():
    m = tiny()
    with torch.no_grad():
        m.blocks[1].mlp.down.weight[0, 0] = float("nan")
    for temperature in (1.0, 0):
        with pytest.raises(RuntimeError, match="logits are NaN or inf"):
            m.generate([[1, 2, 3], [4, 5]], 4, temperature=temperature)


@pytest.mark.parametrize("compiled", [False, True])
def test_decode_block_fn_steps_as_blocks_do(compiled):
    """The decoding step's block as two halves around the cache write and attention (compiled: inductor on the CPU)
    gives the logits of Block.forward, step after step, and writes the same cache."""
    m = tiny()
    prompts = torch.randint(0, 320, (3, 5), generator=torch.Generator().manual_seed(0))
    pad = torch.tensor([0, 2, 4])
    caches = [KVCache(m.cfg, 3, 9, pad, torch.float32, "cpu") for _ in range(2)]
    fn = M.decode_block_fn(compiled)
    with torch.no_grad():
        for c in caches:
            m(prompts, cache=c)
        tok = prompts[:, -1:]
        for _ in range(4):
            want = m(tok, cache=caches[0])
            got = m(tok, cache=caches[1], block_fn=fn)
            assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
            tok = want[:, -1].argmax(-1, keepdim=True)
    assert torch.allclose(caches[0].k, caches[1].k, atol=1e-6) and torch.equal(caches[0].pos, caches[1].pos)


def test_prompt_longer_than_context_is_one_clear_error():
    m = tiny()
    with pytest.raises(ValueError, match="exceeds the model's context of 256"):
        m.generate([[1] * 250], 10)
    with pytest.raises(ValueError, match="longer than the model's context"):
        m(torch.zeros(1, 257, dtype=torch.long))


def test_factorized_tied_embeddings_and_checkpointing():
    m = tiny(embed_rank=16, tie_embeddings=True)
    V, r = 320, 16
    assert m.wte.weight.shape == (V, r) and m.lm_head is None
    idx, tgt = torch.randint(0, V, (2, 32)), torch.randint(0, V, (2, 32))
    m.train()
    loss = m(idx, tgt)
    loss.backward()
    g = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m.cfg.checkpoint_activations = True
    loss2 = m(idx, tgt)
    loss2.backward()
    assert loss.item() == loss2.item()
    assert all(torch.allclose(a, p.grad, atol=1e-7) for a, p in zip(g, m.parameters()))
    with pytest.raises(ValueError, match="factorized"):
        hf_config_dict(m.cfg)


def test_weight_decay_only_on_matmul_weights():
    m = tiny()
    opt = m.configure_optimizer(1e-3, 0.1, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"])
    assert any(p is m.wte.weight for p in no_decay["params"]) and any(p is m.lm_head.weight for p in decay["params"])
    assert sum(p.numel() for p in decay["params"]) == m.matmul_params()  # untied: every matmul weight, head included


def test_switches_say_clearly_what_is_missing(monkeypatch):
    m = tiny()
    monkeypatch.setattr(M, "ATTENTION", "flash")
    M._load_flash.cache_clear()
    with pytest.raises(RuntimeError, match="flash-attn"):
        m(torch.zeros(1, 8, dtype=torch.long))
    monkeypatch.setattr(M, "ATTENTION", "sdpa")
    monkeypatch.setattr(M, "PRECISION", "fp16")
    with pytest.raises(ValueError, match="unknown PRECISION"):
        GPT(make_config("debug"))


def _reference_attention(q, k, v, scale):
    """Causal GQA attention in float32, (B, T, H, D) layout, and its log-sum-exp (B, H, T)."""
    rep = q.shape[2] // k.shape[2]
    qt, kt, vt = q.float().transpose(1, 2), k.float().repeat_interleave(rep, 2).transpose(1, 2), v.float().repeat_interleave(rep, 2).transpose(1, 2)
    s = qt @ kt.transpose(-1, -2) * scale
    s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    return (s.softmax(-1) @ vt).transpose(1, 2).to(q.dtype), s.logsumexp(-1)


def test_flash_attn_4_glue_matches_sdpa_and_compiles_in_one_graph(monkeypatch):
    """The custom ops around flash-attn 4, with a stand-in for its kernels (none run on a CPU): outputs and gradients
    equal SDPA's, and torch.compile traces a layer through them with fullgraph=True (no graph break)."""
    import sys
    import types
    calls = []

    def fwd(q, k, v, softmax_scale, causal, return_lse):
        assert causal and return_lse and q.is_contiguous() and v.is_contiguous() and q.shape[-1] == 64
        assert softmax_scale == 12 ** -0.5  # the true head_dim's, not the padded one's
        calls.append("fwd")
        out, lse = _reference_attention(q, k, v, softmax_scale)
        return out, lse, None, None, None

    def bwd(q, k, v, out, dout, lse, softmax_scale, causal):  # by hand: custom ops run below autograd
        calls.append("bwd")
        B, T, H, D = q.shape
        rep = H // k.shape[2]
        qt, kt, vt, ot, dot = (t.float().transpose(1, 2) for t in (q, k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2), out, dout))
        p = torch.exp(qt @ kt.transpose(-1, -2) * softmax_scale - lse[..., None]).tril()
        ds = p * (dot @ vt.transpose(-1, -2) - (dot * ot).sum(-1, keepdim=True)) * softmax_scale
        fold = lambda g: g.view(B, -1, rep, T, D).sum(2).transpose(1, 2)  # query heads' shares back onto their K/V head
        return (ds @ kt).transpose(1, 2), fold(ds.transpose(-1, -2) @ qt), fold(p.transpose(-1, -2) @ dot)

    interface = types.ModuleType("flash_attn.cute.interface")
    interface._flash_attn_fwd, interface._flash_attn_bwd = fwd, bwd
    for name, mod in (("flash_attn", types.ModuleType("flash_attn")), ("flash_attn.cute", types.ModuleType("flash_attn.cute")),
                      ("flash_attn.cute.interface", interface)):
        monkeypatch.setitem(sys.modules, name, mod)
    M._load_flash.cache_clear()
    flash = M._load_flash()
    torch.manual_seed(0)
    q = torch.randn(2, 16, 4, 12, requires_grad=True)  # head_dim 12: padded to 64 for the kernels, as 72 to 96
    k, v = (torch.randn(2, 16, 2, 12, requires_grad=True) for _ in range(2))
    y = flash(q, k, v.transpose(1, 2).contiguous().transpose(1, 2), 0.0)  # a strided v is made contiguous
    grads = torch.autograd.grad(y.square().sum(), (q, k, v))
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True).transpose(1, 2)
    assert torch.allclose(y, ref, atol=1e-5)
    for g, r in zip(grads, torch.autograd.grad(ref.square().sum(), (q, k, v), retain_graph=True)):
        assert torch.allclose(g, r, atol=1e-5)
    assert calls == ["fwd", "bwd"]
    with pytest.raises(RuntimeError, match="no attention dropout"):
        flash(q, k, v, 0.1)
    compiled = torch.compile(lambda q, k, v: flash(q, k, v, 0.0).sum(), backend="aot_eager", fullgraph=True)
    compiled(q, k, v).backward()
    assert torch.allclose(q.grad, torch.autograd.grad(ref.sum(), q)[0], atol=1e-5)
    M._load_flash.cache_clear()


def test_unknown_preset_or_field():
    with pytest.raises(ValueError, match="unknown model preset"):
        make_config("huge")
    with pytest.raises(ValueError, match="unknown model field"):
        make_config("tiny", n_layers=3)


def test_generation_with_bf16_weights():
    m = tiny().to(torch.bfloat16)
    assert m.rope_cos.dtype == torch.float32  # RoPE tables stay float32 under a cast
    out, lengths = m.generate([[1, 2, 3], [4]], 5, temperature=0)
    assert out.shape == (2, 5) and lengths.tolist() == [5, 5]
    again, _ = m.generate([[1, 2, 3], [4]], 5, temperature=0, use_cache=False)
    assert torch.equal(out, again)


def test_residual_stream_in_the_autocast_dtype(monkeypatch):
    m = tiny()
    x = torch.randint(0, 100, (2, 32))
    monkeypatch.setattr(M, "RESIDUAL", "fp32")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss32, h32 = m(x, x), m.hidden(x)
        monkeypatch.setattr(M, "RESIDUAL", "autocast")
        loss16, h16 = m(x, x), m.hidden(x)
    assert h32.dtype == torch.float32 and h16.dtype == torch.bfloat16
    assert abs(loss16.item() - loss32.item()) < 1e-2 and loss16.item() != loss32.item()
    monkeypatch.setattr(M, "RESIDUAL", "fp16")
    with pytest.raises(ValueError, match="unknown RESIDUAL"):
        m(x, x)


def test_compiled_prefill_gives_the_eager_tokens():
    """generate(compile=True): the prompt block through torch.compile (inductor on the CPU, ~20 s) writes the
    same KV cache, so greedy decoding continues to the same tokens, for two prompt-block shapes."""
    m = tiny()
    for prompts in ([[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]], [[3] * 9, [4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]]):
        eager, n_eager = m.generate(prompts, 6, temperature=0)
        compiled, n_compiled = m.generate(prompts, 6, temperature=0, compile=True)
        assert torch.equal(eager, compiled) and torch.equal(n_eager, n_compiled)


def test_compiled_hidden_traces_one_block_whatever_the_depth():
    """compiled_hidden() compiles Block.forward once for every layer (regional compilation), so what it traces does
    not grow with n_layer: the whole 20-layer hidden() took minutes to compile for GRPO (BENCHMARKS.md)."""
    from torch._dynamo.utils import counters
    captured = {}
    for n_layer in (2, 5):
        torch._dynamo.reset()
        counters.clear()
        m = tiny(n_layer=n_layer)
        idx = torch.randint(0, 320, (2, 7))
        with torch.no_grad():
            assert torch.allclose(M.compiled_hidden()(m, idx), m.hidden(idx), atol=1e-5)
        captured[n_layer] = counters["stats"]["calls_captured"]
    assert captured[2] == captured[5] > 0


def test_repeated_prompts_share_one_prefill(monkeypatch):
    """GRPO's G samples of a prompt: generate() prefills each distinct (prompt, padding) once and copies its K/V to
    the repeats; greedy tokens equal those of the prompts generated once each."""
    m = tiny()
    prompts = [[1, 2, 3, 4, 5], [0, 7], [7], [1, 2, 3, 4, 5], [0, 7], [0, 7]]  # [0, 7] and [7] pad to the same ids
    once, n_once = m.generate(prompts[:3], 6, temperature=0, eos_id=0)
    rows = []
    real = M.GPT.hidden
    monkeypatch.setattr(M.GPT, "hidden", lambda self, idx, cache=None, **kw: rows.append(idx.shape[0]) or real(self, idx, cache, **kw))
    shared, n_shared = m.generate(prompts, 6, temperature=0, eos_id=0)
    assert rows[0] == 3  # the prefill ran the three distinct rows, then decoding steps all six
    assert torch.equal(shared, once[[0, 1, 2, 0, 1, 1]]) and torch.equal(n_shared, n_once[[0, 1, 2, 0, 1, 1]])
