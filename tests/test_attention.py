"""attention.py on the CPU: the Triton decoding kernel under its interpreter against float32 softmax attention,
decode_attend, the flash-attn glue and the switch's errors.

The interpreter (TRITON_INTERPRET=1, read when triton.jit wraps the kernel, so it is set before the kernel is built)
runs the kernel in numpy. Its tl.dot multiplies bfloat16 as raw uint16 bits, so these tests feed float16; bfloat16
is checked on the GPU by dev/gpu_checks.py against decode_attend."""
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (and before the kernel is built)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
import attention  # noqa: E402
import torch.nn.functional as F  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _numpy_2_4_shim():
    """numpy >= 2.4 refuses int() of a one-element array, which the interpreter's tensor.__index__ does for a loop
    bound such as range(0, S, BLOCK_S) (triton-lang/triton#9171, fixed upstream with .squeeze())."""
    from triton.runtime import interpreter
    original = getattr(interpreter, "_patch_lang_tensor", None)
    try:
        int(np.ones(1))
        needed = False
    except TypeError:
        needed = original is not None
    if needed:
        def patched(tensor, *args):
            original(tensor, *args)
            tensor.__index__ = lambda self: int(self.handle.data.squeeze())
        interpreter._patch_lang_tensor = patched
    yield
    if needed:
        interpreter._patch_lang_tensor = original


def reference(q, k, v, key_mask):
    """softmax(q k^T / sqrt(D)) v in float32 from the same half-precision inputs, masked slots at -inf."""
    q, k, v = q.float(), k.float(), v.float()
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def check(B, Hkv, R, D, S, key_mask=None, **kw):
    g = torch.Generator().manual_seed(B * 1000 + R * 100 + D + S)
    q = torch.randn(B, Hkv, R, D, generator=g).half()
    k, v = (torch.randn(B, Hkv, S, D, generator=g).half() for _ in range(2))
    if key_mask is None:
        key_mask = torch.ones(B, S, dtype=torch.bool)
    out = attention.decode_attention(q, k, v, key_mask, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    ref = reference(q, k, v, key_mask)
    assert ref.abs().max() > 0.1  # the outputs are not all ~0, so a broken kernel cannot pass by being small
    diff = (out.float() - ref).abs().max().item()
    assert diff < 5e-3, diff  # float16 inputs and probabilities (observed ~5e-4)


@pytest.mark.parametrize("B, Hkv, R, D, S", [
    (3, 2, 4, 72, 37),  # medium-large's head shape (D padded to 128, R to 16)
    (2, 3, 1, 64, 1),  # one query head per KV head, one slot
    (2, 2, 4, 128, 130),  # three S blocks, the last one partial
    (1, 2, 8, 16, 20),
    (1, 1, 2, 256, 65),
])
def test_matches_float32_reference(B, Hkv, R, D, S):
    check(B, Hkv, R, D, S)


@pytest.mark.parametrize("block_s", [16, 64])
def test_left_padding(block_s):
    """Rows start at different slots (GRPO's left-padded prompts); one row sees only its last slot, so whole
    leading blocks are masked (the running max stays -inf there and must not make NaN)."""
    S = 130
    start = torch.tensor([0, 5, 64, 129])
    key_mask = torch.arange(S)[None, :] >= start[:, None]
    check(4, 2, 4, 72, S, key_mask=key_mask, block_s=block_s)


def test_holes_in_the_mask():
    """Not only a prefix: every third slot masked, plus the first 10."""
    S = 100
    key_mask = (torch.arange(S) % 3 != 0) & (torch.arange(S) >= 10)
    check(2, 2, 4, 72, S, key_mask=key_mask.expand(2, S).clone())


def test_bad_shapes_are_refused():
    q = torch.zeros(1, 2, 4, 16).half()
    k = torch.zeros(1, 2, 8, 16).half()
    with pytest.raises(ValueError):
        attention.decode_attention(q, k, k, torch.ones(1, 7, dtype=torch.bool))


def test_available_without_triton(monkeypatch):
    assert attention.available()
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton now raises ImportError
    attention.available.cache_clear()
    assert not attention.available()
    attention.available.cache_clear()  # the next caller looks again, with triton back


def test_blocks_without_a_visible_slot_are_not_read():
    """An Engine's kept cache is longer than what a row has written: blocks that no row may see are skipped, not
    read and masked. NaN in those blocks' K and V would otherwise reach the output (0 x NaN)."""
    B, Hkv, R, D, S = 2, 2, 4, 72, 200
    g = torch.Generator().manual_seed(7)
    q = torch.randn(B, Hkv, R, D, generator=g).half()
    k, v = (torch.randn(B, Hkv, S, D, generator=g).half() for _ in range(2))
    key_mask = (torch.arange(S) >= 40) & (torch.arange(S) < 70)  # visible slots in blocks 1 and 2 of 32
    key_mask = key_mask.expand(B, S).clone()
    ref = reference(q, k, v, key_mask)
    for t in (k, v):
        t[:, :, :32] = float("nan")  # block 0: left padding
        t[:, :, 96:] = float("nan")  # blocks 3..6: not written yet
    out = attention.decode_attention(q, k, v, key_mask, block_s=32)
    assert (out.float() - ref).abs().max().item() < 5e-3


def test_decode_attention_equals_masked_sdpa():
    """decode_attend (decoding's two batched matmuls, used on CUDA) gives SDPA's output under a left-padding mask."""
    torch.manual_seed(0)
    B, H, R, S, D = 3, 2, 4, 10, 8
    q, k, v = torch.randn(B, H, R, D), torch.randn(B, H, S, D), torch.randn(B, H, S, D)
    mask = torch.ones(B, 1, R, S, dtype=torch.bool)
    mask[0, :, :, :3] = False  # row 0 is left-padded by 3 slots, row 2 sees only its last 4 slots
    mask[2, :, :, :6] = False
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.allclose(attention.decode_attend(q, k, v, mask), want, atol=1e-5)
    unmasked = attention.decode_attend(q, k, v, torch.ones_like(mask))
    assert not torch.allclose(unmasked, want, atol=1e-3)  # the mask matters


def _reference_attention(q, k, v, scale):
    """Causal GQA attention in float32, (B, T, H, D) layout, and its log-sum-exp (B, H, T)."""
    rep = q.shape[2] // k.shape[2]
    qt, kt, vt = (t.float().transpose(1, 2) for t in (q, k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)))
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
        kv = (k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2))
        qt, kt, vt, ot, dot = (t.float().transpose(1, 2) for t in (q, *kv, out, dout))
        p = torch.exp(qt @ kt.transpose(-1, -2) * softmax_scale - lse[..., None]).tril()
        ds = p * (dot @ vt.transpose(-1, -2) - (dot * ot).sum(-1, keepdim=True)) * softmax_scale
        fold = lambda g: g.view(B, -1, rep, T, D).sum(2).transpose(1, 2)  # query heads' shares back onto their K/V head
        return (ds @ kt).transpose(1, 2), fold(ds.transpose(-1, -2) @ qt), fold(p.transpose(-1, -2) @ dot)

    interface = types.ModuleType("flash_attn.cute.interface")
    interface._flash_attn_fwd, interface._flash_attn_bwd = fwd, bwd
    for name, mod in (("flash_attn", types.ModuleType("flash_attn")),
                      ("flash_attn.cute", types.ModuleType("flash_attn.cute")),
                      ("flash_attn.cute.interface", interface)):
        monkeypatch.setitem(sys.modules, name, mod)
    attention._load_flash.cache_clear()
    flash = attention._load_flash()
    torch.manual_seed(0)
    q = torch.randn(2, 16, 4, 12, requires_grad=True)  # head_dim 12: padded to 64 for the kernels, as 72 to 96
    k, v = (torch.randn(2, 16, 2, 12, requires_grad=True) for _ in range(2))
    y = flash(q, k, v.transpose(1, 2).contiguous().transpose(1, 2), 0.0)  # a strided v is made contiguous
    grads = torch.autograd.grad(y.square().sum(), (q, k, v))
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                         enable_gqa=True).transpose(1, 2)
    assert torch.allclose(y, ref, atol=1e-5)
    for g, r in zip(grads, torch.autograd.grad(ref.square().sum(), (q, k, v), retain_graph=True)):
        assert torch.allclose(g, r, atol=1e-5)
    assert calls == ["fwd", "bwd"]
    with pytest.raises(RuntimeError, match="no attention dropout"):
        flash(q, k, v, 0.1)
    compiled = torch.compile(lambda q, k, v: flash(q, k, v, 0.0).sum(), backend="aot_eager", fullgraph=True)
    compiled(q, k, v).backward()
    assert torch.allclose(q.grad, torch.autograd.grad(ref.sum(), q)[0], atol=1e-5)
    attention._load_flash.cache_clear()


def test_attention_switch_errors_are_one_clear_line(monkeypatch):
    q = torch.zeros(1, 8, 2, 16)
    monkeypatch.setattr(attention, "ATTENTION", "flash")
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # neither flash-attn 4 nor 2 importable
    attention._fa4_causal.cache_clear()
    attention._load_flash.cache_clear()
    with pytest.raises(RuntimeError, match="ATTENTION='flash' needs the flash-attn package"):
        attention.attend(q, q, q)
    attention._load_flash.cache_clear()
    monkeypatch.setattr(attention, "ATTENTION", "xformers")
    with pytest.raises(ValueError, match="unknown ATTENTION='xformers'; use 'sdpa' or 'flash'"):
        attention.attend(q, q, q)
