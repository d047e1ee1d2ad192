"""engine.py on the CPU: batched generation against full forwards, the Engine's kept cache, sampling, compiled
decoding, shared prefills, errors."""
import pytest
import torch

import engine
import model as M
from engine import KVCache
from test_model import tiny


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


def test_engine_keeps_its_cache_and_decodes_like_a_fresh_generate():
    """Engine, as GRPO's rollouts use it: the second call with as many rows reuses the first call's cache (its slots
    rounded up to 128, the stale K/V of the first prompts still in them, masked; the prompts left-padded to a multiple
    of 32 tokens) and gives generate()'s greedy tokens; a call that needs more slots replaces it, and that longer cache
    serves shorter prompts; another batch size replaces it; a cast of the model's weights replaces it."""
    m = tiny()
    eng = engine.Engine(m)
    first = [[5, 6, 7, 8, 9, 10, 11], [3], [100, 200, 300]]
    second = [[9, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [42]]  # other lengths, so other left padding
    kept_first, _ = eng.generate(first, 12, temperature=0)
    cache = eng.cache
    assert cache.k.shape[1] == 3 and cache.k.shape[3] == 128
    assert cache.pad.tolist() == [32 - 7, 32 - 1, 32 - 3] and cache.length == 32 + 11  # prompts padded to 32
    kept_second, _ = eng.generate(second, 12, temperature=0)
    assert eng.cache is cache  # the same tensors: no new cache, no new capture
    for prompts, kept in ((first, kept_first), (second, kept_second)):
        assert torch.equal(kept, engine.generate(m, prompts, 12, temperature=0)[0])
    assert eng.cache is cache  # plain generate() calls leave it alone
    eng.generate([[7] * 130, [1, 2], [3]], 12, temperature=0)  # 142 slots: a 256-slot cache replaces it
    cache256 = eng.cache
    assert cache256.k.shape[3] == 256
    again, _ = eng.generate(second, 12, temperature=0)  # 22 slots: the longer kept cache serves
    assert eng.cache is cache256 and torch.equal(again, kept_second)
    eng.generate(second[:2], 12, temperature=0)
    assert eng.cache.k.shape[1:4:2] == (2, 128)  # one cache per engine: the other went
    cache2 = eng.cache
    m.to(torch.bfloat16)
    bf16, _ = eng.generate(second[:2], 12, temperature=0)
    assert eng.cache is not cache2 and eng.cache.k.dtype == torch.bfloat16
    m.float()
    eng.generate(second[:2], 12, temperature=0)
    assert eng.cache.k.dtype == torch.float32
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
    assert torch.isinf(engine.filter_logits(logits, top_k=2)[0, :2]).all()
    # probabilities ~ [0.03, 0.09, 0.24, 0.64]: top_p 0.7 keeps the two largest
    kept = ~torch.isinf(engine.filter_logits(logits, top_p=0.7))
    assert kept.tolist() == [[False, False, True, True]]
    g = torch.Generator().manual_seed(0)
    draws = [engine.sample_next(logits, 1.0, top_k=1, generator=g).item() for _ in range(5)]
    assert draws == [3] * 5


def test_sampling_draws_what_multinomial_draws():
    """sample_next's draw without torch.multinomial (whose check synced with the GPU every step) gives multinomial's
    very tokens from the same generator state, here over 64 rows x 5 draws."""
    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(1)) * 3
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for _ in range(5):
        want = torch.multinomial(torch.softmax(logits, -1), 1, generator=g1).squeeze(1)
        assert torch.equal(engine.sample_next(logits, 1.0, generator=g2), want)
    assert engine.sample_next(logits, 1.0).unique().numel() > 30  # sampled, not argmax


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
    fn = engine.decode_block_fn(compiled)
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


def test_generation_with_bf16_weights():
    m = tiny().to(torch.bfloat16)
    assert m.rope_cos.dtype == torch.float32  # RoPE tables stay float32 under a cast
    out, lengths = m.generate([[1, 2, 3], [4]], 5, temperature=0)
    assert out.shape == (2, 5) and lengths.tolist() == [5, 5]
    again, _ = m.generate([[1, 2, 3], [4]], 5, temperature=0, use_cache=False)
    assert torch.equal(out, again)


def test_compiled_prefill_gives_the_eager_tokens():
    """generate(compile=True): the prompt block through torch.compile (inductor on the CPU) writes the
    same KV cache, so greedy decoding continues to the same tokens, for two prompt-block shapes."""
    m = tiny()
    for prompts in ([[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]], [[3] * 9, [4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]]):
        eager, n_eager = m.generate(prompts, 6, temperature=0)
        compiled, n_compiled = m.generate(prompts, 6, temperature=0, compile=True)
        assert torch.equal(eager, compiled) and torch.equal(n_eager, n_compiled)


def test_repeated_prompts_share_one_prefill(monkeypatch):
    """GRPO's G samples of a prompt: generate() prefills each distinct (prompt, padding) once and copies its K/V to
    the repeats; greedy tokens equal those of the prompts generated once each."""
    m = tiny()
    prompts = [[1, 2, 3, 4, 5], [0, 7], [7], [1, 2, 3, 4, 5], [0, 7], [0, 7]]  # [0, 7] and [7] pad to the same ids
    once, n_once = m.generate(prompts[:3], 6, temperature=0, eos_id=0)
    rows = []
    real = M.GPT.hidden
    monkeypatch.setattr(M.GPT, "hidden",
                        lambda self, idx, cache=None, **kw: rows.append(idx.shape[0]) or real(self, idx, cache, **kw))
    shared, n_shared = m.generate(prompts, 6, temperature=0, eos_id=0)
    assert rows[0] == 3  # the prefill ran the three distinct rows, then decoding steps all six
    assert torch.equal(shared, once[[0, 1, 2, 0, 1, 1]]) and torch.equal(n_shared, n_once[[0, 1, 2, 0, 1, 1]])
