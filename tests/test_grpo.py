"""grpo.py on the CPU: the loss against hand-computed numbers, the KL gradient, ratio == 1 on the first update,
micro-batch accumulation, position-based masks, Keep Sampling Mask, fused old log-probs, right padding, the compiled
forward, score() against its per-sample form, learning a trivial reward, resume; the run's stops: non-finite steps,
broken weights, failed checkpoint writes, and user errors named as what they are."""
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

import grpo
import tasks
from checkpoint import load_checkpoint, load_model, save_checkpoint
from model import GPT, make_config, packed_mask
from tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")


@pytest.fixture
def use(monkeypatch):
    """use(key=value, ...): grpo.py settings for this test, as module globals (what the script's config sets)."""
    def set_(**kw):
        for k, v in kw.items():
            assert hasattr(grpo, k), k
            monkeypatch.setattr(grpo, k, v)
    return set_


def tiny_model(vocab=40, seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(make_config("debug", vocab_size=vocab, **kw)).eval()


# ---- advantages ---------------------------------------------------------------------------------------------
def test_group_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0]])
    valid = torch.ones(3, 4, dtype=torch.bool)
    adv, informative = grpo.group_advantages(r, valid, scale_rewards=True, eps=1e-4)
    s = math.sqrt((4 * 0.25) / 3)  # unbiased std of [1, 0, 0, 1]
    assert torch.allclose(adv[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (s + 1e-4))
    assert informative.tolist() == [True, False, True] and (adv[1] == 0).all()
    s2 = math.sqrt((0.25 ** 2 * 3 + 0.75 ** 2) / 3)
    assert torch.allclose(adv[2], torch.tensor([-0.25, 0.75, -0.25, -0.25]) / (s2 + 1e-4))
    adv, _ = grpo.group_advantages(r, valid, scale_rewards=False)  # Dr. GRPO: mean-centred only
    assert adv[0].tolist() == [0.5, -0.5, -0.5, 0.5] and adv[2].tolist() == [-0.25, 0.75, -0.25, -0.25]
    valid[0, 0] = valid[0, 3] = False  # dropped samples leave the group statistics: [0, 0] has no signal left
    adv, informative = grpo.group_advantages(r, valid, scale_rewards=False)
    assert not informative[0] and (adv[0] == 0).all()


# ---- the per-token loss -----------------------------------------------------------------------------------------
def reference_loss(logp, old, ref, adv, lens, eps_low, eps_high, kl_coef, delta):
    """The objective written out token by token with Python floats."""
    out = [[0.0] * len(row) for row in logp]
    masked = []
    for i, row in enumerate(logp):
        n = lens[i]
        drift = sum(old[i][t] - row[t] for t in range(n)) / n
        mask_seq = adv[i] < 0 and drift > delta
        masked.append(mask_seq)
        for t in range(n):
            r = math.exp(row[t] - old[i][t])
            clipped = min(max(r, 1 - eps_low), 1 + eps_high)
            pol = 0.0 if mask_seq else -min(r * adv[i], clipped * adv[i])
            q_over_p = math.exp(ref[i][t] - row[t])
            kl = r * (q_over_p - math.log(q_over_p) - 1)
            out[i][t] = pol + kl_coef * kl
    return out, masked


def test_token_loss_equals_hand_reference_with_clipping_and_masking():
    # ratios per token (log r): both clip sides for both advantage signs, and sequences that trip the off-policy mask
    log_r = [[0.5, -0.5, 0.05, 0.0],     # A > 0: r=1.65 clipped high (grad 0), r=0.61 unclipped, r=1.05 in range
             [0.5, -0.5, 0.1, 9.0],      # A < 0: r=1.65 unclipped (min picks rA), r=0.61 clipped low; last is padding
             [0.3, 0.3, 0.3, 0.3],       # A < 0, mean log(old/theta) = -0.3 < delta: kept
             [-0.4, -0.3, -0.2, 0.0],    # A < 0, mean log(old/theta) = 0.3 > delta: masked (KL stays)
             [-0.4, -0.3, -0.2, 0.0]]    # A > 0, same drift: never masked
    lens = [4, 3, 4, 3, 3]
    adv = [1.5, -0.7, -1.2, -0.9, 0.8]
    old = [[-1.0 - 0.1 * t - 0.2 * i for t in range(4)] for i in range(5)]
    logp = [[old[i][t] + log_r[i][t] for t in range(4)] for i in range(5)]
    ref = [[old[i][t] + 0.3 * ((-1) ** t) for t in range(4)] for i in range(5)]
    kw = dict(eps_low=0.2, eps_high=0.28, kl_coef=0.05, delta=0.25)
    want, masked = reference_loss(logp, old, ref, adv, lens, **kw)
    assert masked == [False, False, False, True, False]
    mask = torch.arange(4)[None] < torch.tensor(lens)[:, None]
    T = lambda x: torch.tensor(x, dtype=torch.float64)
    got, st = grpo.grpo_token_loss(T(logp), T(old), T(ref), T(adv), mask, **kw)
    for i in range(5):
        for t in range(4):
            assert abs(got[i, t].item() - (want[i][t] if t < lens[i] else 0.0)) < 1e-12, (i, t)
    # clipped tokens: seq 0 token 0 (A>0, r>1.28), seq 1 token 1 (A<0, r<0.8); not seq 3 (masked) nor seq 4 (A>0, r<0.8)
    assert st["clip_high"].item() == 1 and st["clip_low"].item() == 1
    assert st["masked_seqs"].item() == 1 and st["tokens"].item() == sum(lens)
    # a sequence masked by the off-policy rule sends no policy gradient, but its KL gradient remains
    x = T(logp).requires_grad_()
    loss, _ = grpo.grpo_token_loss(x, T(old), T(ref), T(adv), mask, **{**kw, "kl_coef": 0.0})
    loss.sum().backward()
    assert (x.grad[3] == 0).all() and (x.grad[4, :3] != 0).all()
    assert x.grad[0, 0] == 0 and x.grad[1, 1] == 0 and x.grad[1, 0] != 0  # clipped tokens carry no gradient
    assert (x.grad[1, 3] == 0) and (x.grad[0, 1] != 0)


def test_unbiased_kl_gradient():
    """d/dtheta of r * (q/p - log(q/p) - 1) = (pi/pi_old) * log(pi/pi_ref) * d log pi (V3.2), ratio not detached."""
    torch.manual_seed(0)
    theta = torch.randn(6, 11, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (6,))
    old = torch.log_softmax(torch.randn(6, 11, dtype=torch.float64), -1).gather(1, targets[:, None]).T
    ref = torch.log_softmax(torch.randn(6, 11, dtype=torch.float64), -1).gather(1, targets[:, None]).T
    logp = torch.log_softmax(theta, -1).gather(1, targets[:, None]).T  # (1, 6): one sequence of 6 tokens
    mask = torch.ones(1, 6, dtype=torch.bool)
    loss, _ = grpo.grpo_token_loss(logp, old, ref, torch.zeros(1, dtype=torch.float64), mask, 0.2, 0.2, 1.0, 0.1)
    (g,) = torch.autograd.grad(loss.sum(), theta, retain_graph=True)
    want = torch.zeros_like(theta)
    for t in range(6):
        (glogp,) = torch.autograd.grad(logp[0, t], theta, retain_graph=True)
        p, p_old, p_ref = logp[0, t].exp(), old[0, t].exp(), ref[0, t].exp()
        want += (p / p_old) * torch.log(p / p_ref) * glogp
    assert torch.allclose(g, want, atol=1e-12)


# ---- log-probs from positions ----------------------------------------------------------------------------------
def test_completion_logprobs_follow_positions_not_token_values():
    m = tiny_model()
    prompts = [[5, 6, 7, 8, 9], [3], [0, 0, 2]]
    comps = [[0, 0, 1], [4, 0, 0, 0, 7], [0]]  # zeros everywhere: the pad value and (say) EOS are ordinary tokens
    batch = grpo.pack_rows(prompts, comps, CPU, pad_id=0)
    logp, mask = grpo.completion_logprobs(m, batch, temperature=0.7, chunk_rows=3)
    assert mask.tolist() == [[True] * 3 + [False] * 2, [True] * 5, [True] + [False] * 4]
    for b, (p, c) in enumerate(zip(prompts, comps)):  # each row alone, unpadded
        lp = torch.log_softmax(m(torch.tensor([p + c]))[0] / 0.7, -1)
        want = [lp[len(p) - 1 + j, c[j]].item() for j in range(len(c))]
        assert torch.allclose(logp[b, :len(c)], torch.tensor(want), atol=1e-5)
        assert (logp[b, len(c):] == 0).all()


def test_greedy_rollout_tokens_are_the_trainers_argmax():
    """generate() left-pads a batch of different prompt lengths; the trainer right-pads: same positions, same tokens."""
    m = tiny_model()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3], [12, 13, 14]]
    out, lens = m.generate(prompts, 6, temperature=0)
    comps = [out[b, :lens[b]].tolist() for b in range(3)]
    batch = grpo.pack_rows(prompts, comps, CPU)
    logp, mask, ent, kept = grpo.completion_logprobs(m, batch, temperature=1.0, top_k=1, extras=True)
    assert torch.equal(logp[mask], torch.zeros(int(mask.sum())))  # top-1 kept set = the greedy token, prob 1
    assert torch.equal(ent[mask], torch.zeros(int(mask.sum())))
    assert (grpo.unpack_bits(kept, 40).sum(1) == 1).all()


def test_pack_bits_round_trip():
    torch.manual_seed(1)
    for V in (8, 13, 50304 // 64):
        mask = torch.rand(7, V) < 0.3
        bits = grpo.pack_bits(mask)
        assert bits.dtype == torch.uint8 and bits.shape == (7, -(-V // 8))
        assert torch.equal(grpo.unpack_bits(bits, V), mask)


def rollout_batch(m, tok_eos, prompts, seed=0):
    torch.manual_seed(seed)
    rows, tokens, lengths = grpo.rollout(m, prompts, tok_eos)
    comps = [tokens[i, :lengths[i]].tolist() for i in range(len(rows))]
    return rows, comps


@pytest.mark.parametrize("top_k,top_p,ckpt_act", [(0, 1.0, False), (5, 1.0, True), (0, 0.8, False), (7, 0.9, True)])
def test_ratio_is_exactly_one_on_the_first_update(top_k, top_p, ckpt_act, use):
    m = tiny_model()
    m.cfg.checkpoint_activations = ckpt_act
    use(samples_per_prompt=4, max_new_tokens=9, temperature=0.8, top_k=top_k, top_p=top_p, micro_batch=5,
        logprob_chunk_rows=7, kl_coef=0.1, fuse_old_logprobs=False)
    rows, comps = rollout_batch(m, 39, [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]])
    adv = torch.randn(len(rows))
    ref = tiny_model(seed=1)
    mbs = grpo.prepare_microbatches(m, ref, rows, comps, adv)
    m.train()
    for mb in mbs:  # same code, same micro-batches, dropout-free: the new log-probs are the old ones, bit for bit
        logp, mask = grpo.logprobs(m, mb["batch"], mb["kept"])
        assert logp.requires_grad
        assert torch.equal(logp.detach()[mask], mb["old"][mask])
        assert torch.isfinite(mb["ref"][mask]).all()
    st = grpo.backward_on_batch(m, mbs, sum(map(len, comps)))
    assert st["abs_log_ratio"] == 0.0 and st["clip_low"] == 0 and st["clip_high"] == 0 and st["masked_seqs"] == 0


def test_keep_sampling_mask_renormalises_over_the_kept_set(use):
    m = tiny_model()
    use(samples_per_prompt=8, max_new_tokens=5, temperature=1.0, top_k=3, micro_batch=100, fuse_old_logprobs=False)
    rows, comps = rollout_batch(m, 39, [[1, 2, 3]])
    mbs = grpo.prepare_microbatches(m, None, rows, comps, torch.zeros(len(rows)))
    mb = mbs[0]
    assert (grpo.unpack_bits(mb["kept"], 40).sum(1) == 3).all()  # every sampled step kept exactly top-3
    full, mask = grpo.completion_logprobs(m, mb["batch"], 1.0)
    assert (mb["old"][mask] > full[mask]).all()  # renormalised over 3 tokens: more probable than under the full softmax
    use(keep_sampling_mask=False)  # the other choice: full-softmax log-probs, said in the config
    mbs2 = grpo.prepare_microbatches(m, None, rows, comps, torch.zeros(len(rows)))
    assert mbs2[0]["kept"] is None and torch.allclose(mbs2[0]["old"][mask], full[mask])


def test_micro_batches_accumulate_to_the_full_batch_gradient(use):
    m = tiny_model()
    use(samples_per_prompt=4, max_new_tokens=8, temperature=1.0, kl_coef=0.05, eps_low=0.1, eps_high=0.1, delta=0.02,
        fuse_old_logprobs=False)  # old log-probs of pi_old, then the policy moves: a later update's case
    rows, comps = rollout_batch(m, 39, [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10], [11, 12]])
    adv = torch.randn(len(rows))
    ref = tiny_model(seed=1)
    n_tokens = sum(map(len, comps))
    grads = []
    for mb_size in (len(rows), 5, 1):
        policy = tiny_model()
        use(micro_batch=mb_size)
        mbs = grpo.prepare_microbatches(policy, ref, rows, comps, adv)
        with torch.no_grad():  # move the policy off pi_old so clipping and the off-policy mask take part
            for p in policy.parameters():
                p.add_(0.05 * torch.randn_like(p))
        policy.zero_grad()
        st = grpo.backward_on_batch(policy, mbs, n_tokens)
        grads.append([p.grad.clone() for p in policy.parameters()])
        assert st["tokens"] == n_tokens
        if mb_size == len(rows):
            assert st["clip_low"] + st["clip_high"] > 0 and st["abs_log_ratio"] > 0
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def two_ways(use, key, values, **model_kw):
    """prepare_microbatches + backward_on_batch of one rollout batch with setting key = each value, from the same
    weights: -> {value: (micro-batches, stats with the entropy sum, grads, policy.hidden calls)}."""
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10], [11, 12]]
    use(**{key: values[0]})
    rows, comps = rollout_batch(tiny_model(**model_kw), 39, prompts)
    adv = torch.randn(len(rows), generator=torch.Generator().manual_seed(0))
    ref = tiny_model(seed=1, **model_kw)
    out = {}
    for v in values:
        policy, calls = tiny_model(**model_kw), []
        use(**{key: v})
        hidden = policy.hidden
        policy.hidden = lambda *a, **k: calls.append(1) or hidden(*a, **k)
        mbs = grpo.prepare_microbatches(policy, ref, rows, comps, adv)
        policy.train()
        st = grpo.backward_on_batch(policy, mbs, sum(map(len, comps)))
        out[v] = (mbs, st, [p.grad for p in policy.parameters()], len(calls))
    return out


def test_fused_old_logprobs_equal_the_two_pass_step_with_one_policy_forward_fewer(use):
    use(samples_per_prompt=4, max_new_tokens=8, temperature=0.9, kl_coef=0.05, micro_batch=5, logprob_chunk_rows=7)
    out = two_ways(use, "fuse_old_logprobs", (False, True))
    (mbs, st2, g2, n2), (mbs_f, st1, g1, n1) = out[False], out[True]
    assert mbs_f[0]["old"] is None and n2 == 2 * len(mbs) and n1 == len(mbs)  # old + update forwards vs the update's
    assert st1.keys() == st2.keys() and st1["entropy"] > 0
    for k in st1:
        assert math.isclose(st1[k], st2[k], rel_tol=1e-6, abs_tol=1e-9), k
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-9)
    # the whole step: every logged metric and the updated weights
    chars = sorted(set(" ABCD?:\nQ"))
    tok = load_tokenizer({"tokenizer": "char", "chars": chars, "vocab_size": len(chars) + 1, "eos_id": len(chars)})
    examples = [{"prompt": p, "task": "x"} for p in ("Q: A?\nA:", "Q: B?\nA:", "Q: ABCD?\nA:")]
    ref = tiny_model(vocab=tok.vocab_size, seed=1)
    runs = []
    for fuse in (False, True):
        policy = tiny_model(vocab=tok.vocab_size)
        opt = policy.configure_optimizer(1e-3, 0.0, (0.9, 0.99), "cpu")
        torch.manual_seed(5)
        use(samples_per_prompt=8, max_new_tokens=4, micro_batch=7, logprob_chunk_rows=4096, temperature=1.0,
            fuse_old_logprobs=fuse)
        m, _ = grpo.grpo_step(policy, ref, opt, tok, examples, 1e-3, reward_fn=lambda t, e: (float("C" in t), True))
        runs.append((m, list(policy.parameters())))
    (m2, p2), (m1, p1) = runs
    assert "skipped" not in m1 and m1.keys() == m2.keys()
    for k in m1:
        if not k.startswith("t_") and not k.endswith("tok_s"):
            assert math.isclose(m1[k], m2[k], rel_tol=1e-6, abs_tol=1e-9), k
    for a, b in zip(p1, p2):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-9)


def test_fused_old_logprobs_only_where_they_are_the_old_policys(monkeypatch):
    m = tiny_model()
    assert grpo.fuses_old_logprobs(m)
    assert not grpo.fuses_old_logprobs(tiny_model(dropout=0.1))  # train and eval forwards would differ
    for kw, fuses in (({"top_k": 5, "keep_sampling_mask": False}, True),  # full-softmax log-probs: no kept sets
                      ({"fuse_old_logprobs": False}, False), ({"updates_per_batch": 2}, False), ({"top_k": 5}, False),
                      ({"top_p": 0.9}, False)):
        with monkeypatch.context() as mp:
            for k, v in kw.items():
                mp.setattr(grpo, k, v)
            assert grpo.fuses_old_logprobs(m) == fuses, kw


def test_right_padding_changes_no_logprob():
    m = tiny_model()
    prompts, comps = [[5, 6, 7, 8, 9], [3], [1, 2]], [[0, 0, 1], [4, 0, 0, 0, 7], [2]]
    plain = grpo.pack_rows(prompts, comps, CPU)
    padded = grpo.pack_rows(prompts, comps, CPU, multiple=64, max_len=256)
    seqs = plain["seqs"]
    assert seqs.shape[1] == 8 and padded["seqs"].shape[1] == 64 and torch.equal(padded["seqs"][:, :8], seqs)
    assert grpo.pack_rows(prompts, comps, CPU, multiple=64, max_len=20)["seqs"].shape[1] == 20  # never past the context
    a, mask = grpo.completion_logprobs(m, plain, 0.8)
    b, mask_b = grpo.completion_logprobs(m, padded, 0.8)
    assert torch.equal(mask, mask_b) and torch.allclose(a, b, atol=1e-6, rtol=0)


def test_compiled_forward_matches_eager(use):
    """compile=True (inductor on the CPU): the old, reference and update forwards and their head chunks through
    torch.compile, rows padded to a multiple of 16, agree with eager ones, two-pass and fused."""
    use(samples_per_prompt=4, max_new_tokens=8, kl_coef=0.05, micro_batch=8, fuse_old_logprobs=False)
    out = two_ways(use, "compile", (False, True), n_layer=1)  # one block: half the tracing
    (mbs_e, st_e, g_e, _), (mbs_c, st_c, g_c, _) = out[False], out[True]
    assert mbs_c[0]["batch"]["seqs"].shape[1] % 16 == 0 and mbs_e[0]["batch"]["seqs"].shape[1] % 16 != 0
    for a, b in zip(mbs_e, mbs_c):
        assert torch.allclose(a["old"], b["old"], atol=1e-5) and torch.allclose(a["ref"], b["ref"], atol=1e-5)
    for k in st_e:
        assert math.isclose(st_e[k], st_c[k], rel_tol=1e-5, abs_tol=1e-7), k
    for a, b in zip(g_e, g_c):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    # fused old log-probs: the compiled head chunk returns the entropy beside log-probs that carry gradients
    use(fuse_old_logprobs=True, temperature=0.9)
    out = two_ways(use, "compile", (False, True), n_layer=1)
    (_, st_e, g_e, _), (_, st_c, g_c, _) = out[False], out[True]
    assert st_c["entropy"] > 0
    for k in st_e:
        assert math.isclose(st_e[k], st_c[k], rel_tol=1e-5, abs_tol=1e-7), k
    for a, b in zip(g_e, g_c):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


# ---- rollouts and scoring ----------------------------------------------------------------------------------------
def char_tok(text):
    return load_tokenizer(grpo.char_meta([text]))


def test_score_cuts_at_eos_and_stop_strings(use):
    tok = char_tok("Q: 1+2=\nA: 3 x")
    eos = tok.eos_id
    enc = tok.encode
    rows = [enc(" 3") + [eos] + [eos] * 5,  # EOS: finished, EOS kept in the trained tokens
            enc(" 3\nQ: 1+1") + [eos],  # a stop string before EOS: cut just after it
            enc(" 3 3 3 3 3"),  # ran out of tokens: truncated
            enc(" x\nQ") + [eos] * 4]
    lengths = torch.tensor([3, 9, 10, 4])
    width = max(len(r) for r in rows)
    tokens = torch.tensor([r + [eos] * (width - len(r)) for r in rows])
    ex = {"task": "addition", "answer": "3", "prompt": "Q: 1+2=\nA:"}
    use(samples_per_prompt=4, max_new_tokens=10)
    s = grpo.score(tok, [ex], tokens, lengths)  # training's reward: tasks.grade of the example's task
    assert s["completion"][0] == enc(" 3") + [eos] and s["finished"][0]
    assert s["completion"][1] == enc(" 3\nQ:") and s["finished"][1] and s["text"][1] == " 3\nQ:"
    assert s["completion"][2] == enc(" 3 3 3 3 3") and not s["finished"][2]
    assert s["reward"] == [1.0, 1.0, 1.0, 0.0] and s["parsable"] == [True, True, True, False]
    assert s["raw_len"] == [3, 9, 10, 4]


def score_reference(tok, examples, tokens, lengths, G, cut, reward_fn):
    """grpo.score() as it was: one sample at a time (a slice + tolist per row, every sample decoded and rewarded)."""
    def dec(ids):
        return tok.decode([t for t in ids if t < tok.vocab_size and t != tok.eos_id])

    def stop_len(ids):  # the shortest prefix holding a stop string, by a linear scan (score() bisects)
        stops = (k for k in range(1, len(ids) + 1) if any(st in dec(ids[:k]) for st in tasks.STOP_STRINGS))
        return next(stops, len(ids))
    s = {k: [] for k in ("completion", "text", "reward", "parsable", "finished", "raw_len")}
    for i in range(len(tokens)):
        n = int(lengths[i])
        ids = tokens[i, :n].tolist()
        finished = ids[-1] == tok.eos_id
        body = ids[:-1] if finished else ids
        text = dec(body)
        if cut and any(st in text for st in tasks.STOP_STRINGS):
            k = stop_len(body)
            if k < len(body):
                ids, finished, text = body[:k], True, dec(body[:k])
        r, parsable = reward_fn(text, examples[i // G])
        for key, v in zip(s, (ids, text, float(r), bool(parsable), finished, n)):
            s[key].append(v)
    s["repetition"] = [tasks.has_runaway_repetition(c) for c in s["completion"]]
    return s


SCORE_TEXTS = [" B", " The answer is C.\nQuestion: A 30-year-old man", " D", "\nQ: why", "\nQuestion:",
               " B B B B B B B B B B B B B B", " A", " C", " 48/2 = 24 clips. 48+24 = 72\n#### 72",
               " #### 71\nQuestion: what",
               " 72<|endoftext|> and more", " 72", " The answer is 72.\nQ:", "Answer: (b) beta blocker, because"]
GPT2_FILE = os.path.join(os.path.dirname(ROOT), "shared", "data", "gpt2.tiktoken")


@pytest.mark.parametrize("kind", ["char", pytest.param("gpt2", marks=pytest.mark.skipif(
    not os.path.isfile(GPT2_FILE), reason="../shared/data/gpt2.tiktoken absent (the GPT-2 tokenizer offline)"))])
@pytest.mark.parametrize("cut", [True, False])
def test_score_equals_the_per_sample_reference(kind, cut, monkeypatch, use):
    """score() (one tolist for the batch, a prompt's repeated samples scored once, the batched repetition check)
    gives exactly the per-sample loop's lists, types included: EOS (alone, inside, last), stop strings at the start,
    middle and end, ids beyond the vocab, repeats within and across groups, MedQA and GSM8K rewards."""
    if kind == "gpt2":
        monkeypatch.setenv("TIKTOKEN_GPT2_FILE", GPT2_FILE)
        tok = load_tokenizer({"tokenizer": "gpt2", "vocab_size": 50257, "eos_id": 50256})
    else:
        tok = char_tok("".join(SCORE_TEXTS))
    eos, V, e = tok.eos_id, tok.vocab_size, lambda i: tok.encode(SCORE_TEXTS[i])
    opts = {"A": "aspirin", "B": "beta blocker", "C": "calcium", "D": "digoxin"}
    examples = [{"task": "medqa", "answer": "B", "options": opts}, {"task": "gsm8k", "answer": "72"},
                {"task": "medqa", "answer": "C", "options": opts}, {"task": "gsm8k", "answer": "71"}]
    mcq = [e(0) + [eos], e(0) + [eos], e(1), [eos], e(2) + [V + 5] + e(3) + [eos], e(4), e(5),
           e(6) + [eos] + e(7) + [eos], e(13) + [eos], [V + 1] + e(0) + e(1)]
    gsm = [e(8) + [eos], e(8) + [eos], e(9), e(10), [V + 1, V + 2] + e(11), e(12) + [eos], [eos], e(11) + [eos],
           e(9) + [eos], e(12)]
    g = torch.Generator().manual_seed(0)
    noise = [torch.randint(0, V, (n,), generator=g).tolist() for n in (3, 7, 12)]
    groups = [mcq + noise, gsm + noise, mcq + noise, gsm + noise]  # groups 3 and 4: the same rows, other answers
    rows = [r for grp in groups for r in grp]
    width = max(map(len, rows)) + 4
    tokens = torch.tensor([r + torch.randint(0, V + 8, (width - len(r),), generator=g).tolist() for r in rows])
    lengths = torch.tensor([len(r) for r in rows])
    use(samples_per_prompt=len(groups[0]), cut_at_stop_strings=cut)

    def reward_fn(text, ex):  # ints: score() makes them float and bool
        r, parsable = tasks.grade(ex["task"], text, ex)
        return int(r), int(parsable)
    got = grpo.score(tok, examples, tokens, lengths, reward_fn)
    want = score_reference(tok, examples, tokens, lengths, len(groups[0]), cut, reward_fn)
    assert list(got) == list(want)
    for k in want:
        assert got[k] == want[k], k
        assert [type(v) for v in got[k]] == [type(v) for v in want[k]], k
    assert len({id(ids) for ids in got["completion"]}) == len(rows)  # repeats share no list
    # the cases reach what they are meant to: both rewards, unparsable, cut or not, repetition
    assert {0.0, 1.0} <= set(want["reward"]) and not all(want["parsable"]) and any(want["repetition"])
    cuts = sum(len(ids) < n and ids[-1:] != [eos] for ids, n in zip(want["completion"], want["raw_len"]))
    assert (cuts > 4) if cut else (cuts == 0)


# ---- learning -----------------------------------------------------------------------------------------------------
def test_tiny_random_policy_learns_to_always_answer_C(use):
    chars = sorted(set(" ABCD?:\nQ"))
    tok = load_tokenizer({"tokenizer": "char", "chars": chars, "vocab_size": len(chars) + 1, "eos_id": len(chars)})
    torch.manual_seed(0)
    policy = GPT(make_config("debug", vocab_size=tok.vocab_size)).eval()
    ref = GPT(make_config("debug", vocab_size=tok.vocab_size)).eval()
    ref.load_state_dict(policy.state_dict())
    ref.requires_grad_(False)
    opt = policy.configure_optimizer(3e-3, 0.0, (0.9, 0.99), "cpu")
    examples = [{"prompt": p, "task": "x"} for p in ("Q: A?\nA:", "Q: B?\nA:", "Q: D?\nA:", "Q: ABCD?\nA:")]
    use(samples_per_prompt=16, max_new_tokens=1, micro_batch=64, kl_coef=0.01)
    reward_fn = lambda text, ex: (float(text.strip() == "C"), True)

    def sampled_accuracy():
        torch.manual_seed(123)
        use(samples_per_prompt=64)
        rows, tokens, lengths = grpo.rollout(policy, [tok.encode(e["prompt"]) for e in examples], tok.eos_id)
        use(samples_per_prompt=16)
        return sum(tok.decode(tokens[i, :1].tolist()) == "C" for i in range(len(rows))) / len(rows)

    before = sampled_accuracy()
    assert before < 0.3  # about chance: 1 of 10 tokens
    history = []
    for step in range(60):
        m, _ = grpo.grpo_step(policy, ref, opt, tok, examples, 3e-3, reward_fn=reward_fn)
        history.append(m)
        if m["reward_mean"] > 0.97:  # every group right: no signal left, no update
            break
    after = sampled_accuracy()
    assert after >= 0.9, (before, after, [round(h["reward_mean"], 2) for h in history])
    assert history[0]["reward_mean"] < 0.3 and max(h.get("kl", 0) for h in history) > 0  # moved off the reference


# ---- the script: debug run, eval_only, exact resume -----------------------------------------------------------------
def run_grpo(*args, cwd, ok=True):
    """grpo.py config/grpo_debug.py *args -> stdout; ok=False: it must fail -> (stdout, its last stderr line)."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "grpo.py"), os.path.join(ROOT, "config", "grpo_debug.py"),
                        *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert (r.returncode == 0) == ok, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout if ok else (r.stdout, r.stderr.strip().splitlines()[-1])


SMALL = ["--eval_n=8", "--eval_every=0", "--prompts_per_step=4", "--samples_per_prompt=4", "--max_steps=20"]


def finite_checkpoint(path):
    ckpt = load_checkpoint(path)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    return ckpt


def test_absurd_lr_stops_in_one_line_leaving_a_finite_checkpoint(tmp_path):
    """lr 1e30 breaks the weights in one update (finite, but their logits are not): the next generate() refuses them;
    the run stops with one line naming the last checkpoint, which holds finite weights."""
    out, last = run_grpo(*SMALL, f"--out_dir={tmp_path}", "--lr=1e30", "--grad_clip=0", "--warmup_steps=1",
                         "--save_every=1", cwd=tmp_path, ok=False)
    m = re.fullmatch(r"stopping after step (\d+): the policy's logits are NaN or inf \(an update broke its weights: "
                     r"lr too high\?\); the last checkpoint written: (.*) \(step (\d+)\)", last)
    assert m and m[2] == f"{tmp_path}/ckpt.pt", last
    assert finite_checkpoint(m[2])["step"] == int(m[3]) <= int(m[1])


def test_non_finite_steps_are_counted_logged_and_stop_the_run(tmp_path):
    """kl_coef 1e39 is inf in float32: inf x a KL of 0 makes every loss NaN. Each such update is skipped, said on
    stdout and in log.jsonl, and max_bad_steps of them in a row stop the run with the weights the last good update
    left, checkpointed."""
    out, last = run_grpo(*SMALL, f"--out_dir={tmp_path}", "--kl_coef=1e39", "--max_bad_steps=3", cwd=tmp_path, ok=False)
    assert out.count("update skipped") == 3 and "update skipped (3 in a row)" in out
    recs = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    skipped = [r["step"] for r in recs if r.get("skipped")]
    assert len(skipped) == 3 and math.isnan(recs[-1]["loss"])
    assert last == (f"stopping: 3 non-finite steps in a row; the last checkpoint written: {tmp_path}/ckpt.pt "
                    f"(step {skipped[-1]})")
    assert finite_checkpoint(tmp_path / "ckpt.pt")["step"] == skipped[-1] == recs[-1]["step"]


def test_out_of_gpu_memory_ends_in_one_line(tmp_path):
    """The third update's gradient clip runs out of GPU memory: one line, no traceback, naming the last checkpoint
    and what to lower."""
    (tmp_path / "patch").mkdir()
    (tmp_path / "patch" / "sitecustomize.py").write_text(
        "import torch\nreal, calls = torch.nn.utils.clip_grad_norm_, [0]\n"
        "def clip(*args, **kwargs):\n    calls[0] += 1\n"
        "    if calls[0] == 3:\n"
        "        raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 9.00 GiB.')\n"
        "    return real(*args, **kwargs)\ntorch.nn.utils.clip_grad_norm_ = clip\n")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "grpo.py"), os.path.join(ROOT, "config", "grpo_debug.py"),
                        *SMALL, f"--out_dir={tmp_path}", "--save_every=1"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "patch"), ROOT])})
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    m = re.fullmatch(r"out of GPU memory after step (\d+); the last checkpoint written: (.*) \(step (\d+)\): lower "
                     r"micro_batch \(the same gradient at any size\) or rollout_batch \(CUDA out of memory\. Tried to "
                     r"allocate 9\.00 GiB\.\)", r.stderr.strip().splitlines()[-1])
    assert m and m[2] == f"{tmp_path}/ckpt.pt" and m[1] == m[3], r.stderr[-500:]
    assert finite_checkpoint(m[2])["step"] == int(m[3])


def test_failed_checkpoint_writes_stop_the_run(tmp_path):
    (tmp_path / "ckpt.pt").mkdir()  # a directory where the checkpoint goes: every write fails
    out, last = run_grpo(*SMALL, f"--out_dir={tmp_path}", "--save_every=1", cwd=tmp_path, ok=False)
    assert out.count("WARNING: could not write") == 3
    assert last == "stopping: 3 checkpoint writes in a row failed; the last checkpoint written: none written"


def test_user_errors_name_the_real_problem(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    _, last = run_grpo("--task=medqa", f"--train_data={empty}", cwd=tmp_path, ok=False)
    assert last == f"no training prompts in {empty}"
    _, last = run_grpo("--eval_task=medqa", f"--eval_data={empty}", cwd=tmp_path, ok=False)
    assert last == f"no evaluation examples in {empty}"
    for arg, said in (("--rollout_batch=0", "rollout_batch must be at least 1, not 0"),
                      ("--eval_mode=bad", "eval_mode must be 'loglik', 'generate' or 'both', not 'bad'"),
                      ("--lr=-1e-05", "lr must not be negative, not -1e-05"),
                      ("--samples_per_prompt=1", "samples_per_prompt must be at least 2, not 1"),
                      (f"--out_dir={empty}/x", f"cannot create out_dir {empty}/x: Not a directory")):
        _, last = run_grpo(arg, cwd=tmp_path, ok=False)
        assert last.endswith(said), last
    torch.manual_seed(0)
    meta = grpo.char_meta(["Q: 1+2=\nA: 3"])
    pretrained = {"model_config": asdict(make_config("debug", vocab_size=meta["vocab_size"])), "kind": "pretrain",
                  "model": GPT(make_config("debug", vocab_size=meta["vocab_size"])).state_dict(), "tokenizer": meta}
    assert save_checkpoint(str(tmp_path / "ckpt.pt"), pretrained)
    _, last = run_grpo("--init_from=resume", f"--out_dir={tmp_path}", cwd=tmp_path, ok=False)
    path = tmp_path / "ckpt.pt"
    _, spell = run_grpo(f"--init_from={path}", f"--out_dir={tmp_path / 'g'}", cwd=tmp_path, ok=False)  # 4-9 unseen
    assert re.fullmatch(rf"{path}'s tokenizer cannot encode the addition / addition prompts \(character '\d' is not "
                        r"in the char vocabulary\): pretrain on text that covers them, or with the gpt2 tokenizer",
                        spell)
    assert last == (f"--init_from=resume needs a grpo.py checkpoint in out_dir; {path} is a train.py checkpoint "
                    f"(kind 'pretrain'): start with --init_from={path}")


def test_a_bad_prompt_file_is_one_line_with_file_and_line(tmp_path):
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    row = '{"question": "Largest bone?", "options": {"A": "femur", "B": "ulna"}, "answer_idx": "A"}\n'
    good.write_text(row)
    bad.write_text(row + '{"question": "cut off\n')
    for train_data, eval_data in ((bad, good), (good, bad)):
        _, last = run_grpo("--task=medqa", "--eval_task=medqa", f"--train_data={train_data}",
                           f"--eval_data={eval_data}", cwd=tmp_path, ok=False)
        assert last.startswith(f"{bad}:2: bad JSON ("), last


def test_debug_run_resumes_exactly_and_logs_every_metric(tmp_path):
    common = ["--train_n=500", "--eval_n=20", "--eval_every=0", "--prompts_per_step=4", "--samples_per_prompt=4",
              "--micro_batch=7", "--updates_per_batch=2"]
    straight, split = str(tmp_path / "a"), str(tmp_path / "b")
    run_grpo(*common, f"--out_dir={straight}", "--max_steps=3", "--save_every=10", cwd=tmp_path)
    run_grpo(*common, f"--out_dir={split}", "--max_steps=2", "--save_every=10", cwd=tmp_path)
    out = run_grpo(*common, f"--out_dir={split}", "--max_steps=3", "--save_every=10", "--init_from=resume",
                   cwd=tmp_path)
    assert "step 3/3" in out and "step 1/3" not in out
    a, b = load_checkpoint(os.path.join(straight, "ckpt.pt")), load_checkpoint(os.path.join(split, "ckpt.pt"))
    assert a["kind"] == b["kind"] == "grpo" and a["step"] == b["step"] == 3 and a["data_state"] == b["data_state"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    load_model(b)  # the same format train.py writes: loadable by sample.py / eval.py as is
    recs = [json.loads(line) for line in open(os.path.join(straight, "log.jsonl"))]
    trained = [r for r in recs if "loss" in r]
    for key in ("reward_mean", "reward_std", "accuracy", "frac_zero_std", "len_mean", "len_max", "truncated",
                "clip_low", "clip_high", "kl", "masked_frac", "entropy", "rollout_tok_s", "train_tok_s", "grad_norm"):
        assert key in trained[0], key
    assert "eval_generate_acc" in recs[0] and "eval_generate_acc" in recs[-1]
    assert os.path.getsize(os.path.join(straight, "reward_curve.png")) > 1000


def test_eval_only_and_config_errors(tmp_path):
    (tmp_path / "ckpt.pt.tmp4242").write_bytes(b"a save in progress")  # out_dir's run may still be training
    out = run_grpo("--eval_only=True", "--eval_n=10", f"--out_dir={tmp_path}", cwd=tmp_path)
    res = json.load(open(os.path.join(tmp_path, "eval.json")))
    assert res["eval_generate_n"] == 10 and 0 <= res["eval_generate_acc"] <= 1 and "eval step 0" in out
    assert (tmp_path / "ckpt.pt.tmp4242").exists()  # eval_only leaves a live run's temporary files alone
    _, last = run_grpo("--task=medqa", "--train_data=/nonexistent.jsonl", cwd=tmp_path, ok=False)
    assert "no data file /nonexistent.jsonl" in last
    _, last = run_grpo("--temperture=1.0", cwd=tmp_path, ok=False)
    assert "unknown key 'temperture'" in last


def test_shared_prompt_rows_equal_a_row_per_sample(use):
    """share_prompts: a prompt's samples in one row (the prompt once, each completion after it at the same positions,
    seeing the prompt and itself) give every sample's log-probs and entropies, and the step's stats and gradients, of
    a row per sample."""
    use(samples_per_prompt=4, max_new_tokens=8, temperature=0.9, kl_coef=0.05, micro_batch=7, fuse_old_logprobs=False)
    out = two_ways(use, "share_prompts", (0, 512, 20))  # 20: rows of at most 20 tokens, so a prompt spans several rows
    rows = {v: sum(len(mb["batch"]["seqs"]) for mb in out[v][0]) for v in out}
    assert rows[512] < rows[20] < rows[0] == 16 and out[0][0][0]["batch"]["layout"] is None
    for v in (512, 20):
        for k in out[0][1]:
            assert math.isclose(out[0][1][k], out[v][1][k], rel_tol=1e-5, abs_tol=1e-7), (v, k)
        for a, b in zip(out[0][2], out[v][2]):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    m = tiny_model()
    prompts = [[1, 2, 3], [4], [1, 2, 3], [4], [1, 2, 3]]
    comps = [[5, 6], [7, 8, 9], [10], [11, 12, 13, 14], [15, 16, 17]]
    lp0, mask0, ent0, _ = grpo.completion_logprobs(m, grpo.pack_rows(prompts, comps, CPU), 0.9, extras=True)
    shared = grpo.pack_rows(prompts, comps, CPU, share=64)
    assert len(shared["seqs"]) == 2
    lp, mask, ent, _ = grpo.completion_logprobs(m, shared, 0.9, extras=True)
    assert torch.equal(mask, mask0) and torch.allclose(lp, lp0, atol=1e-5) and torch.allclose(ent, ent0, atol=1e-5)


def test_packed_mask_tiles_for_flex_attention():
    """packed_mask(flex=True): a BlockMask whose listed 128 x 128 tiles are exactly those the dense mask touches,
    split into full tiles (all allowed: run without the mask) and partial ones (the mask applied); none listed twice."""
    seg = torch.tensor([[0] * 200 + [1] * 50 + [2] * 50, [0] * 40 + [1] * 130 + [2] * 100 + [-1] * 30])
    dense = packed_mask(seg)[:, 0]
    bm = packed_mask(seg, flex=True)
    tiles = torch.nn.functional.pad(dense, (0, 84, 0, 84)).view(2, 3, 128, 3, 128)
    touched, whole = tiles.any(4).any(2), tiles.all(4).all(2)

    def listed(num, idx):  # (B, 1, n) counts and (B, 1, n, n) indexes -> (B, n, n) bool
        out = torch.zeros(2, 3, 3, dtype=torch.bool)
        for b in range(2):
            for q in range(3):
                out[b, q, idx[b, 0, q, :num[b, 0, q]].long()] = True
        return out
    partial, full = listed(bm.kv_num_blocks, bm.kv_indices), listed(bm.full_kv_num_blocks, bm.full_kv_indices)
    assert torch.equal(full, whole) and torch.equal(partial | full, touched) and not (partial & full).any()
    assert full[0, 1, 0] and not touched[0, 0, 2] and full.any() and not touched.all()  # the case has all three kinds
    q, kv = torch.meshgrid(torch.arange(300), torch.arange(300), indexing="ij")
    assert torch.equal(bm.mask_mod(torch.tensor(1), 0, q, kv), dense[1])  # the mask_mod is the dense rule


def test_pack_rows_shares_a_prompt_within_the_row_limit():
    prompts = [[1, 2], [3], [1, 2], [1, 2]]
    comps = [[5, 6, 7], [8], [9], [10, 11]]
    b = grpo.pack_rows(prompts, comps, CPU, share=6)  # 2 + 6 tokens > 6: two rows of [1, 2], samples split 1 + 2
    assert b["seqs"].tolist() == [[1, 2, 5, 6, 7], [1, 2, 9, 10, 11], [3, 8, 0, 0, 0]]
    seg, pos = b["layout"]
    assert seg.tolist() == [[0, 0, 1, 1, 1], [0, 0, 1, 2, 2], [0, 1, -1, -1, -1]]
    assert pos[1].tolist() == [0, 1, 2, 2, 3]  # the second completion starts right after the prompt again
    assert packed_mask(seg)[1, 0, 3].tolist() == [True, True, False, True, False]  # it sees the prompt and itself
    flat = b["seqs"].view(-1)
    assert flat[b["tgt"]].tolist() == [5, 6, 7, 8, 9, 10, 11]  # sample by sample, in the caller's order
    assert b["src"].tolist() == [1, 2, 3, 10, 6, 6, 8]  # token 0 of each completion from its prompt's last position
    assert grpo.pack_rows(prompts, comps, CPU, share=64)["seqs"].shape == (2, 8)  # under the limit: one row per prompt


def test_a_killed_saves_temporary_file_is_removed_at_the_next_start(tmp_path):
    (tmp_path / "ckpt.pt.tmp4242").write_bytes(b"half a checkpoint")  # what kill -9 during torch.save leaves
    out = run_grpo(*SMALL[:4], "--max_steps=1", f"--out_dir={tmp_path}", cwd=tmp_path)
    assert "removed 1 unfinished checkpoint file(s)" in out and not (tmp_path / "ckpt.pt.tmp4242").exists()
    assert finite_checkpoint(tmp_path / "ckpt.pt")["step"] == 1
