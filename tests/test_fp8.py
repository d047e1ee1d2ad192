"""fp8.py on the CPU (emulated FP8): outputs and gradients near bf16's, parameters unchanged, the model learns."""
import torch

import fp8
import model as M


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_quantize_round_trip_and_range():
    x = torch.randn(64, 48) * 3
    for dtype, tol in ((fp8.E4M3, 0.04), (fp8.E5M2, 0.08)):
        x8, inv = fp8.quantize(x, dtype)
        assert x8.dtype == dtype and x8.float().abs().max().item() == torch.finfo(dtype).max
        assert rel(x8.float() * inv, x) < tol


def test_float8_linear_matches_linear_forward_and_backward():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32, bias=False)
    x = torch.randn(4, 10, 64, requires_grad=True)
    y_ref = lin(x)
    y_ref.backward(torch.ones_like(y_ref))
    gx_ref, gw_ref = x.grad.clone(), lin.weight.grad.clone()
    x.grad, lin.weight.grad = None, None
    lin.__class__ = fp8.Float8Linear
    y = lin(x)
    y.float().backward(torch.ones_like(y, dtype=torch.float32))
    assert y.shape == y_ref.shape
    assert rel(y, y_ref) < 0.06 and rel(x.grad, gx_ref) < 0.1 and rel(lin.weight.grad, gw_ref) < 0.1
    assert lin.weight.grad.dtype == torch.float32


def test_fp8_model_keeps_its_state_dict_and_learns():
    torch.manual_seed(0)
    m = M.GPT(M.make_config("debug", vocab_size=64))
    ref = M.GPT(M.make_config("debug", vocab_size=64))
    ref.load_state_dict(m.state_dict())
    assert fp8.convert_to_fp8(m) == 8  # 4 Linears in each of 2 blocks
    kinds = {type(mod).__name__ for mod in m.blocks.modules()}
    assert "Float8Linear" in kinds and "Linear" not in kinds
    assert type(m.lm_head) is torch.nn.Linear  # the head stays high precision
    assert list(ref.state_dict()) == list(m.state_dict())  # an fp8 run's checkpoint loads into a plain GPT
    ref.load_state_dict(m.state_dict(), strict=True)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    x = torch.randint(0, 64, (4, 33))
    losses = []
    for _ in range(20):
        loss = m(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_shapes_measured_slower_stay_in_bf16(monkeypatch):
    """convert_to_fp8 leaves (in, out) shapes listed in skip_fp8_shapes as nn.Linear: here the debug preset's qkv."""
    monkeypatch.setattr(fp8, "skip_fp8_shapes", {(64, 128)})
    model = M.GPT(M.make_config("debug"))
    fp8.convert_to_fp8(model)
    kinds = {name: type(m).__name__ for name, m in model.blocks[0].named_modules() if isinstance(m, torch.nn.Linear)}
    assert kinds["attn.qkv"] == "Linear" and kinds["attn.proj"] == "Float8Linear", kinds
    assert kinds["mlp.down"] == "Float8Linear", kinds


def test_fp8_does_not_import_model():
    """fp8.py applies to a built model (train.py, bench.py call convert_to_fp8): no fp8 <-> model import cycle."""
    import subprocess
    import sys
    from conftest import ROOT
    p = subprocess.run([sys.executable, "-c", "import sys, fp8; print('model' in sys.modules)"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "False", p.stderr[-2000:]


def test_train_py_applies_fp8_and_its_checkpoint_loads_into_a_plain_gpt(tmp_path):
    """train.py --precision=fp8 converts the built model (the switches line says so); its checkpoint loads strictly
    into a plain GPT; an unknown precision is one clear line."""
    from test_train import make_dataset, run
    make_dataset(tmp_path / "data")
    p = run(tmp_path, "--precision=fp8", "--max_tokens=640", f"--out_dir={tmp_path / 'out'}")
    assert "PRECISION=fp8" in p.stdout
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", map_location="cpu", weights_only=False)
    plain = M.GPT(M.GPTConfig(**ckpt["model_config"]))
    plain.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}, strict=True)
    bad = run(tmp_path, "--precision=fp16", "--max_tokens=640", f"--out_dir={tmp_path / 'bad'}", check=False)
    assert (bad.returncode == 1
            and bad.stderr.strip().splitlines()[-1] == "config error: precision must be 'bf16' or 'fp8', not 'fp16'")
