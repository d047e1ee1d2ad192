"""sample.py end to end on the CPU with a tiny char-level checkpoint; --start FILE: errors are one line."""
import os
import re
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

import grpo
import sample
from checkpoint import save_checkpoint
from conftest import ROOT
from model import GPT, make_config

TEXT = "the quick brown fox jumps over the lazy dog\n"


@pytest.fixture
def ckpt(tmp_path):
    meta = grpo.char_meta([TEXT])
    torch.manual_seed(0)
    m = GPT(make_config("debug", vocab_size=meta["vocab_size"])).eval()
    save_checkpoint(str(tmp_path / "ckpt.pt"), {"model_config": asdict(m.cfg), "model": m.state_dict(),
                                                "optimizer": None, "step": 1, "tokens_seen": 0, "data_state": None,
                                                "rng": None, "config": {}, "tokenizer": meta, "best_val_loss": 1.0,
                                                "kind": "pretrain"})
    return str(tmp_path / "ckpt.pt")


def sample_cli(*argv):
    sample.main(sample.parser.parse_args(["--device", "cpu", "--num_samples", "2", "--max_new_tokens", "5", *argv]))


def test_start_from_a_file(ckpt, tmp_path, capsys):
    (tmp_path / "prompt.txt").write_text("the lazy fox")
    sample_cli("--ckpt", ckpt, "--start", f"FILE:{tmp_path / 'prompt.txt'}")
    out = capsys.readouterr().out
    samples = out.split("-" * 60 + "\n")  # generated text may hold newlines: split at the separators
    assert len(samples) == 3 and all(t.startswith("the lazy fox") for t in samples[:2])
    assert re.fullmatch(r"\d+ new tokens in .* \(2 samples, batched, KV cache\)\n", samples[2])


def test_start_file_errors_are_one_line(ckpt, tmp_path):
    missing = tmp_path / "missing.txt"
    with pytest.raises(SystemExit, match=rf"^sample.py: error: cannot read the prompt file of --start "
                                         rf"FILE:{missing}: No such file or directory$"):
        sample_cli("--ckpt", ckpt, "--start", f"FILE:{missing}")
    with pytest.raises(SystemExit, match=r"^sample.py: error: cannot read the prompt file of --start FILE:.*: "
                                         r"Is a directory$"):
        sample_cli("--ckpt", ckpt, "--start", f"FILE:{tmp_path}")
    (tmp_path / "latin1.txt").write_bytes("the café".encode("latin-1"))
    with pytest.raises(SystemExit, match=r"^sample.py: error: the prompt file .*latin1.txt is not UTF-8 "
                                         r"\(byte offset 7\)$"):
        sample_cli("--ckpt", ckpt, "--start", f"FILE:{tmp_path / 'latin1.txt'}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_a_gpu_is_one_line(ckpt):
    with pytest.raises(SystemExit, match=r"^device=cuda but no GPU is visible"):
        sample.main(sample.parser.parse_args(["--ckpt", ckpt, "--device", "cuda"]))


def test_out_of_gpu_memory_is_one_line(ckpt, tmp_path):
    """generate() running out of GPU memory: one line naming what to lower, exit 1, no traceback."""
    (tmp_path / "sitecustomize.py").write_text(
        "import torch, model\n"
        "def oom(*args, **kwargs):\n"
        "    raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 4.00 GiB.')\n"
        "model.GPT.generate = oom\n")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--ckpt", ckpt, "--device", "cpu"],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), ROOT])})
    assert r.returncode == 1 and r.stderr == ("out of GPU memory while sampling: lower --num_samples or "
                                              "--max_new_tokens (CUDA out of memory. Tried to allocate 4.00 GiB.)\n")


def test_bad_sampling_settings_are_one_line(ckpt):
    with pytest.raises(SystemExit, match=r"^(.*) is a folder, not a checkpoint file \(\.pt\)$"):
        sample_cli("--ckpt", os.path.dirname(ckpt))
    for bad in (["--temperature", "-1"], ["--top_p", "0"], ["--top_k", "-2"]):
        with pytest.raises(SystemExit, match=r"^sample.py: error: need --temperature >= 0, 0 < --top_p <= 1 and "):
            sample_cli("--ckpt", ckpt, *bad)


def test_a_checkpoint_of_a_newer_model_is_one_line(ckpt, tmp_path):
    """A model_config field this model.py lacks (a checkpoint from a newer version) is named, not a TypeError."""
    c = torch.load(ckpt, weights_only=True)
    c["model_config"]["value_embeds"] = 3
    save_checkpoint(str(tmp_path / "newer.pt"), c)
    with pytest.raises(SystemExit, match=re.escape(f"{tmp_path / 'newer.pt'}: model fields ['value_embeds'] are "
                                                   "unknown to this model.py (GPTConfig has [")):
        sample_cli("--ckpt", str(tmp_path / "newer.pt"))
