"""model.py on the CPU: transformers equivalence, exact sizes, loss, KV cache, generation, options, errors."""
import pytest
import torch
import torch.nn.functional as F

import model as M
from engine import KVCache
from model import GPT, make_config, to_hf_state_dict, from_hf_state_dict, hf_config_dict


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
    shape = (c.n_head, c.n_kv_head, c.head_dim, c.mlp_hidden, c.vocab_size, c.block_size)
    assert shape == (16, 4, 72, 3168, 50304, 2048)


def test_every_preset_follows_the_rules():
    for name, c in M.PRESETS.items():
        assert c.n_head % c.n_kv_head == 0 and c.mlp_hidden % 32 == 0, name
        if name != "debug":
            assert c.n_kv_head == c.n_head // 4 and abs(c.mlp_hidden - 2.75 * c.n_embd) < 32, name


def test_loss_equals_plain_cross_entropy_and_gradients():
    m = tiny()
    idx, tgt = torch.randint(0, 320, (2, 64)), torch.randint(0, 320, (2, 64))
    tgt[0, :7] = -1
    loss = m(idx, tgt)
    loss.backward()
    g1 = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    ref = F.cross_entropy(m(idx).view(-1, 320), tgt.view(-1), ignore_index=-1)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-5
    for a, p in zip(g1, m.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-6, rtol=1e-4)


def test_loss_in_chunks_equals_one_chunk():
    """LinearCrossEntropy over 128 rows in chunks of 24 (the last one ragged) gives the sum and gradients of plain
    cross-entropy."""
    torch.manual_seed(0)
    h, w = torch.randn(128, 16, requires_grad=True), torch.randn(320, 16, requires_grad=True)
    tgt = torch.randint(0, 320, (128,))
    tgt[:7] = -1
    loss = M.LinearCrossEntropy.apply(h, w, tgt, 24)
    grads = torch.autograd.grad(loss, (h, w))
    ref = F.cross_entropy(h @ w.T, tgt, ignore_index=-1, reduction="sum")
    assert abs(loss.item() - ref.item()) < 1e-3
    for g, r in zip(grads, torch.autograd.grad(ref, (h, w))):
        assert torch.allclose(g, r, atol=1e-5, rtol=1e-4)


def test_kv_cache_logits_equal_full_forward():
    m = tiny()
    seq = torch.randint(0, 320, (2, 30))
    full = m(seq)
    cache = KVCache(m.cfg, 2, 30, torch.zeros(2, dtype=torch.long), torch.float32, "cpu")
    outs = [m.logits(m.hidden(seq[:, :12], cache))]
    for t in range(12, 30):
        outs.append(m.logits(m.hidden(seq[:, t:t + 1], cache)))
    assert (torch.cat(outs, 1) - full).abs().max().item() < 1e-5


def test_prompt_longer_than_context_is_one_clear_error():
    m = tiny()
    with pytest.raises(ValueError, match="exceeds the model's context of 256"):
        m.generate([[1] * 250], 10)
    for prompts, n in (([], 5), ([[1, 2]], 0)):
        with pytest.raises(ValueError, match=r"need at least one prompt and max_new_tokens >= 1 \(got"):
            m.generate(prompts, n)
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


def test_unknown_preset_or_field():
    with pytest.raises(ValueError, match="unknown model preset"):
        make_config("huge")
    with pytest.raises(ValueError, match="unknown model field"):
        make_config("tiny", n_layers=3)


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
