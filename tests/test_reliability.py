"""What survives a full disk, a kill, a corrupt checkpoint and a wrong flag: train.py, checkpoint.py, export_hf.py."""
import json
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

import checkpoint
import export_hf
from configurator import configure
from model import GPT, make_config
from test_train import ROOT, losses, make_dataset, run

# train.py in a child whose torch.save fails on the listed calls the way a full disk does: some bytes, then the error
FAILING_SAVE = """
import os, runpy, sys, torch
real_save, calls, fail = torch.save, [0], {int(n) for n in os.environ["FAIL_SAVES"].split(",")}
def save(obj, f, *args, **kwargs):
    calls[0] += 1
    if calls[0] in fail:
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    return real_save(obj, f, *args, **kwargs)
torch.save = save
sys.path.insert(0, os.getcwd())
runpy.run_path("train.py", run_name="__main__")
"""


@pytest.fixture
def data(tmp_path):
    make_dataset(tmp_path / "data")
    return tmp_path


def last_line(p):
    return p.stderr.strip().splitlines()[-1]


def run_failing_saves(data, fail, *args):
    cmd = [sys.executable, "-c", FAILING_SAVE, f"--data_dir={data / 'data'}", "--block_size=32", "--micro_batch=4",
           "--warmup_tokens=256", "--log_every_steps=5", "--eval_every_steps=0", "--checkpoint_every_steps=2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "FAIL_SAVES": ",".join(map(str, fail))})


# train.py in a child whose FAULT_AT-th gradient clip raises FAULT (a torch exception class) with FAULT_TEXT
GPU_FAULT = """
import os, runpy, sys, torch
real_clip, calls = torch.nn.utils.clip_grad_norm_, [0]
def clip(*args, **kwargs):
    calls[0] += 1
    if calls[0] == int(os.environ["FAULT_AT"]):
        raise getattr(torch, os.environ["FAULT"])(os.environ["FAULT_TEXT"])
    return real_clip(*args, **kwargs)
torch.nn.utils.clip_grad_norm_ = clip
sys.path.insert(0, os.getcwd())
runpy.run_path("train.py", run_name="__main__")
"""


@pytest.mark.parametrize("fault, text, says", [
    ("OutOfMemoryError", "CUDA out of memory. Tried to allocate 2.00 GiB.",
     "out of GPU memory at step 7; --init_from=resume continues from {ckpt}: lower micro_batch (a grad_accum as many "
     "times higher keeps the tokens per step) or set --checkpoint_activations=True (CUDA out of "
     "memory. Tried to allocate 2.00 GiB.)"),
    ("AcceleratorError", "CUDA error: unspecified launch failure\nCUDA kernel errors might be asynchronously reported",
     "the GPU failed at step 7; --init_from=resume continues from {ckpt}: CUDA error: unspecified launch failure: a "
     "kernel fault or the GPU itself (dmesg shows an Xid); CUDA_LAUNCH_BLOCKING=1 shows which call")])
def test_gpu_faults_end_in_one_line_and_the_run_resumes(data, fault, text, says):
    """Out of GPU memory or a CUDA error mid-run: one line on stderr (no traceback) with the step, the checkpoint to
    resume from and what to change; the checkpoint before the fault is whole and the run resumes to the end."""
    out = data / "fault"
    args = [f"--data_dir={data / 'data'}", "--block_size=32", "--micro_batch=4", "--warmup_tokens=256",
            "--log_every_steps=5", "--eval_every_steps=0", "--checkpoint_every_steps=5", f"--out_dir={out}",
            "--max_tokens=1280"]  # 10 steps
    p = subprocess.run([sys.executable, "-c", GPU_FAULT, *args], capture_output=True, text=True, cwd=ROOT,
                       timeout=300, env={**os.environ, "FAULT": fault, "FAULT_AT": "8", "FAULT_TEXT": text})
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert last_line(p) == says.format(ckpt=out / "ckpt.pt")
    assert checkpoint.load_checkpoint(str(out / "ckpt.pt"))["step"] == 5
    run(data, f"--out_dir={out}", "--max_tokens=1280", "--init_from=resume")
    assert max(losses(out)) == 10


def test_gpu_fault_hook_keeps_other_tracebacks(monkeypatch, capsys):
    """Exceptions other than out of memory / a CUDA error go to the usual hook (a traceback); so does a CUDA error
    under CUDA_LAUNCH_BLOCKING=1, followed by the one line."""
    seen = []
    monkeypatch.setattr(sys, "excepthook", lambda kind, err, tb: seen.append(kind))  # restored after the test
    checkpoint.gpu_faults_in_one_line(lambda: "here", "lower it")
    sys.excepthook(ValueError, ValueError("x"), None)
    assert seen == [ValueError] and capsys.readouterr().err == ""
    monkeypatch.setenv("CUDA_LAUNCH_BLOCKING", "1")
    sys.excepthook(torch.AcceleratorError, torch.AcceleratorError("CUDA error: an illegal memory access"), None)
    assert seen == [ValueError, torch.AcceleratorError]
    assert capsys.readouterr().err.startswith("the GPU failed here: CUDA error: an illegal memory access: a kernel")


def test_full_disk_warns_keeps_training_then_stops_after_max_failed_saves(data):
    out = data / "full"
    p = run_failing_saves(data, [2, 3, 4, 5], f"--out_dir={out}", "--max_tokens=2560")  # 20 steps, a save every 2
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert last_line(p) == (f"stopping at step 8: 3 checkpoint writes in a row failed (disk full?); "
                            f"the last good checkpoint is in {out}; free space, then --init_from=resume")
    warnings = [line for line in p.stdout.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 3 and all("RuntimeError: [enforce fail at inline_container.cc:672]" in w for w in warnings)
    assert checkpoint.load_checkpoint(str(out / "ckpt.pt"))["step"] == 2  # the good one, whole
    assert max(losses(out)) == 8  # trained on through the failures
    assert sorted(os.listdir(out)) == ["ckpt.pt", "ckpt_0000002.pt", "config.json", "log.jsonl"] + \
        (["tb"] if os.path.isdir(out / "tb") else [])  # no partial files


@pytest.mark.parametrize("fail, rc, step", [([2, 3], 0, 10), ([5], 1, 8)])
def test_save_failures_below_the_limit_keep_going(data, fail, rc, step):
    """Two failed saves then good ones: a normal run. The final save failing: the run says so and exits non-zero."""
    out = data / "some"
    p = run_failing_saves(data, fail, f"--out_dir={out}", "--max_tokens=1280")  # saves at steps 2, 4, 6, 8, 10
    assert p.returncode == rc and "Traceback" not in p.stderr
    assert p.stdout.count("WARNING: could not write") == len(fail)
    assert checkpoint.load_checkpoint(str(out / "ckpt.pt"))["step"] == step
    if rc:
        assert last_line(p) == f"the last checkpoint could not be written; the newest good one is in {out}"


@pytest.mark.parametrize("where", ["weights", "config"])
def test_export_hf_full_disk_is_one_line(tmp_path, monkeypatch, where):
    from safetensors import SafetensorError
    torch.manual_seed(0)
    m = GPT(make_config("debug", vocab_size=64))
    checkpoint.save_checkpoint(str(tmp_path / "ckpt.pt"), {"model_config": asdict(m.cfg), "model": m.state_dict()})

    def failing_save_file(tensors, path, metadata=None):
        open(path, "wb").write(b"partial")
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    def failing_write_json(folder, name, obj):
        raise OSError(28, "No space left on device")
    if where == "weights":
        monkeypatch.setattr("safetensors.torch.save_file", failing_save_file)
    else:
        monkeypatch.setattr(export_hf, "write_json", failing_write_json)
    with pytest.raises(SystemExit) as e:
        export_hf.export(str(tmp_path / "ckpt.pt"), str(tmp_path / "hf"))
    reason = "SafetensorError: Error while serializing" if where == "weights" else "OSError: [Errno 28] No space left"
    assert str(e.value).startswith(f"export_hf: could not write {tmp_path / 'hf'} ({reason}")
    assert str(e.value).endswith("it is incomplete: free space, then --overwrite") and "\n" not in str(e.value)


def test_checkpoints_are_separate_files_and_resume_falls_back_past_a_corrupt_one(data):
    out = data / "r"
    run(data, f"--out_dir={out}", "--max_tokens=1920", "--checkpoint_every_steps=5", "--eval_every_steps=5",
        "--eval_tokens=256")  # 15 steps: ckpt_0000010.pt, ckpt_0000015.pt, ckpt.pt, best.pt
    names = ["ckpt.pt", "ckpt_0000010.pt", "ckpt_0000015.pt", "best.pt"]
    tb = ["tb"] if os.path.isdir(out / "tb") else []
    assert sorted(os.listdir(out)) == sorted(names + ["config.json", "log.jsonl"] + tb)
    assert len({os.stat(out / n).st_ino for n in names}) == 4 and all(os.stat(out / n).st_nlink == 1 for n in names)
    blob = (out / "ckpt.pt").read_bytes()
    (out / "ckpt.pt").write_bytes(blob[: len(blob) // 3])
    p = run(data, f"--out_dir={out}", "--init_from=resume", "--max_tokens=2560")
    assert f"cannot read checkpoint {out / 'ckpt.pt'}: it is truncated, corrupt" in p.stdout
    assert f"resuming from {out / 'ckpt_0000015.pt'} (step 15) instead" in p.stdout
    assert f"resuming from {out / 'ckpt_0000015.pt'} at step 15" in p.stdout
    with open(out / "log.jsonl") as f:
        steps = [r["step"] for r in map(json.loads, f) if "loss" in r and "val/loss" not in r]
    assert steps == list(range(1, 21))
    assert checkpoint.load_checkpoint(str(out / "ckpt.pt"))["step"] == 20


def test_latest_checkpoint_takes_the_highest_step_when_ckpt_pt_is_missing(tmp_path, capsys):
    for step in [9_999_999, 10_000_000, 999]:
        checkpoint.save_checkpoint(str(tmp_path / f"ckpt_{step:07d}.pt"),
                                   {"model": {}, "model_config": {}, "step": step})
    path, ckpt = checkpoint.latest_checkpoint(str(tmp_path))
    assert path == str(tmp_path / "ckpt_10000000.pt") and ckpt["step"] == 10_000_000
    assert capsys.readouterr().out == ""  # nothing failed to load: no warning


def test_resume_with_no_loadable_checkpoint_is_one_line(data):
    out = data / "none"
    os.makedirs(out)
    (out / "ckpt.pt").write_bytes(b"")
    (out / "ckpt_0000005.pt").write_bytes(b"junk")
    p = run(data, f"--out_dir={out}", "--init_from=resume", check=False)
    last = last_line(p)
    assert p.returncode != 0 and last.startswith(f"no checkpoint in {out} loads: cannot read checkpoint {out}/ckpt.pt")
    assert f"cannot read checkpoint {out / 'ckpt_0000005.pt'}" in last
    p = run(data, f"--out_dir={data / 'empty'}", "--init_from=resume", check=False)
    assert last_line(p) == (f"nothing to resume: {data / 'empty'} has no ckpt.pt or ckpt_<step>.pt; "
                            "start with --init_from=scratch")


def test_init_from_a_checkpoint_in_its_own_out_dir_is_refused(data):
    out = data / "own"
    run(data, f"--out_dir={out}", "--max_tokens=1280", "--checkpoint_every_steps=5")
    for name in ["ckpt_0000005.pt", "best.pt", "ckpt.pt"]:
        p = run(data, f"--out_dir={out}", f"--init_from={out / name}", "--max_tokens=1280", check=False)
        assert p.returncode != 0
        assert last_line(p) == (
            f"--init_from={out / name} is in out_dir, where this run's checkpoints would overwrite or delete it: "
            "--init_from=resume continues that run; or start from it in another out_dir")
    assert checkpoint.load_checkpoint(str(out / "ckpt_0000005.pt"))["step"] == 5  # untouched
    (out / "ckpt.pt.tmp4194305").write_bytes(b"a save in progress")  # the run may still be training
    p = run(data, f"--out_dir={out}", f"--init_from={out / 'ckpt.pt'}", "--eval_only=True")  # writes no checkpoint
    assert "eval val: loss" in p.stdout
    assert (out / "ckpt.pt.tmp4194305").exists()  # eval_only owns no out_dir: it leaves temporary files alone


def test_zero_byte_checkpoint_is_one_line_naming_it(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"")
    with pytest.raises(SystemExit) as e:
        checkpoint.load_checkpoint(str(path))
    assert str(e.value).startswith(f"cannot read checkpoint {path}: it is truncated, corrupt")
    assert "\n" not in str(e.value)


def test_killed_run_resumes_without_repeated_log_steps_or_stale_temp_files(data):
    out = data / "k"
    run(data, f"--out_dir={out}", "--max_tokens=1920", "--checkpoint_every_steps=10")  # logs 1..15, ckpt_0000010.pt
    (out / "ckpt.pt").write_bytes((out / "ckpt_0000010.pt").read_bytes())  # killed after step 15, before its save
    (out / "ckpt.pt.tmp4194305").write_bytes(b"half a checkpoint")  # kill -9 during a save
    (out / "ckpt_0000015.pt.tmp1").write_bytes(b"half a copy")
    (out / "notes.tmp1").write_text("not ours")
    p = run(data, f"--out_dir={out}", "--init_from=resume", "--max_tokens=1920")
    assert f"removed 2 unfinished checkpoint file(s) a killed run left in {out}" in p.stdout
    assert not any(".pt.tmp" in n for n in os.listdir(out)) and (out / "notes.tmp1").exists()
    with open(out / "log.jsonl") as f:
        steps = [r["step"] for r in map(json.loads, f)]
    assert steps == list(range(1, 16))


def test_resume_refuses_data_with_another_character_table(data, tmp_path_factory):
    run(data, f"--out_dir={data / 'c'}", "--max_tokens=640")
    other = tmp_path_factory.mktemp("other")
    make_dataset(other / "data")
    meta = json.load(open(other / "data" / "meta.json"))
    meta["chars"] = meta["chars"][::-1]  # same size, same tokenizer name: only the table differs
    json.dump(meta, open(other / "data" / "meta.json", "w"))
    p = run(other, f"--out_dir={data / 'c'}", "--init_from=resume", "--max_tokens=1280", check=False)
    assert p.returncode != 0
    assert last_line(p).startswith(
        f"{data / 'c' / 'ckpt.pt'} was trained on another character table than {other / 'data'} (the same characters "
        "in another order): its ids would mean other characters")
    meta["chars"], meta["vocab_size"] = meta["chars"][::-1] + ["#"], meta["vocab_size"] + 1
    json.dump(meta, open(other / "data" / "meta.json", "w"))
    p = run(other, f"--out_dir={data / 'c'}", "--init_from=resume", "--max_tokens=1280", check=False)
    assert last_line(p) == (f"{data / 'c' / 'ckpt.pt'} was trained with tokenizer char of vocab 16, "
                            f"but {other / 'data'} has vocab 17: prepare the data with the checkpoint's tokenizer")


def test_resume_refuses_other_model_keys_and_records_the_checkpoints(data):
    out = data / "m"
    run(data, f"--out_dir={out}", "--max_tokens=640", "--preset=debug", "--model_overrides={'dropout': 0.1}")
    p = run(data, f"--out_dir={out}", "--init_from=resume", "--max_tokens=1280", "--preset=tiny", check=False)
    assert p.returncode != 0 and last_line(p) == (
        f"preset 'tiny' is not {out / 'ckpt.pt'}'s ('debug'): the model comes from the checkpoint; drop --preset to "
        "resume, or use another out_dir")
    p = run(data, f"--out_dir={out}", "--init_from=resume", "--max_tokens=1280", "--model_overrides={'dropout': 0.0}",
            check=False)
    assert p.returncode != 0 and last_line(p) == (
        f"model_overrides {{'dropout': 0.0}} differ from {out / 'ckpt.pt'}'s model; a resumed run continues that "
        f"model: drop them, or start from it with --init_from={out / 'ckpt.pt'} and another out_dir")
    run(data, f"--out_dir={out}", "--init_from=resume", "--max_tokens=1280")  # no model keys given: resumes
    ran = json.load(open(out / "config.json"))
    assert ran["model_overrides"] == {"dropout": 0.1} and ran["preset"] == "debug" and ran["init_from"] == "resume"
    assert "_defaults" not in ran and "defaults" not in ran
    assert ran["model_config"]["dropout"] == 0.1 and ran["model_config"]["vocab_size"] == 64
    assert checkpoint.load_checkpoint(str(out / "ckpt.pt"))["config"]["model_overrides"] == {"dropout": 0.1}


def test_empty_validation_split_skips_eval_with_one_line(data):
    (data / "data" / "val.bin").write_bytes(b"")
    meta = json.load(open(data / "data" / "meta.json"))
    meta["splits"]["val"].update(tokens=0, bytes=0)
    json.dump(meta, open(data / "data" / "meta.json", "w"))
    p = run(data, f"--out_dir={data / 'nv'}", "--max_tokens=1280", "--eval_every_steps=5")
    assert f"eval set val: {data / 'data'} has no val tokens; skipping its eval" in p.stdout
    assert sorted(losses(data / "nv")) == list(range(1, 11)) and not (data / "nv" / "best.pt").exists()


def test_config_file_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("lr = 1.0\nbatch = (1,\n")
    with pytest.raises(SystemExit) as e:
        configure({"lr": 0.1}, [str(path)])
    assert str(e.value) == f"config error: {path}, line 2: SyntaxError: '(' was never closed"
    path.write_text("lr = 1.0\n\nwarmup = lr * steps\n")
    with pytest.raises(SystemExit) as e:
        configure({"lr": 0.1}, [str(path)])
    assert str(e.value) == f"config error: {path}, line 3: NameError: name 'steps' is not defined"


def test_whole_floats_are_ints_for_int_keys():
    defaults = {"max_tokens": 10, "lr": 0.1}
    assert configure(defaults, ["--max_tokens=2e9", "--lr=1"]) == {"max_tokens": 2_000_000_000, "lr": 1.0}
    assert type(defaults["max_tokens"]) is int
    with pytest.raises(SystemExit) as e:
        configure(defaults, ["--max_tokens=2.5"])
    assert str(e.value) == "config error: max_tokens must be int (default 2000000000), got 2.5"


def test_none_is_refused_for_a_key_whose_default_is_not_none():
    with pytest.raises(SystemExit) as e:  # it used to pass and crash later with a traceback (lr * None)
        configure({"lr": 0.1, "ref_from": None}, ["--lr=None"])
    assert str(e.value) == "config error: lr must be float (default 0.1), got None"
    assert configure({"lr": 0.1, "ref_from": None}, ["--ref_from=None"]) == {"lr": 0.1, "ref_from": None}
