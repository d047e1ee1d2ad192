"""kernels.decode_attention on the CPU under the Triton interpreter, against plain float32 softmax attention.

The interpreter (TRITON_INTERPRET=1, read when triton.jit wraps the kernel, so it is set before kernels builds it)
runs the kernel in numpy. Its tl.dot multiplies bfloat16 as raw uint16 bits (triton 3.5), so these tests feed
float16; bfloat16 is checked on the GPU by dev/decode_attention.py against model.decode_attend."""
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (and before kernels builds its kernel)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
import kernels  # noqa: E402


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
    out = kernels.decode_attention(q, k, v, key_mask, **kw)
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
        kernels.decode_attention(q, k, k, torch.ones(1, 7, dtype=torch.bool))


def test_available_without_triton(monkeypatch):
    assert kernels.available()
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton now raises ImportError
    kernels.available.cache_clear()
    assert not kernels.available()
    kernels.available.cache_clear()  # the next caller looks again, with triton back


def test_blocks_without_a_visible_slot_are_not_read():
    """A kept cache (generate(keep_decoder=True)) is longer than what a row has written: blocks that no row may see are
    skipped, not read and masked. NaN in those blocks' K and V would otherwise reach the output (0 x NaN)."""
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
    out = kernels.decode_attention(q, k, v, key_mask, block_s=32)
    assert (out.float() - ref).abs().max().item() < 5e-3
