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
    monkeypatch.setattr(M, "_flash_attn_func", None)
    with pytest.raises(RuntimeError, match="flash-attn"):
        m(torch.zeros(1, 8, dtype=torch.long))
    monkeypatch.setattr(M, "ATTENTION", "sdpa")
    monkeypatch.setattr(M, "PRECISION", "fp16")
    with pytest.raises(ValueError, match="unknown PRECISION"):
        GPT(make_config("debug"))


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
