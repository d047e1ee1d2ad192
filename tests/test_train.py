"""train.py end to end on the CPU: exact resume, learning, schedules, curriculum, clear errors, signals, NaN skips."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import checkpoint
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_dataset(path, n_chars=60_000, seed=0):
    """A char-level dataset written directly (.bin + meta.json), independent of prepare_data.py."""
    rng = np.random.default_rng(seed)
    words = ["the ", "cat ", "sat ", "on ", "a ", "mat. ", "dog ", "ran ", "far. "]
    text = "".join(rng.choice(words, size=n_chars // 4))[:n_chars]
    chars = sorted(set(text))
    ids = np.array([chars.index(c) for c in text], dtype=np.uint16)
    n = int(0.9 * len(ids))
    os.makedirs(path, exist_ok=True)
    ids[:n].tofile(os.path.join(path, "train.bin"))
    ids[n:].tofile(os.path.join(path, "val.bin"))
    meta = {"tokenizer": "char", "chars": chars, "vocab_size": len(chars) + 1, "eos_id": len(chars), "dtype": "uint16",
            "splits": {"train": {"files": ["train.bin"], "tokens": n, "documents": 1, "bytes": n},
                       "val": {"files": ["val.bin"], "tokens": len(ids) - n, "documents": 1, "bytes": len(ids) - n}}}
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump(meta, f)
    return path


def run(tmp_path, *args, check=True):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"--data_dir={tmp_path / 'data'}", "--block_size=32",
           "--micro_batch=4", "--warmup_tokens=256", "--log_every_steps=5", "--eval_every_steps=0", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(p.stdout[-2000:] + p.stderr[-3000:])
    return p


def losses(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


@pytest.fixture
def data(tmp_path):
    make_dataset(tmp_path / "data")
    return tmp_path


def test_resume_is_exact(data):
    """N steps + resume + N steps gives bitwise the losses of 2N straight steps (dropout, accumulation on)."""
    common = ["--max_tokens=5120", "--grad_accum=2", "--model_overrides={'dropout': 0.1}"]
    run(data, *common, f"--out_dir={data / 'a'}", "--checkpoint_every_steps=10")
    os.makedirs(data / "b")
    os.link(data / "a" / "ckpt_0000010.pt", data / "b" / "ckpt.pt")
    run(data, *common, f"--out_dir={data / 'b'}", "--init_from=resume")
    straight, resumed = losses(data / "a"), losses(data / "b")
    assert sorted(resumed) == list(range(11, 21))
    assert all(straight[s] == resumed[s] for s in resumed)


def test_resume_with_another_batch_size_stops_at_max_tokens(data):
    """10 steps of 4 x 32 tokens, then resumed at 8 x 32 (say, twice the GPUs): 5 more steps reach 2560 tokens."""
    run(data, "--max_tokens=1280", f"--out_dir={data / 'a'}")
    run(data, "--max_tokens=2560", "--micro_batch=8", f"--out_dir={data / 'a'}", "--init_from=resume")
    assert sorted(s for s in losses(data / "a") if s > 10) == list(range(11, 16))
    assert checkpoint.load_checkpoint(str(data / "a" / "ckpt.pt"))["tokens_seen"] == 2560


def test_loss_decreases_and_eval_reports_bits_per_byte(data):
    p = run(data, "--max_tokens=40000", "--lr=3e-3", f"--out_dir={data / 'o'}", "--eval_every_steps=100",
            "--eval_tokens=2000")
    log = losses(data / "o")
    first, last = np.mean([log[s] for s in range(1, 6)]), np.mean([log[s] for s in sorted(log)[-5:]])
    assert last < first - 1.0, (first, last)
    with open(data / "o" / "log.jsonl") as f:
        evals = [r for r in map(json.loads, f) if "val/loss" in r]
    r = evals[-1]
    assert r["val/loss"] < 2.0 and 0.0 < r["val/acc"] <= 1.0
    assert abs(r["val/bpb"] - r["val/loss"] / np.log(2)) < 1e-9  # char data: one token per byte
    assert os.path.exists(data / "o" / "best.pt") and os.path.exists(data / "o" / "config.json")
    assert "MFU" in p.stdout and "ETA" in p.stdout


def test_curriculum_keeps_tokens_per_step(data):
    run(data, "--max_tokens=4096", "--grad_accum=2", "--curriculum=[(1024, 16, 4)]", f"--out_dir={data / 'c'}",
        "--log_every_steps=1")
    with open(data / "c" / "log.jsonl") as f:
        recs = [r for r in map(json.loads, f) if "block_size" in r]
    assert [r["block_size"] for r in recs][:5] == [16, 16, 16, 16, 32]  # 4 steps of 256 tokens reach 1024
    assert all(b["tokens"] - a["tokens"] == 256 for a, b in zip(recs, recs[1:]))


def test_schedules():
    train.lr, train.min_lr, train.warmup_tokens, train.max_tokens = 1.0, 0.1, 100, 1100
    train.schedule = "cosine"
    assert train.lr_at(0) == pytest.approx(0.01) and train.lr_at(99) == pytest.approx(1.0)
    assert train.lr_at(600) == pytest.approx(0.55) and train.lr_at(1100) == pytest.approx(0.1)
    train.schedule, train.decay_fraction = "wsd", 0.2
    assert train.lr_at(500) == 1.0 and train.lr_at(880) == 1.0
    assert train.lr_at(990) == pytest.approx(0.55) and train.lr_at(1100) == pytest.approx(0.1)


@pytest.mark.parametrize("args, message", [
    (["--no_such_key=1"], "unknown key 'no_such_key'"),
    (["--lr=fast"], "lr must be float"),
    (["--data_dir=/nonexistent/x"], "no dataset at /nonexistent/x"),
    (["--preset=huge"], "unknown model preset"),
    (["--model_overrides={'vocab_size': 8}"], "has vocab 16 but the model only 8"),
    (["--compile_scope=all"], "compile_scope must be 'model' or 'blocks', not 'all'"),
    (["--model_overrides={'n_layers': 2}"], "unknown model field(s) ['n_layers']"),
    (["--model_overrides={'checkpoint_activations': True}"], "set --checkpoint_activations=True, not in"),
    (["--schedule=linear"], "schedule must be 'cosine' or 'wsd', not 'linear'"),
    (["--attention=nope"], "config error: attention must be 'sdpa' or 'flash', not 'nope'"),
    (["--decay_fraction=2.0"], "decay_fraction must be in [0, 1], not 2.0"),
    (["--curriculum=[(100, 16)]"], "curriculum takes (until_tokens, block_size, micro_batch) stages, not [(100, 16)]"),
    (["--model_overrides={'n_head': 5}"], "n_head (5) must be a multiple of n_kv_head (2)"),
    (["--micro_batch=0"], "config error: micro_batch must be at least 1, not 0"),
    (["--lr=-0.001"], "config error: lr must not be negative, not -0.001"),
    (["--out_dir=/dev/null/x"], "cannot create out_dir /dev/null/x: Not a directory"),
])
def test_bad_input_is_one_clear_error(data, args, message):
    p = run(data, f"--out_dir={data / 'e'}", *args, check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-1500:]
    last = (p.stderr.strip() or p.stdout.strip()).splitlines()[-1]
    assert message in last, last


def test_a_cut_meta_json_is_one_line(data):
    text = (data / "data" / "meta.json").read_text()
    (data / "data" / "meta.json").write_text(text[:len(text) // 2])  # a copy cut short
    p = run(data, f"--out_dir={data / 'e'}", check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith(f"dataset {data / 'data'}: {data / 'data' / 'meta.json'} is "
                                                        "not valid JSON (")


def test_resume_refuses_a_checkpoint_of_other_data(data, tmp_path_factory):
    run(data, "--max_tokens=640", f"--out_dir={data / 'v'}")
    other = tmp_path_factory.mktemp("other")
    make_dataset(other / "data", seed=1)
    meta = json.load(open(other / "data" / "meta.json"))
    meta["tokenizer"] = "gpt2"
    json.dump(meta, open(other / "data" / "meta.json", "w"))
    p = run(other, f"--out_dir={data / 'v'}", "--init_from=resume", "--max_tokens=1280", check=False)
    assert p.returncode != 0 and "was trained with tokenizer char, but" in p.stderr


def test_corrupt_or_truncated_checkpoint_is_one_clear_error(data):
    # no ckpt_<step>.pt to fall back on
    run(data, "--max_tokens=640", f"--out_dir={data / 't'}", "--keep_checkpoints=0")
    path = data / "t" / "ckpt.pt"
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    p = run(data, f"--out_dir={data / 't'}", "--init_from=resume", check=False)
    assert p.returncode != 0 and "truncated, corrupt" in p.stderr.strip().splitlines()[-1]


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save_checkpoint(path, {"model": {"w": torch.ones(3)}, "model_config": {}})

    def half_write(obj, f):
        f.write(b"partial bytes")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", half_write)
    assert checkpoint.save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "model_config": {}}) is False
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind
    assert torch.equal(checkpoint.load_checkpoint(path)["model"]["w"], torch.ones(3))


def test_sigterm_checkpoints_and_exits_zero_then_resumes(data):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"--data_dir={data / 'data'}", "--block_size=32",
           "--micro_batch=4", "--max_tokens=10000000", "--eval_every_steps=0", "--log_every_steps=1",
           f"--out_dir={data / 's'}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    log = data / "s" / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped by signal" in out
    ckpt = checkpoint.load_checkpoint(str(data / "s" / "ckpt.pt"))
    stopped_at = ckpt["step"]
    assert stopped_at >= 3
    run(data, f"--out_dir={data / 's'}", "--init_from=resume", f"--max_tokens={(stopped_at + 2) * 128}")
    assert min(s for s in losses(data / "s") if s > stopped_at) == stopped_at + 1


def test_non_finite_steps_are_skipped_then_stop_with_a_checkpoint(data):
    p = run(data, "--lr=1e30", "--warmup_tokens=0", "--grad_clip=0", "--max_tokens=100000", f"--out_dir={data / 'n'}",
            "--max_bad_steps=3", check=False)
    assert p.returncode != 0 and "3 non-finite steps in a row" in p.stderr
    assert p.stdout.count("update skipped") == 3
    ckpt = checkpoint.load_checkpoint(str(data / "n" / "ckpt.pt"))
    assert ckpt["step"] == 1 + 3 - 1  # one real update, then the skipped steps (the last one not yet counted)


def test_named_validation_sets_are_reported_separately(data, tmp_path_factory):
    other = tmp_path_factory.mktemp("books")
    make_dataset(other / "data", seed=3)
    run(data, "--max_tokens=1280", f"--out_dir={data / 'm'}", "--eval_every_steps=10", "--eval_tokens=512",
        f"--eval_sets={{'books': '{other / 'data'}'}}")
    with open(data / "m" / "log.jsonl") as f:
        r = [r for r in map(json.loads, f) if "val/loss" in r][-1]
    assert {"val/loss", "val/bpb", "val/acc", "books/loss", "books/bpb", "books/acc"} <= set(r)
    assert r["val/loss"] != r["books/loss"] and r["books/tokens"] == 512


def test_eval_set_without_a_val_split_is_one_clear_error(data, tmp_path_factory):
    other = tmp_path_factory.mktemp("books")
    make_dataset(other / "data", seed=3)
    meta = json.load(open(other / "data" / "meta.json"))
    del meta["splits"]["val"]
    json.dump(meta, open(other / "data" / "meta.json", "w"))
    p = run(data, f"--out_dir={data / 'nv'}", f"--eval_sets={{'books': '{other / 'data'}'}}", check=False)
    assert p.returncode != 0
    assert p.stderr.strip().splitlines()[-1] == f"eval set books: {other / 'data'} has no val split; prepare it with " \
                                                "prepare_data.py"


def test_ddp_two_processes_on_cpu(data):
    """torchrun with 2 CPU processes (gloo): same tokens per step, one all-reduce per step, rank 0 logs."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"), f"--data_dir={data / 'data'}", "--block_size=32", "--micro_batch=4",
           "--grad_accum=2", "--max_tokens=10240", "--lr=3e-3", "--warmup_tokens=256", "--eval_every_steps=10",
           "--eval_tokens=1024", "--log_every_steps=5", f"--out_dir={data / 'ddp'}"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "world=2" in p.stdout and "512 tokens/step" in p.stdout
    log = losses(data / "ddp")
    assert sorted(log) == list(range(1, 21))
    assert np.mean([log[s] for s in (18, 19, 20)]) < np.mean([log[s] for s in (1, 2, 3)]) - 0.3


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_fsdp_on_two_processes_resumes_on_one(data, optimizer):
    """parallel="fsdp" (FSDP2) on 2 CPU processes; its checkpoint (gathered, keyed by name; Muon's momentum too)
    resumes on 1 process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"), f"--data_dir={data / 'data'}", "--block_size=32", "--micro_batch=4",
           "--grad_accum=2", "--max_tokens=10240", "--lr=3e-3", "--warmup_tokens=256", "--eval_every_steps=10",
           "--eval_tokens=1024", "--log_every_steps=5", "--parallel=fsdp", f"--optimizer={optimizer}",
           f"--out_dir={data / 'fsdp'}"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    log = losses(data / "fsdp")
    assert np.mean([log[s] for s in (18, 19, 20)]) < np.mean([log[s] for s in (1, 2, 3)]) - 0.3
    ckpt = checkpoint.load_checkpoint(str(data / "fsdp" / "ckpt.pt"))
    assert ckpt["step"] == 20 and ckpt["model"]["wte.weight"].shape[0] == 64  # whole tensors, not shards
    if optimizer == "muon":
        name = "blocks.0.mlp.gate_up.weight"
        assert ckpt["optimizer"]["state"][name]["momentum_buffer"].shape == ckpt["model"][name].shape
    run(data, f"--out_dir={data / 'fsdp'}", "--init_from=resume", "--max_tokens=15360", "--micro_batch=8",
        "--grad_accum=2", "--lr=3e-3", f"--optimizer={optimizer}")
    resumed = losses(data / "fsdp")
    assert sorted(s for s in resumed if s > 20) == list(range(21, 31))
    assert resumed[21] < np.mean([log[s] for s in (1, 2, 3)]) - 0.3  # it went on from the trained weights


def test_dsa_run_logs_lm_and_indexer_losses(data):
    overrides = "{'dsa_top_k': 8, 'dsa_heads': 2, 'dsa_head_dim': 16, 'dsa_rope_dim': 8}"
    p = run(data, "--max_tokens=1280", f"--out_dir={data / 'dsa'}", f"--model_overrides={overrides}")
    with open(data / "dsa" / "log.jsonl") as f:
        r = [r for r in map(json.loads, f) if "loss_indexer" in r][-1]
    # last micro-batch vs mean
    assert r["loss_indexer"] > 0 and abs(r["loss"] - (r["loss_lm"] + r["loss_indexer"])) < 0.05
    assert "loss_indexer" in p.stdout


def test_dataset_whose_dtype_does_not_match_its_files(data):
    meta_path = data / "data" / "meta.json"
    meta = json.load(open(meta_path))
    meta["dtype"] = "uint32"
    json.dump(meta, open(meta_path, "w"))
    # an odd count of 2-byte ids
    (data / "data" / "train.bin").write_bytes((data / "data" / "train.bin").read_bytes()[:-2])
    p = run(data, f"--out_dir={data / 'x'}", check=False)
    assert p.returncode != 0 and "is not a whole number of uint32 tokens" in p.stderr.strip().splitlines()[-1]


def test_resume_refuses_an_optimizer_state_keyed_by_index(data):
    run(data, "--max_tokens=640", f"--out_dir={data / 'o'}")
    path = data / "o" / "ckpt.pt"
    ckpt = checkpoint.load_checkpoint(str(path))
    ckpt["optimizer"] = {"state": {0: {"step": torch.tensor(1.0)}}, "param_groups": [{"params": [0]}]}
    checkpoint.save_checkpoint(str(path), ckpt)
    p = run(data, f"--out_dir={data / 'o'}", "--init_from=resume", "--max_tokens=1280", check=False)
    assert p.returncode != 0 and "no optimizer state keyed by parameter name" in p.stderr.strip().splitlines()[-1]


def test_eval_reads_every_shard_of_a_sharded_split(data):
    """A split in several files (prepare_data --shard-tokens) is evaluated across all of them, not its first only."""
    ids = np.fromfile(data / "data" / "val.bin", dtype=np.uint16)
    halves = np.array_split(ids, 2)
    for i, part in enumerate(halves):
        part.tofile(data / "data" / f"val_{i:03d}.bin")
    meta = json.load(open(data / "data" / "meta.json"))
    meta["splits"]["val"]["files"] = ["val_000.bin", "val_001.bin"]
    json.dump(meta, open(data / "data" / "meta.json", "w"))
    run(data, "--max_tokens=640", f"--out_dir={data / 'o'}")
    p = run(data, "--eval_only=True", f"--init_from={data / 'o' / 'ckpt.pt'}", "--eval_tokens=1000000",
            f"--out_dir={data / 'o'}")
    windows = sum((len(part) - 1) // 32 for part in halves)  # block_size 32
    assert f"({windows * 32:,} tokens)" in p.stdout, p.stdout[-1500:]


@pytest.mark.parametrize("scope", ["model", "blocks"])
def test_compiled_training_matches_eager(data, scope):
    """compile=True, the whole model or each block and the loss (model.compile_regions): on the CPU (inductor) 10 steps
    give the eager run's losses within 1e-4 relative, and checkpoint keys stay plain (no _orig_mod. prefix)."""
    common = ["--max_tokens=1280", "--log_every_steps=1"]
    run(data, *common, f"--out_dir={data / 'e'}")
    run(data, *common, f"--out_dir={data / 'c'}", "--compile=True", f"--compile_scope={scope}")
    eager, compiled = losses(data / "e"), losses(data / "c")
    assert sorted(compiled) == list(range(1, 11))
    assert all(compiled[s] == pytest.approx(eager[s], rel=1e-4) for s in eager), (eager, compiled)
    assert eager[10] < eager[1] - 0.5  # it learns: a run that did nothing would also "match"
    ckpt = checkpoint.load_checkpoint(str(data / "c" / "ckpt.pt"))
    assert set(ckpt["model"]) == set(checkpoint.load_checkpoint(str(data / "e" / "ckpt.pt"))["model"])
    assert not any("_orig_mod" in k for k in ckpt["model"])
