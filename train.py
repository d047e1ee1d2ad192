"""
Pretraining. Defaults are the module-level variables below; override them with config files and flags:

    python train.py config/debug.py                      # CPU, minutes
    python train.py config/a100_2day.py --max_tokens=2e9 # the 2-day A100 recipe, on 2B tokens
    torchrun --standalone --nproc_per_node=8 train.py config/a100_2day.py

Reads data_dir/{train,val}.bin + meta.json (prepare_data.py), calls model.py, writes out_dir/ckpt.pt (atomic; separate
copies ckpt_<step>.pt of the last K and best.pt by val loss), out_dir/log.jsonl and out_dir/config.json (what ran).
"""
import itertools
import json
import math
import os
import re
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist

from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)

import attention as A
import fp8
import model as M
from checkpoint import (check_tokenizer, gpu_faults_in_one_line, latest_checkpoint, load_model, make_out_dir,
                        read_checkpoint, remove_stale_temps, rng_state, run_logger, save_checkpoint, set_rng_state,
                        setup_device, step_checkpoints, stop_signals)
from configurator import check_values, configure
from model import GPT, GPTConfig, make_config

# ------------------------------------------------------------------------------------------------
# I/O
out_dir = "out/debug"
data_dir = "data/shakespeare_char"  # prepare_data.py output: train.bin/val.bin (or shards) + meta.json
eval_sets = {}  # more validation sets, reported separately: {"medqa": "data/medqa"} (each dir's val split)
init_from = "scratch"  # "scratch" | "resume" (newest loadable checkpoint in out_dir) | a .pt | a Qwen3-layout folder
# model
preset = "debug"  # a name in model.PRESETS
model_overrides = {}  # GPTConfig fields over the preset, e.g. {"dropout": 0.1, "tie_embeddings": True}
attention = "sdpa"  # attention.ATTENTION: "sdpa" | "flash"
precision = "bf16"  # "bf16" | "fp8": the blocks' matmuls in FP8 (fp8.convert_to_fp8)
residual = "autocast"  # model.RESIDUAL: the residual stream in the "autocast" dtype (bf16: faster, same loss) | "fp32"
checkpoint_activations = False  # recompute blocks in backward: less memory, more compute
trainable = "all"  # "all", or a substring: only parameters whose name contains it train (DSA warm-up: "indexer")
# batch: tokens per optimizer step = micro_batch * block_size * grad_accum * world_size
block_size = 256
micro_batch = 16
grad_accum = 1
curriculum = []  # sequence-length stages [(until_tokens, block_size, micro_batch), ...]; grad_accum adapts
# optimizer and schedule (in tokens, so a curriculum or another batch size keeps the same shape)
lr = 1e-3
min_lr = 1e-4
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # 0 = off
optimizer = "adamw"  # "adamw" | "muon": torch.optim.Muon for the blocks' Linear weights, AdamW (lr) for the rest
muon_lr = 0.02  # Keller Jordan's Muon lr (torch's "original" shape scaling); follows the schedule's shape like lr
muon_momentum = 0.95  # Muon's Nesterov momentum (its default)
muon_weight_decay = 0.01  # Muon decays by muon_lr * this per step: 2e-4, about AdamW's lr * weight_decay
schedule = "cosine"  # "cosine": warmup then cosine to min_lr | "wsd": warmup, hold, then linear decay
decay_fraction = 0.2  # wsd: the last fraction of training that decays to min_lr
warmup_tokens = 1_000_000
max_tokens = 10_000_000
# eval, logging, checkpoints
eval_every_steps = 250
eval_tokens = 1_000_000  # per validation set, contiguous windows from the start of the split
eval_only = False
log_every_steps = 10
checkpoint_every_steps = 500
keep_checkpoints = 2  # last K step checkpoints kept beside ckpt.pt and best.pt (each its own file)
max_bad_steps = 5  # non-finite loss/grad steps in a row before stopping with a checkpoint
max_failed_saves = 3  # checkpoint writes failing in a row (disk full) before stopping; 0 = never stop for it
# system
device = "auto"  # "auto" | "cpu" | "cuda"
dtype = "auto"  # "auto" (bfloat16 on GPU, float32 on CPU) | "bfloat16" | "float32"
compile = False
compile_scope = "model"  # compile=True: "model" (the whole; quickest step) | "blocks" (each block and the loss:
# cold compile 2.6-4x quicker, step 2-3% slower; for runs of minutes: model.compile_regions)
parallel = "ddp"  # several GPUs: "ddp" (a replica per GPU) | "fsdp" (FSDP2: parameters, grads, optimizer sharded)
seed = 1337
# ------------------------------------------------------------------------------------------------
PEAK_FLOPS = 989e12  # dense bf16 datasheet peak of H100 and H200: the MFU convention of README.md


def log0(*args):
    if RANK == 0:
        print(*args, flush=True)


def read_meta(path):
    meta_path = os.path.join(path, "meta.json")
    if not os.path.isfile(meta_path):
        raise SystemExit(f"no dataset at {path}: {meta_path} is missing; make one with prepare_data.py --out {path}")
    try:
        with open(meta_path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise SystemExit(f"dataset {path}: {meta_path} is not valid JSON ({e}); rerun prepare_data.py --out {path}")


class Batches:
    """Random windows of block_size + 1 tokens from memmapped shards, one RNG stream per rank.
    The state (RNG position) is saved in checkpoints, so a resumed run draws the same windows."""

    def __init__(self, path, split, meta, rank, seed):
        info = meta["splits"][split]
        self.dtype = np.dtype(meta["dtype"])
        self.shards = []
        for name in info["files"]:
            file = os.path.join(path, name)
            if not os.path.isfile(file):
                raise SystemExit(f"dataset {path} is incomplete: {file} is missing; rerun prepare_data.py")
            if os.path.getsize(file) % self.dtype.itemsize:
                raise SystemExit(f"{file} is not a whole number of {self.dtype} tokens: meta.json's dtype does not "
                                 "match the data")
            self.shards.append(np.memmap(file, dtype=self.dtype, mode="r"))
        self.sizes = np.array([len(s) for s in self.shards], dtype=np.float64)
        self.rng = np.random.default_rng([seed, rank])

    def state(self):
        return self.rng.bit_generator.state

    def set_state(self, state):
        self.rng.bit_generator.state = state

    def next(self, batch, length, device):
        if self.sizes.max() < length + 1:
            raise SystemExit(f"the data ({int(self.sizes.max())} tokens in its largest shard) is shorter than "
                             f"block_size + 1 = {length + 1}")
        ok = self.sizes >= length + 1
        shard_ids = self.rng.choice(len(self.shards), size=batch, p=ok * self.sizes / (ok * self.sizes).sum())
        rows = []
        for s in shard_ids:
            start = self.rng.integers(0, len(self.shards[s]) - length)
            rows.append(self.shards[s][start:start + length + 1])
        xy = torch.from_numpy(np.stack(rows).astype(np.int64))
        if device.type == "cuda":  # pinned + non_blocking: the copy overlaps the running step
            xy = xy.pin_memory().to(device, non_blocking=True)
        return xy[:, :-1], xy[:, 1:]


def lr_at(tokens):
    if tokens < warmup_tokens:
        return lr * (tokens + 1) / warmup_tokens
    if schedule == "cosine":
        progress = min(1.0, (tokens - warmup_tokens) / max(1, max_tokens - warmup_tokens))
        return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)
    decay_start = max_tokens * (1 - decay_fraction)  # wsd: hold at lr, then linear decay
    if tokens < decay_start:
        return lr
    return lr - (lr - min_lr) * min(1.0, (tokens - decay_start) / max(1, max_tokens - decay_start))


def stage_at(tokens):
    """(block_size, micro_batch, grad_accum) for the curriculum stage at `tokens`."""
    for until, stage_block, stage_batch in curriculum:
        if tokens < until:
            return stage_block, stage_batch, tokens_per_step // (stage_block * stage_batch * WORLD)
    return block_size, micro_batch, grad_accum


@torch.no_grad()
def evaluate(model, sets):
    """Loss, perplexity, bits per token and byte, next-token accuracy on each validation set."""
    model.eval()
    results = {}
    for name, (shards, tokens_per_byte) in sets.items():
        T = block_size  # the first eval_tokens of the split in contiguous windows, shard after shard
        windows = list(itertools.islice(((s, i * T) for s in shards for i in range((len(s) - 1) // T)),
                                        max(1, eval_tokens // T)))
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        correct = torch.zeros((), dtype=torch.float64, device=dev)
        count = torch.zeros((), dtype=torch.float64, device=dev)
        for w0 in range(RANK * micro_batch, len(windows), WORLD * micro_batch):  # ranks take disjoint windows
            rows = [shard[a:a + T + 1] for shard, a in windows[w0:w0 + micro_batch]]
            xy = torch.from_numpy(np.stack(rows).astype(np.int64)).to(dev)
            with autocast:
                losses, hits = raw_model.token_stats(xy[:, :-1], xy[:, 1:])
            loss_sum += losses.double().sum()
            correct += hits.double().sum()
            count += losses.numel()
        if WORLD > 1:
            for t in (loss_sum, correct, count):
                dist.all_reduce(t)
        loss = (loss_sum / count.clamp(min=1)).item()
        results[name] = {"loss": loss, "ppl": math.exp(min(loss, 50)), "bits_per_token": loss / math.log(2),
                         "bpb": loss / math.log(2) * tokens_per_byte, "acc": (correct / count.clamp(min=1)).item(),
                         "tokens": int(count.item())}
    model.train()
    return results


def print_eval(results, step=None):
    for name, r in results.items():
        log0(f"eval{'' if step is None else f' step {step}'} {name}: loss {r['loss']:.4f} ppl {r['ppl']:.2f} "
             f"bits/token {r['bits_per_token']:.4f} bpb {r['bpb']:.4f} acc {r['acc']:.4f} ({r['tokens']:,} tokens)")


def checkpoint_dict(step, tokens_seen, best_val_loss):
    """Full (unsharded) state on every rank's call, keyed by parameter name: a checkpoint of N GPUs, DDP or FSDP,
    resumes on any other number. Under FSDP gathering is collective, so every rank calls this."""
    full = StateDictOptions(full_state_dict=True, cpu_offload=FSDP)  # offloading gathers to rank 0: FSDP only
    model_state = raw_model.state_dict() if not FSDP else get_model_state_dict(raw_model, options=full)
    return {"model_config": asdict(raw_model.cfg), "model": model_state,
            "optimizer": get_optimizer_state_dict(raw_model, optimizers, options=full),
            # data_state: the loader before the prefetched batch, so a resume draws it again
            "step": step, "tokens_seen": tokens_seen, "data_state": pending_state,
            "rng": rng_state(dev),
            "config": config, "tokenizer": tokenizer_meta, "best_val_loss": best_val_loss, "kind": "pretrain"}


def write_checkpoint(step, tokens_seen, best_val_loss, is_best=False):
    """ckpt.pt, and as separate files ckpt_<step>.pt (the last K) and best.pt: one bad file never spoils another.
    -> whether it was written, on every rank (they count failed saves alike and stop together)."""
    ckpt = checkpoint_dict(step, tokens_seen, best_val_loss) if RANK == 0 or FSDP else None
    ok = True
    if RANK == 0:
        path = os.path.join(out_dir, "ckpt.pt")
        names = [f"ckpt_{step:07d}.pt"] * (keep_checkpoints > 0) + ["best.pt"] * is_best
        ok = save_checkpoint(path, ckpt, [os.path.join(out_dir, n) for n in names])  # warns when it fails
        if ok:
            old = step_checkpoints(out_dir)
            try:
                for name in old[:len(old) - keep_checkpoints]:
                    os.remove(os.path.join(out_dir, name))
            except OSError as e:  # an old copy left behind costs disk, not the run
                log0(f"WARNING: could not remove an old checkpoint ({e})")
            log0(f"saved checkpoint at step {step} to {path}")
    if WORLD > 1:
        flag = torch.tensor([float(ok)], device=dev)
        dist.broadcast(flag, 0)
        ok = flag.item() > 0
    return ok


# ------------------------------------------------------------------------------------------------
if __name__ == "__main__":
    _default_preset = preset  # not a config key: tells a --preset given on the command line from the default
    config = configure(globals())

    def fault_where():  # for an out-of-memory or CUDA error: the step, and what --init_from=resume would continue from
        ckpt = os.path.join(out_dir, "ckpt.pt")
        return (f"at step {step}" if "step" in globals() else "before training") + (
            f"; --init_from=resume continues from {ckpt}" if os.path.isfile(ckpt) else "; no checkpoint written")
    gpu_faults_in_one_line(fault_where, "lower micro_batch (a grad_accum as many times higher keeps the tokens per "
                           "step) or set --checkpoint_activations=True")
    check_values(config, {"schedule": ("cosine", "wsd"), "optimizer": ("adamw", "muon"), "precision": ("bf16", "fp8"),
                          "compile_scope": ("model", "blocks"), "parallel": ("ddp", "fsdp"),
                          "attention": ("sdpa", "flash"), "residual": ("autocast", "fp32")},
                 ("block_size", "micro_batch", "grad_accum", "log_every_steps"),
                 ("lr", "min_lr", "weight_decay", "muon_lr", "muon_weight_decay", "grad_clip", "warmup_tokens"))
    if "checkpoint_activations" in model_overrides:  # train.py's own key sets it, and would silently win
        raise SystemExit("config error: set --checkpoint_activations=True, not in model_overrides")
    if not 0 <= decay_fraction <= 1:
        raise SystemExit(f"config error: decay_fraction must be in [0, 1], not {decay_fraction}")
    if any(not isinstance(stage, (tuple, list)) or len(stage) != 3 for stage in curriculum):
        raise SystemExit(f"config error: curriculum takes (until_tokens, block_size, micro_batch) stages, not "
                         f"{curriculum!r}")
    RANK, WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    LOCAL_RANK = int(os.environ.get("LOCAL_RANK", 0))
    tokens_per_step = micro_batch * block_size * grad_accum * WORLD
    for until, stage_block, stage_batch in curriculum:
        if tokens_per_step % (stage_block * stage_batch * WORLD):
            raise SystemExit(f"curriculum stage ({until}, {stage_block}, {stage_batch}) does not divide "
                             f"{tokens_per_step} tokens per step")
    dev, autocast, dtype = setup_device(device, dtype, seed + RANK, LOCAL_RANK)
    if WORLD > 1:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    A.ATTENTION, M.RESIDUAL = attention, residual
    if RANK == 0 and not eval_only:  # eval_only may read a run that is still writing: its temp files are live
        remove_stale_temps(out_dir)

    # ---- data (checked before any GPU work) ----
    meta = read_meta(data_dir)
    tokenizer_meta = {k: meta[k] for k in ("tokenizer", "vocab_size", "eos_id", "chars") if k in meta}
    train_batches = Batches(data_dir, "train", meta, RANK, seed)
    if "val" not in meta["splits"]:
        raise SystemExit(f"dataset {data_dir} has no val split (its loss picks best.pt); rerun prepare_data.py")
    # every split of data_dir but train, by its own name (val first, unseen_authors, ...), then each eval set's val
    splits = sorted((s for s in meta["splits"] if s != "train"), key=lambda s: s != "val")
    targets = [(split, data_dir, split) for split in splits]
    val_sets = {}
    for name, path, split in targets + [(name, path, "val") for name, path in eval_sets.items()]:
        if name in val_sets:
            raise SystemExit(f"eval set {name!r} has the name of a split of {data_dir}; rename it in eval_sets")
        m = read_meta(path)
        if m["tokenizer"] != meta["tokenizer"] or m["vocab_size"] != meta["vocab_size"]:
            raise SystemExit(f"eval set {name} ({path}) uses tokenizer {m['tokenizer']}/{m['vocab_size']}, "
                             f"the training data {meta['tokenizer']}/{meta['vocab_size']}")
        if split not in m["splits"]:
            raise SystemExit(f"eval set {name}: {path} has no {split} split; prepare it with prepare_data.py")
        info = m["splits"][split]
        if not info["tokens"]:  # e.g. an empty val split: train on, without this eval
            log0(f"eval set {name}: {path} has no {split} tokens; skipping its eval")
            continue
        val_sets[name] = (Batches(path, split, m, 0, 0).shards, info["tokens"] / max(1, info["bytes"]))
    if eval_only and not val_sets:
        raise SystemExit(f"eval_only: no validation tokens in {data_dir} or eval_sets")

    # ---- model ----
    start_step, tokens_seen, best_val_loss, ckpt = 0, 0, float("inf"), None
    if init_from == "scratch":
        vocab = -(-meta["vocab_size"] // 64) * 64  # pad the vocab to a multiple of 64: faster matmuls
        try:
            model_config = asdict(make_config(preset, **{"vocab_size": vocab, "block_size": block_size,
                                                         **model_overrides}))
        except ValueError as e:  # an unknown preset or model field
            raise SystemExit(str(e))
    else:
        if init_from == "resume":
            source, ckpt = latest_checkpoint(out_dir)
            log0(f"resuming from {source} at step {ckpt['step']}")
        else:
            source = init_from
            own = re.fullmatch(r"ckpt(_\d+)?\.pt|best\.pt", os.path.basename(init_from))
            in_out_dir = os.path.realpath(os.path.dirname(os.path.abspath(init_from))) == os.path.realpath(out_dir)
            if own and in_out_dir and not eval_only:  # eval_only writes no checkpoint: nothing to overwrite
                raise SystemExit(f"--init_from={init_from} is in out_dir, where this run's checkpoints would overwrite "
                                 "or delete it: --init_from=resume continues that run; or start from it in another "
                                 "out_dir")
            ckpt = read_checkpoint(init_from)
        check_tokenizer(ckpt, meta, source, data_dir)
        ran = ckpt.get("config") or {}
        if preset != _default_preset and preset != ran.get("preset", preset):
            message = f"preset {preset!r} is not {source}'s ({ran['preset']!r}): the model comes from the checkpoint"
            if init_from == "resume":
                raise SystemExit(f"{message}; drop --preset to resume, or use another out_dir")
            log0(f"note: {message}")
        changed = {k: v for k, v in model_overrides.items() if ckpt["model_config"].get(k) != v}
        if init_from == "resume" and changed:
            raise SystemExit(f"model_overrides {changed} differ from {source}'s model; a resumed run continues that "
                             f"model: drop them, or start from it with --init_from={source} and another out_dir")
        trained_with = ran.get("optimizer", "adamw")
        if init_from == "resume" and trained_with != optimizer:
            raise SystemExit(f"{source} was trained with optimizer={trained_with}; resume with --optimizer="
                             f"{trained_with}, or --init_from={source} with another out_dir keeps its weights only")
        config["preset"] = ran.get("preset", preset)  # config.json and the checkpoints record what ran
        if init_from == "resume":
            config["model_overrides"] = ran.get("model_overrides", model_overrides)
        model_config = {**ckpt["model_config"], **model_overrides}
    if meta["vocab_size"] > model_config["vocab_size"]:
        raise SystemExit(f"dataset {data_dir} has vocab {meta['vocab_size']} but the model only "
                         f"{model_config['vocab_size']}: wrong data_dir or vocab_size")
    max_block = max([block_size] + [b for _, b, _ in curriculum])
    if max_block > model_config["block_size"]:
        raise SystemExit(f"block_size {max_block} is longer than the model's context {model_config['block_size']}")
    if ckpt is None:
        raw_model = GPT(GPTConfig(**{**model_config, "checkpoint_activations": checkpoint_activations}))
    else:  # strict but for a dense checkpoint starting DSA: its new indexer weights start fresh
        strict = not (model_overrides.get("dsa_top_k") and not ckpt["model_config"].get("dsa_top_k"))
        raw_model = load_model(ckpt, "cpu", strict, name=source,
                               **{**model_overrides, "checkpoint_activations": checkpoint_activations})[0]
    cfg = raw_model.cfg
    if precision == "fp8":  # same parameters and state_dict: checkpoints load either way
        fp8.convert_to_fp8(raw_model)
    if trainable != "all":
        for name, p in raw_model.named_parameters():
            p.requires_grad = trainable in name
        if not any(p.requires_grad for p in raw_model.parameters()):
            raise SystemExit(f"trainable={trainable!r} matches no parameter name")
    raw_model.to(dev)
    FSDP = WORLD > 1 and parallel == "fsdp"
    if FSDP:  # shard each block, then the rest (embeddings, head); the optimizer then holds only this rank's shard
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
        for block in raw_model.blocks:
            fully_shard(block)
        fully_shard(raw_model)
        register_fsdp_forward_method(raw_model, "token_stats")  # eval calls it instead of forward
    muon = dict(lr=muon_lr, momentum=muon_momentum, weight_decay=muon_weight_decay) if optimizer == "muon" else None
    optimizers = raw_model.configure_optimizer(lr, weight_decay, (beta1, beta2), dev.type, muon=muon)
    optimizers = optimizers if isinstance(optimizers, list) else [optimizers]  # muon: [Muon, AdamW]
    if init_from == "resume":
        try:
            set_optimizer_state_dict(raw_model, optimizers, ckpt["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        except (KeyError, ValueError, TypeError):  # an optimizer state keyed by index (older or grpo.py checkpoints)
            raise SystemExit(f"{source} has no optimizer state keyed by parameter name, as train.py writes it; "
                             f"--init_from={source} with another out_dir keeps its weights, with a fresh optimizer")
        start_step, tokens_seen, best_val_loss = ckpt["step"], ckpt["tokens_seen"], ckpt["best_val_loss"]
        train_batches.set_state(ckpt["data_state"])
        set_rng_state(ckpt["rng"], dev)
    del ckpt
    # Muon's eager step launches ~25 small kernels per matrix from Python (20 ms a step at config/gutenberg.py's shape,
    # 6 of them on the GPU): compiled, it replays as a CUDA graph, its lr a tensor the loop fills (a float is baked in).
    # Under FSDP it stays eager: there its matrices are sharded DTensors, whose matmuls gather (so Muon is right).
    opt_steps = []
    for opt in optimizers:
        graph = compile and dev.type == "cuda" and not FSDP and isinstance(opt, torch.optim.Muon)
        for group in opt.param_groups:  # eager Muon takes a float: either way, whatever a checkpoint held
            group["lr"] = torch.tensor(float(group["lr"]), device=dev) if graph else float(group["lr"])
        opt_steps.append(torch.compile(opt.step, backend="cudagraphs") if graph else opt.step)
    if compile and compile_scope == "blocks":
        M.compile_regions(raw_model)
    model = torch.compile(raw_model) if compile and compile_scope == "model" else raw_model
    if WORLD > 1 and not FSDP:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[LOCAL_RANK] if dev.type == "cuda" else None)

    # steps left from the tokens left: a run resumed with another batch or GPU count still stops at max_tokens
    max_steps = start_step + max(0, math.ceil((max_tokens - tokens_seen) / tokens_per_step))
    if RANK == 0:
        make_out_dir(out_dir)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump({**config, "model_config": asdict(cfg)}, f, indent=1)
        log0(json.dumps(config, indent=1))
        log0(f"switches: ATTENTION={A.ATTENTION} PRECISION={precision} RESIDUAL={M.RESIDUAL} dtype={dtype} "
             f"compile={compile and compile_scope} device={dev} world={WORLD} optimizer={optimizer}")
        log0(f"model: {raw_model.num_params():,} parameters ({raw_model.matmul_params():,} in matmuls), {asdict(cfg)}")
        log0(f"data: {meta['splits']['train']['tokens']:,} train tokens; {tokens_per_step:,} tokens/step, "
             f"{max_steps:,} steps")

    if eval_only:
        print_eval(evaluate(model, val_sets))
        sys.exit(0)

    # ---- training loop ----
    stop_signal = stop_signals()  # preemption / Ctrl-C: finish the step, checkpoint, exit 0
    resume_step = start_step if init_from == "resume" else None  # the log keeps the lines up to it
    log_record = run_logger(out_dir, resume_step) if RANK == 0 else (lambda record: None)

    step, bad_steps, failed_saves, t_start, data_s = start_step, 0, 0, time.time(), 0.0
    t_last, tokens_last = time.time(), tokens_seen
    cur_block, cur_batch, cur_accum = stage_at(tokens_seen)
    pending_state = train_batches.state()  # loader state before the prefetched batch: what a checkpoint saves
    x, y = train_batches.next(cur_batch, cur_block, dev)
    while step < max_steps:
        lr_now = lr_at(tokens_seen)
        muon_lr_now = muon_lr * lr_now / lr if lr else 0.0  # Muon follows the same schedule from its own peak
        for opt in optimizers:
            for group in opt.param_groups:
                value = muon_lr_now if isinstance(opt, torch.optim.Muon) else lr_now
                if torch.is_tensor(group["lr"]):
                    group["lr"].fill_(value)
                else:
                    group["lr"] = value
        loss_sum = torch.zeros((), device=dev)
        for micro in range(cur_accum):
            sync = micro == cur_accum - 1
            ctx = model.no_sync() if WORLD > 1 and not FSDP and not sync else nullcontext()  # all-reduce once per step
            if FSDP:
                raw_model.set_requires_gradient_sync(sync)  # reduce-scatter once per step
            with ctx:
                with autocast:
                    loss = model(x, y)
                (loss / cur_accum).backward()
            loss_sum += loss.detach()
            if sync:  # the next step may be in another curriculum stage
                nxt_block, nxt_batch, nxt_accum = stage_at(tokens_seen + tokens_per_step)
            else:
                nxt_block, nxt_batch = cur_block, cur_batch
            pending_state = train_batches.state()
            t_data = time.perf_counter()
            x, y = train_batches.next(nxt_batch, nxt_block, dev)  # fetched while the GPU runs this micro-step
            data_s += time.perf_counter() - t_data
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
        loss_val, grad_norm = (loss_sum / cur_accum).item(), grad_norm.item()  # synced once per step
        if not (math.isfinite(loss_val) and math.isfinite(grad_norm)):  # skip the update, keep the weights
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            bad_steps += 1
            log0(f"step {step}: non-finite loss {loss_val} / grad-norm {grad_norm}: update skipped "
                 f"({bad_steps} in a row)")
            log_record({"step": step, "skipped": 1, "loss": loss_val})
            if bad_steps >= max_bad_steps:
                write_checkpoint(step, tokens_seen, best_val_loss)
                raise SystemExit(f"stopping: {bad_steps} non-finite steps in a row; the last good weights are in "
                                 f"{out_dir}/ckpt.pt")
        else:
            for opt, opt_step in zip(optimizers, opt_steps):
                opt_step()
                opt.zero_grad(set_to_none=True)
            bad_steps = 0
        step += 1
        tokens_seen += tokens_per_step
        step_block, (cur_block, cur_batch, cur_accum) = cur_block, (nxt_block, nxt_batch, nxt_accum)
        if step % log_every_steps == 0 or step == max_steps:
            now = time.time()
            tok_s = (tokens_seen - tokens_last) / (now - t_last)
            mfu = tok_s * raw_model.flops_per_token(step_block) / (PEAK_FLOPS * WORLD)
            mem = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else 0.0
            eta = (max_steps - step) * (now - t_start) / (step - start_step)
            # host time in the loader over wall time: an upper bound on how long the GPU could have waited for data
            data_share = data_s / (now - t_last)
            log0(f"step {step}/{max_steps} | loss {loss_val:.4f} | lr {lr_now:.2e} | grad-norm {grad_norm:.3f} | "
                 f"{tok_s:,.0f} tok/s | MFU {100 * mfu:.1f}% | mem {mem:.1f} GiB | data {100 * data_share:.1f}% | "
                 f"ETA {eta / 60:.1f} min")
            # DSA reports its lm and indexer losses apart
            parts = {f"loss_{k}": v.item() for k, v in getattr(raw_model, "last_losses", {}).items()}
            if parts:
                log0("    " + " | ".join(f"{k} {v:.4f}" for k, v in parts.items()))
            log_record({"step": step, "tokens": tokens_seen, "loss": loss_val, "lr": lr_now, "grad_norm": grad_norm,
                        "tokens_per_s": tok_s, "mfu": mfu, "mem_gib": mem, "block_size": step_block,
                        "time": now - t_start, "data_share": data_share, **parts})
            t_last, tokens_last, data_s = now, tokens_seen, 0.0
        else:
            log_record({"step": step, "tokens": tokens_seen, "loss": loss_val, "lr": lr_now, "grad_norm": grad_norm})
        stopping = bool(stop_signal)
        if WORLD > 1:  # every rank stops at the same step
            flag = torch.tensor([float(stopping)], device=dev)
            dist.all_reduce(flag)
            stopping = flag.item() > 0
        is_best = False
        if eval_every_steps and val_sets and (step % eval_every_steps == 0 or step == max_steps):
            t_eval = time.time()
            results = evaluate(model, val_sets)
            print_eval(results, step)
            log_record({"step": step, "tokens": tokens_seen,
                        **{f"{n}/{k}": v for n, r in results.items() for k, v in r.items()}})
            is_best = "val" in results and results["val"]["loss"] < best_val_loss
            best_val_loss = min(best_val_loss, results.get("val", {"loss": best_val_loss})["loss"])
            t_last += time.time() - t_eval  # tokens/s counts training time only
        if stopping or is_best or step == max_steps or (checkpoint_every_steps and step % checkpoint_every_steps == 0):
            failed_saves = 0 if write_checkpoint(step, tokens_seen, best_val_loss, is_best) else failed_saves + 1
            if max_failed_saves and failed_saves >= max_failed_saves:
                raise SystemExit(f"stopping at step {step}: {failed_saves} checkpoint writes in a row failed (disk "
                                 f"full?); the last good checkpoint is in {out_dir}; free space, then "
                                 "--init_from=resume")
        if stopping:
            log0(f"stopped by signal after step {step}; resume with --init_from=resume")
            break
    if WORLD > 1:
        dist.barrier()  # leave together: a gloo rank that tore down while rank 0 still wrote its checkpoint could abort
        dist.destroy_process_group()
    if failed_saves:  # the run finished, but its newest steps are not on disk: not a success
        raise SystemExit(f"the last checkpoint could not be written; the newest good one is in {out_dir}")
    if WORLD > 1:  # with gloo, ~1 finished run in 10 on two busy cores aborted (SIGABRT) in the interpreter's teardown,
        if RANK == 0:  # after all was saved: leave at once, the files flushed (only rank 0 keeps a log)
            log_record.close()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
