"""DeepSeek Sparse Attention (dsa.py) on the CPU: exactness at k >= T, selection, causality, gradient
isolation, the KL target, the indexer's hand-made gradient, KV-cache generation, loading a dense checkpoint."""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import attention
import dsa
import model as M
from conftest import ROOT
from model import GPT, make_config

V = 320


def tiny(**kw):
    torch.manual_seed(0)
    m = GPT(make_config("debug", vocab_size=V, **kw)).eval()
    with torch.no_grad():  # norms away from 1 so the tests also check where they are applied
        for name, p in m.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0, 0.2)
    return m


def dsa_twin(dense, **kw):
    """A DSA model holding the dense model's weights (and a fresh indexer)."""
    m = tiny(**kw)
    missing, unexpected = m.load_state_dict(dense.state_dict(), strict=False)
    assert not unexpected and missing and all("indexer" in k for k in missing)
    return m


@pytest.fixture(params=["mask", "gather"])
def impl(request, monkeypatch):
    monkeypatch.setattr(dsa.SparseAttention, "impl", request.param)
    return request.param


def test_top_k_at_least_T_is_exactly_dense(impl):
    dense = tiny()
    idx = torch.randint(0, V, (3, 40))
    ref = dense(idx)
    for k in (40, 64):
        m = dsa_twin(dense, dsa_top_k=k)
        assert (m(idx) - ref).abs().max().item() < 1e-5
    warm = dsa_twin(dense, dsa_top_k=4, dsa_stage="warmup")  # warm-up attends densely whatever k is
    assert (warm(idx) - ref).abs().max().item() < 1e-5


def test_hand_built_scores_select_the_expected_keys(impl):
    # two indexer heads, q = e0 and e1, weights +1 and -1, key s = (a_s, b_s): I[t, s] = ReLU(a_s) - ReLU(b_s)
    a = torch.tensor([3.0, -1.0, 5.0, 0.5, 4.0, 2.0])
    b = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 3.0])  # I = [3, 0, 5, 0.5, 4, -1]
    T = 6
    ik = torch.stack([a, b], -1)[None]  # (1, T, 2)
    iq = torch.eye(2).expand(1, T, 2, 2)  # (1, T, H_I=2, D_I=2)
    iw = torch.tensor([1.0, -1.0]).expand(1, T, 2)
    assert torch.allclose(dsa.index_scores(iq, ik, iw)[0, 0], torch.tensor([3.0, 0, 5, 0.5, 4, -1]))
    idx, valid = dsa.select_topk(iq, ik, iw, top_k=3)
    chosen = [sorted(idx[0, t][valid[0, t]].tolist()) for t in range(T)]
    # rows 0-2 see fewer than 3 keys: all of them, no future slot; then the three highest visible scores
    assert chosen == [[0], [0, 1], [0, 1, 2], [0, 2, 3], [0, 2, 4], [0, 2, 4]]
    # and the attention uses exactly those keys: compare with a softmax over the expected sets by hand
    torch.manual_seed(1)
    q, k, v = torch.randn(1, T, 4, 8), torch.randn(1, T, 2, 8), torch.randn(1, T, 2, 8)
    y = dsa.sparse_attend(q, k, v, idx, valid, impl=impl)
    for t in range(T):
        keys = torch.tensor(chosen[t])
        for h in range(4):
            s = (q[0, t, h] @ k[0, keys, h // 2].T) / math.sqrt(8)
            assert torch.allclose(y[0, t, h], torch.softmax(s, -1) @ v[0, keys, h // 2], atol=1e-6)


def test_changing_a_future_token_changes_no_earlier_output(impl):
    m = tiny(dsa_top_k=4)
    idx = torch.randint(0, V, (2, 32))
    ref = m(idx)
    for j in (5, 17, 31):
        idx2 = idx.clone()
        idx2[:, j] = (idx2[:, j] + 1) % V
        out = m(idx2)
        assert torch.equal(out[:, :j], ref[:, :j])
        assert (out[:, j:] - ref[:, j:]).abs().max() > 1e-4


@pytest.mark.parametrize("stage", ["warmup", "sparse"])
def test_gradient_isolation(stage):
    m = tiny(dsa_top_k=6, dsa_stage=stage).train()
    idx, tgt = torch.randint(0, V, (2, 24)), torch.randint(0, V, (2, 24))
    lm, li = m.losses(idx, tgt)
    main = [p for n, p in m.named_parameters() if "indexer" not in n]
    indexer = [p for n, p in m.named_parameters() if "indexer" in n]
    g_li_main = torch.autograd.grad(li, main, retain_graph=True, allow_unused=True)
    g_lm_indexer = torch.autograd.grad(lm, indexer, retain_graph=True, allow_unused=True)
    assert all(g is None or not g.any() for g in g_li_main)  # L_I never reaches the main model
    assert all(g is None or not g.any() for g in g_lm_indexer)  # the LM loss never reaches the indexer
    # and neither is vacuous: each loss does train its own side
    assert all(g is not None and g.abs().sum() > 0 for g in torch.autograd.grad(li, indexer, retain_graph=True))
    assert sum(g.abs().sum() for g in torch.autograd.grad(lm, main, allow_unused=True) if g is not None) > 0


def test_kl_target_is_the_attention_distribution():
    m = tiny(dsa_top_k=4, dsa_stage="warmup").train()
    idx = torch.randint(0, V, (1, 7))
    attn, T, H, Hkv, D = m.blocks[0].attn, 7, 4, 2, 16
    # layer 0's q, k, v, written out again from its weights
    x = m.blocks[0].attn_norm(m.wte(idx))
    q, k, v = attn.qkv(x).split([H * D, Hkv * D, Hkv * D], -1)
    cos, sin = m.rope_cos[None, :T, None], m.rope_sin[None, :T, None]
    q = M.apply_rope(attn.q_norm(q.view(1, T, H, D)), cos, sin)
    k = M.apply_rope(attn.k_norm(k.view(1, T, Hkv, D)), cos, sin)
    v = v.view(1, T, Hkv, D)
    p_heads = torch.zeros(H, T, T)  # softmax over the visible keys, one head at a time
    for h in range(H):
        for t in range(T):
            s = torch.stack([q[0, t, h] @ k[0, j, h // 2] for j in range(t + 1)]) / math.sqrt(D)
            p_heads[h, t, :t + 1] = torch.softmax(s, 0)
    y = attention.attend(q, k, v)  # those are the probabilities the model's attention uses
    assert torch.allclose(torch.einsum("hts,shd->thd", p_heads, v[0].repeat_interleave(2, 1)), y[0], atol=1e-5)
    p = p_heads.sum(0) / p_heads.sum(0).sum(-1, keepdim=True)  # summed over heads, L1-normalised
    keep = dsa._allowed(None, 0, T, T, "cpu")
    assert torch.allclose(dsa.attention_probs(q, k, keep)[0], p, atol=1e-6)
    # the layer's loss is the mean over tokens of KL(p || softmax(I)), I written out term by term
    iq, ik, iw = attn.indexer(x, *(t[None, :T, None] for t in (m.dsa_rope_cos, m.dsa_rope_sin)))
    kl = 0.0
    for t in range(T):
        scores = torch.stack([sum(iw[0, t, j] * torch.relu(iq[0, t, j] @ ik[0, s]) for j in range(4))
                              for s in range(t + 1)])
        kl += F.kl_div(torch.log_softmax(scores, 0), p[t, :t + 1], reduction="sum")
    m.hidden(idx, indexer_loss=True)
    assert abs(m.blocks[0].attn.indexer_loss.item() - kl.item() / T) < 1e-5


@pytest.mark.parametrize("sparse", [False, True])
def test_indexer_kl_gradient_equals_autograd(sparse):
    torch.manual_seed(0)
    B, T, HI, DI, H, Hkv, D = 2, 9, 3, 5, 4, 2, 6
    iq, ik = torch.randn(B, T, HI, DI, requires_grad=True), torch.randn(B, T, DI, requires_grad=True)
    iw = torch.randn(B, T, HI, requires_grad=True)
    q, k = torch.randn(B, T, H, D), torch.randn(B, T, Hkv, D)
    idx, valid = dsa.select_topk(iq, ik, iw, 4) if sparse else (None, None)
    loss = dsa.IndexerKL.apply(iq, ik, iw, q, k, idx, valid, True)
    grads = torch.autograd.grad(loss, (iq, ik, iw))
    keep = dsa._keep(idx, valid, 0, T, T, "cpu")  # the same loss, plainly, for autograd
    logq = dsa.index_scores(iq, ik, iw).masked_fill(~keep, float("-inf")).log_softmax(-1)
    p = dsa.attention_probs(q, k, keep)
    ref = (torch.xlogy(p, p) - p * logq.masked_fill(~keep, 0)).sum()
    assert abs(loss.item() - ref.item()) < 1e-4
    for g, r in zip(grads, torch.autograd.grad(ref, (iq, ik, iw))):
        assert torch.allclose(g, r, atol=1e-5, rtol=1e-4)


def test_generate_with_dsa_equals_the_no_cache_path(impl):
    m = tiny(dsa_top_k=3)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3], [100, 200, 300], [3]]  # the repeat shares a prefill: indexer keys copied
    with_cache, _ = m.generate(prompts, 12, temperature=0)
    without, _ = m.generate(prompts, 12, temperature=0, use_cache=False)
    assert torch.equal(with_cache, without)
    for i, p in enumerate(prompts):  # and each row equals greedy decoding of its prompt alone by full forwards
        seq = list(p)
        for _ in range(12):
            seq.append(m(torch.tensor([seq]))[0, -1].argmax().item())
        assert seq[len(p):] == with_cache[i].tolist()


def test_gather_equals_mask_with_gradients(monkeypatch):
    m = tiny(dsa_top_k=5).train()
    idx, tgt = torch.randint(0, V, (2, 30)), torch.randint(0, V, (2, 30))
    out = {}
    for impl in ("mask", "gather"):
        monkeypatch.setattr(dsa.SparseAttention, "impl", impl)
        m.zero_grad()
        loss = m(idx, tgt)
        loss.backward()
        out[impl] = (loss.item(), [p.grad.clone() for p in m.parameters()])
    assert abs(out["mask"][0] - out["gather"][0]) < 1e-5
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(out["mask"][1], out["gather"][1]))


def test_objective_logging_and_checkpointing():
    m = tiny(dsa_top_k=5).train()
    idx, tgt = torch.randint(0, V, (2, 30)), torch.randint(0, V, (2, 30))
    loss = m(idx, tgt)
    lm, li = m.last_losses["lm"], m.last_losses["indexer"]
    assert not lm.requires_grad and not li.requires_grad and li > 0
    assert abs(loss.item() - (lm + m.cfg.dsa_loss_weight * li).item()) < 1e-6
    loss.backward()
    grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m.cfg.checkpoint_activations = True  # recomputed blocks give the same loss and gradients
    loss2 = m(idx, tgt)
    loss2.backward()
    assert abs(loss.item() - loss2.item()) < 1e-6
    assert all(torch.allclose(a, p.grad, atol=1e-7) for a, p in zip(grads, m.parameters()))
    m.eval()  # eval mode returns the LM loss alone (what a val loss compares)
    with torch.no_grad():
        assert abs(m(idx, tgt).item() - m.last_losses["lm"].item()) < 1e-6


def test_dense_stays_dense_and_errors_are_clear(monkeypatch):
    dense = tiny()
    assert not any("indexer" in n for n in dense.state_dict()) and dense.last_losses == {}
    with pytest.raises(ValueError, match="dsa_stage"):
        GPT(make_config("debug", dsa_top_k=4, dsa_stage="warm"))
    with pytest.raises(ValueError, match="dsa_rope_dim"):
        GPT(make_config("debug", dsa_top_k=4, dsa_rope_dim=3))
    m = tiny(dsa_top_k=4)
    with pytest.raises(ValueError, match="DSA"):
        M.hf_config_dict(m.cfg)
    m.blocks[1].attn.impl = "triton"
    with pytest.raises(ValueError, match="unknown DSA impl 'triton'; use 'mask' or 'gather'"):
        m(torch.zeros(1, 8, dtype=torch.long))


def test_dense_models_never_import_dsa_and_dsa_imports_first():
    """dsa.py is an opt-in: building and running a dense model leaves it unimported, and importing it before model.py
    (its base) makes no import cycle."""
    code = ("import sys, torch, model, engine; m = model.GPT(model.make_config('debug')); m.generate([[1, 2]], 2); "
            "assert 'dsa' not in sys.modules, 'dsa imported'; import dsa; "
            "print(type(model.GPT(model.make_config('debug', dsa_top_k=2)).blocks[0]).__name__)")
    printed = []
    for c in (code, "import dsa, model; print(dsa.SparseBlock.__mro__[1].__name__)"):
        p = subprocess.run([sys.executable, "-c", c], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr[-2000:]
        printed.append(p.stdout.strip())
    assert printed == ["SparseBlock", "Block"]


def test_bench_dsa_smoke_check_runs_every_part_on_the_cpu():
    """dev/bench_dsa.py's CPU check (speed, decode, quality at tiny sizes) keeps working after model changes."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, "dev", "bench_dsa.py"), "all", "--device", "cpu", "--tiny"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "speed-up" in p.stdout and "indexer recall of the dense top-64" in p.stdout
