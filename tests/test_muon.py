"""optimizer=muon (torch.optim.Muon + AdamW), logit soft-capping, and the eval of every split of data_dir, on CPU."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import checkpoint
from model import GPT, make_config
from test_train import ROOT, losses, make_dataset, run

HIDDEN = ("attn.qkv.weight", "attn.proj.weight", "mlp.gate_up.weight", "mlp.down.weight")


@pytest.fixture
def data(tmp_path):
    make_dataset(tmp_path / "data")
    return tmp_path


def test_muon_param_set_is_exactly_the_blocks_linear_weights():
    model = GPT(make_config("debug", embed_rank=16))  # embed_proj / head_proj are Linear but outside the blocks
    muon, adamw = model.configure_optimizer(1e-3, 0.1, (0.9, 0.95), "cpu", muon=dict(lr=0.02, momentum=0.95,
                                                                                      weight_decay=0.01))
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    assert in_muon == {f"blocks.{i}.{w}" for i in range(2) for w in HIDDEN}
    in_adamw = [names[id(p)] for g in adamw.param_groups for p in g["params"]]
    assert sorted(in_adamw) == sorted(set(names.values()) - in_muon)  # the rest, each once
    decayed = {names[id(p)] for p in adamw.param_groups[0]["params"]}
    assert decayed == {"embed_proj.weight", "head_proj.weight", "lm_head.weight"}
    assert adamw.param_groups[0]["weight_decay"] == 0.1 and muon.param_groups[0]["weight_decay"] == 0.01
    single = model.configure_optimizer(1e-3, 0.1, (0.9, 0.95), "cpu")  # grpo.py's call: one AdamW over everything
    assert isinstance(single, torch.optim.AdamW) and sum(len(g["params"]) for g in single.param_groups) == len(names)


def test_muon_decreases_loss(data):
    """Muon on the debug preset: the training loss falls from ~3.84 to ~0.67 nats in 80 steps (AdamW: 3.81 to 0.68)."""
    run(data, "--max_tokens=10240", "--lr=3e-3", "--optimizer=muon", f"--out_dir={data / 'm'}")
    log = losses(data / "m")
    first, last = np.mean([log[s] for s in range(1, 6)]), np.mean([log[s] for s in range(76, 81)])
    assert last < first - 2.5 and last < 1.0, (first, last)


def test_muon_resume_is_bitwise_exact(data):
    """20 Muon steps straight == 10 + resume 10: the same losses, weights and optimizer state, bit for bit."""
    common = ["--max_tokens=5120", "--grad_accum=2", "--model_overrides={'dropout': 0.1}", "--optimizer=muon"]
    run(data, *common, f"--out_dir={data / 'a'}", "--checkpoint_every_steps=10")
    os.makedirs(data / "b")
    os.link(data / "a" / "ckpt_0000010.pt", data / "b" / "ckpt.pt")
    run(data, *common, f"--out_dir={data / 'b'}", "--init_from=resume")
    straight, resumed = losses(data / "a"), losses(data / "b")
    assert sorted(resumed) == list(range(11, 21)) and all(straight[s] == resumed[s] for s in resumed)
    a, b = (checkpoint.load_checkpoint(str(data / d / "ckpt.pt")) for d in "ab")
    assert a["step"] == b["step"] == 20
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for k, state in a["optimizer"]["state"].items():
        assert all(torch.equal(v, b["optimizer"]["state"][k][n]) for n, v in state.items())
    buffers = {k for k, s in a["optimizer"]["state"].items() if "momentum_buffer" in s}
    assert buffers == {f"blocks.{i}.{w}" for i in range(2) for w in HIDDEN}
    assert a["config"]["optimizer"] == "muon"
    assert json.load(open(data / "a" / "config.json"))["optimizer"] == "muon"
    muon_group, adamw_group = a["optimizer"]["param_groups"][:2]  # one schedule scales both from their own peaks
    assert muon_group["lr"] == pytest.approx(adamw_group["lr"] * 0.02 / 1e-3, rel=1e-12)


@pytest.mark.parametrize("args, message", [
    (["--optimizer=sgd"], "config error: optimizer must be 'adamw' or 'muon', not 'sgd'"),
])
def test_bad_optimizer_is_one_clear_line(data, args, message):
    p = run(data, f"--out_dir={data / 'e'}", *args, check=False)
    assert p.returncode != 0 and p.stderr.strip().splitlines()[-1] == message
    assert not os.path.exists(data / "e")  # refused before any work


def test_resume_with_another_optimizer_is_refused(data):
    run(data, "--max_tokens=640", f"--out_dir={data / 'o'}")
    p = run(data, f"--out_dir={data / 'o'}", "--init_from=resume", "--max_tokens=1280", "--optimizer=muon", check=False)
    assert p.returncode != 0
    assert p.stderr.strip().splitlines()[-1] == (f"{data / 'o'}/ckpt.pt was trained with optimizer=adamw; resume with "
                                                 f"--optimizer=adamw, or --init_from={data / 'o'}/ckpt.pt with another "
                                                 "out_dir keeps its weights only")


def test_every_non_train_split_is_evaluated_by_name(data):
    """A dataset with an unseen_authors split (prepare_data.py --holdout-authors): train.py reports it beside val."""
    path = data / "data"
    meta = json.load(open(path / "meta.json"))
    ids = np.fromfile(path / "val.bin", dtype=np.uint16)[::-1].copy()  # other text than val, same vocab
    ids.tofile(path / "unseen_authors.bin")
    meta["splits"]["unseen_authors"] = {"files": ["unseen_authors.bin"], "tokens": len(ids), "bytes": 2 * len(ids)}
    json.dump(meta, open(path / "meta.json", "w"))
    p = run(data, "--max_tokens=1280", f"--out_dir={data / 'u'}", "--eval_every_steps=10", "--eval_tokens=512")
    with open(data / "u" / "log.jsonl") as f:
        r = [r for r in map(json.loads, f) if "val/loss" in r][-1]
    assert r["unseen_authors/tokens"] == 512 and r["unseen_authors/loss"] != r["val/loss"]
    bits_per_token = r["unseen_authors/loss"] / np.log(2)
    assert r["unseen_authors/bpb"] == pytest.approx(bits_per_token / 2, rel=1e-12)  # 2 bytes per token
    assert "eval step 10 unseen_authors: loss" in p.stdout
    assert p.stdout.index("eval step 10 val:") < p.stdout.index("eval step 10 unseen_authors:")  # val first


def test_logit_softcap_in_logits_and_loss():
    """logit_softcap=c: logits are c * tanh(z / c), and the chunked loss and its gradients match that written
    directly; c = 0 leaves them as they were."""
    torch.manual_seed(0)
    model = GPT(make_config("debug", vocab_size=64, logit_softcap=2.0))
    with torch.no_grad():
        model.lm_head.weight.mul_(300)  # raw logits far beyond the cap
    idx, targets = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    targets[0, 3] = -1  # ignored
    loss = model(idx, targets)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    z = F.linear(model.hidden(idx), model.lm_head.weight).float()
    assert z.abs().max() > 10
    logits = model.logits(model.hidden(idx))
    assert torch.allclose(logits, 2.0 * torch.tanh(z / 2.0)) and logits.abs().max() <= 2.0
    reference = F.cross_entropy(logits.reshape(-1, 64), targets.reshape(-1), ignore_index=-1)
    reference.backward()
    assert torch.allclose(loss, reference, atol=1e-6)
    assert all(torch.allclose(grads[n], p.grad, atol=1e-6, rtol=1e-4) for n, p in model.named_parameters())
    model.cfg.logit_softcap = 0.0
    assert torch.equal(model.logits(model.hidden(idx)), z)


def quality_env(data):
    """dev/quality.sh's CPU smoke mode on a fake dataset with an unseen_authors split (val's tokens at 2 bytes each)."""
    fake = data / "fake" / "gutenberg"
    make_dataset(fake)
    meta = json.load(open(fake / "meta.json"))
    os.link(fake / "val.bin", fake / "unseen.bin")
    meta["splits"]["unseen_authors"] = {"files": ["unseen.bin"], "tokens": meta["splits"]["val"]["tokens"],
                                        "bytes": 2 * meta["splits"]["val"]["tokens"]}
    json.dump(meta, open(fake / "meta.json", "w"))
    return {**os.environ, "CPU": "1", "DATA": str(data / "fake"), "Q_DIR": str(data / "q"), "PER_GPU": "2"}


def run_quality(env):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run(["bash", os.path.join(root, "dev", "quality.sh")], env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return p.stdout


def test_quality_script_runs_variants_and_prints_the_table(data):
    """Two variants side by side, then the table row of each, read from its log.jsonl; a row that failed sharing the
    GPU runs again alone (here it fails again: its row says so, and both logs are kept)."""
    env = {**quality_env(data), "VARIANTS": "base:--optimizer=adamw;muon:--optimizer=muon --max_tokens=640 "
                                            "--model_overrides={'n_layer':2,'dropout':0.1};bad:--lr=fast"}
    out = run_quality(env)
    assert "bad: failed sharing its GPU; again, alone" in out and "| bad | failed (exit 1" in out
    assert "lr must be float" in open(data / "q" / "bad.shared.log").read()
    assert "lr must be float" in open(data / "q" / "bad.log").read()
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in out.splitlines()
            if line.startswith("| base") or line.startswith("| muon")}
    for name in ("base", "muon"):
        last = [r for r in map(json.loads, open(data / "q" / name / "log.jsonl")) if "val/bpb" in r][-1]
        unseen, val = float(rows[name][0]), float(rows[name][1])
        assert unseen == pytest.approx(last["val/bpb"] / 2, abs=1e-4)
        assert val == pytest.approx(last["val/bpb"], abs=1e-4)
    assert json.load(open(data / "q" / "muon" / "config.json"))["optimizer"] == "muon"
    assert json.load(open(data / "q" / "base" / "config.json"))["optimizer"] == "adamw"
    assert open(data / "q" / "table_gutenberg.txt").read() in out


def test_quality_script_default_rows_all_run(data):
    """Every row of BENCHMARKS.md's table as dev/quality.sh lists it parses and trains (a flag the shell mangles,
    such as a dict whose quotes it strips, fails its run); the drop2 row gets its dropout."""
    out = run_quality(quality_env(data))
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and "variant" not in line]
    assert [r[0].strip() for r in rows] == ["adamw_1800", "adamw_1490", "muon_1050", "muon_1650", "ctx2048", "drop0",
                                            "drop2", "wd", "d1_wd2", "drop0_wd2", "wd4_1400", "adamw_wd_1900",
                                            "wd2_1400", "lr15", "mwd3", "dec5", "mlr4", "mlr1", "cap30", "lr3",
                                            "config", "lr05"]
    for r in rows:
        float(r[1])  # an unseen-author bpb, not "failed"
    ran = json.load(open(data / "q" / "drop2" / "config.json"))
    assert (ran["model_config"]["dropout"], ran["weight_decay"], ran["muon_weight_decay"]) == (0.2, 0.1, 0.01)
    assert json.load(open(data / "q" / "mwd3" / "config.json"))["muon_weight_decay"] == 0.3
    lrs = {name: json.load(open(data / "q" / name / "config.json"))["lr"]
           for name in ("lr15", "mlr4", "config", "lr05")}
    assert lrs == {"lr15": 1.5e-3, "mlr4": 1.5e-3, "config": 7.5e-4, "lr05": 5e-4}  # rows before lr 7.5e-4 keep theirs
    assert json.load(open(data / "q" / "cap30" / "config.json"))["model_config"]["logit_softcap"] == 30.0


def test_checkpoint_with_a_tensor_muon_lr_resumes_eagerly(data):
    """A compiled Muon step on CUDA keeps its lr in a tensor, which checkpoints then hold; eager Muon takes only a
    float (add_(alpha=tensor) raises): the resumed run converts it and continues bit for bit as before."""
    common = ["--max_tokens=5120", "--grad_accum=2", "--optimizer=muon"]
    run(data, *common, f"--out_dir={data / 'a'}", "--checkpoint_every_steps=10")
    ckpt = checkpoint.load_checkpoint(str(data / "a" / "ckpt_0000010.pt"))
    muon_group = ckpt["optimizer"]["param_groups"][0]
    muon_group["lr"] = torch.tensor(muon_group["lr"])
    checkpoint.save_checkpoint(str(data / "b" / "ckpt.pt"), ckpt)
    run(data, *common, f"--out_dir={data / 'b'}", "--init_from=resume")
    straight, resumed = losses(data / "a"), losses(data / "b")
    assert sorted(resumed) == list(range(11, 21)) and all(straight[s] == resumed[s] for s in resumed)


FSDP_MUON = """
import copy, os, sys, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
sys.path.insert(0, sys.argv[1])
import model as M
dist.init_process_group("gloo")
torch.manual_seed(0)  # the same model and batch on both ranks
m = M.GPT(M.make_config("debug", vocab_size=256, block_size=32))
ref, before = copy.deepcopy(m), copy.deepcopy(m.state_dict())
for block in m.blocks:
    fully_shard(block)
fully_shard(m)
x = torch.randint(0, 256, (4, 33))
for model in (m, ref):
    opts = model.configure_optimizer(1e-3, 0.1, (0.9, 0.95), "cpu", muon=dict(lr=0.02, momentum=0.95, weight_decay=0))
    model(x[:, :-1], x[:, 1:]).backward()
    for opt in opts:
        opt.step()
for name in ("blocks.0.mlp.gate_up.weight", "blocks.1.attn.qkv.weight", "blocks.1.mlp.down.weight"):
    got = m.state_dict()[name].full_tensor() - before[name]
    want = ref.state_dict()[name] - before[name]
    halves = []  # what orthogonalizing each rank's shard alone would give
    for h in ref.get_parameter(name).grad.chunk(2):
        p = torch.nn.Parameter(torch.zeros_like(h))
        p.grad = h.clone()
        torch.optim.Muon([p], lr=0.02, momentum=0.95, weight_decay=0).step()
        halves.append(p.detach())
    rel = lambda a: ((a - want).norm() / want.norm()).item()
    if dist.get_rank() == 0:
        print("RESULT", name, rel(got), rel(torch.cat(halves)))
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)  # as train.py ends: gloo can abort the interpreter's teardown (SIGABRT) after all the work is done
"""


def test_muon_under_fsdp_orthogonalizes_whole_matrices(tmp_path):
    """torch.optim.Muon on FSDP2's sharded DTensors: the matmuls of its Newton-Schulz iteration gather, so an update
    is one process's within bf16 noise (measured 0-2.2% relative; a bf16-ulp change of the input moves it ~3%), not
    what orthogonalizing each rank's half alone gives (32-58% off)."""
    script = tmp_path / "fsdp_muon.py"
    script.write_text(FSDP_MUON)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script), ROOT], capture_output=True, text=True, timeout=300)
    rows = [line.split()[1:] for line in p.stdout.splitlines() if line.startswith("RESULT")]
    assert p.returncode == 0 and len(rows) == 3, p.stdout[-2000:] + p.stderr[-3000:]
    for name, fsdp, shard_local in rows:
        assert float(fsdp) < 0.05 and float(shard_local) > 0.25, (name, fsdp, shard_local)

