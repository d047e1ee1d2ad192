"""
One checkpoint format for train.py, grpo.py, sample.py, eval and export: a dict of tensors and plain
Python values (model config, weights, optimizer, step, data position, RNG states, the resolved run
config, the tokenizer), written atomically and read with torch.load(weights_only=True), so loading
never runs pickled code from a file someone handed you. Also the run set-up that train.py and grpo.py
share: device and autocast, seeds, RNG state, stop signals, GPU faults in one line, the JSON-lines log.
"""
import json
import os
import re
import shutil
import signal
import sys
from contextlib import nullcontext

import torch

from model import GPT, GPTConfig


def save_checkpoint(path, ckpt, copies=()):
    """Write to a temporary file, fsync, then rename: a crash or a full disk never leaves a half-written file in place
    of a good one. copies: more paths that get their own file (not a hard link, so one bad block spoils one copy).
    Returns True when all are written; on failure prints one warning and returns False."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    done, target = [], path
    try:
        for target in [path, *copies]:
            tmp = f"{target}.tmp{os.getpid()}"
            with open(tmp, "wb") as f:
                if target == path:
                    torch.save(ckpt, f)
                else:  # a byte copy of path: serialized once
                    with open(path, "rb") as src:
                        shutil.copyfileobj(src, f, 1 << 24)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
            done.append(target)
        return True
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError, not OSError
        kept = f"{path} is written" if done else "the previous checkpoint is intact"
        print(f"WARNING: could not write {target} ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}); "
              f"{kept}", flush=True)
        return False
    finally:
        if os.path.exists(f"{target}.tmp{os.getpid()}"):
            os.remove(f"{target}.tmp{os.getpid()}")


def remove_stale_temps(out_dir):
    """Delete the *.pt.tmp<pid> files a killed writer left in out_dir (a run owns its out_dir: at start all are
    stale). -> the names removed."""
    stale = [n for n in os.listdir(out_dir) if re.fullmatch(r".+\.pt\.tmp\d+", n)] if os.path.isdir(out_dir) else []
    for name in stale:
        os.remove(os.path.join(out_dir, name))
    if stale:
        print(f"removed {len(stale)} unfinished checkpoint file(s) a killed run left in {out_dir}: {', '.join(stale)}")
    return stale


def load_checkpoint(path, map_location="cpu"):
    if not os.path.isfile(path):
        raise SystemExit(f"{path} is a folder, not a checkpoint file (.pt)" if os.path.isdir(path) else
                         f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, empty, corrupt, or holding objects we refuse to unpickle
        first = (str(e).splitlines() or [""])[0][:200]
        raise SystemExit(f"cannot read checkpoint {path}: it is truncated, corrupt or not a checkpoint of this project "
                         f"({type(e).__name__}: {first})")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise SystemExit(f"{path} is not a checkpoint of this project (no model / model_config)")
    return ckpt


def read_checkpoint(source):
    """A checkpoint .pt, or a Qwen3-layout folder read as one (load_hf_folder). -> checkpoint dict."""
    return load_hf_folder(source) if os.path.isdir(source) else load_checkpoint(source)


def step_checkpoints(out_dir):
    """The names ckpt_<step>.pt in out_dir, oldest step first (by number: past 9,999,999 the names grow a digit)."""
    names = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    return sorted((n for n in names if re.fullmatch(r"ckpt_\d+\.pt", n)), key=lambda n: int(n[5:-3]))


def latest_checkpoint(out_dir, map_location="cpu"):
    """The newest checkpoint in out_dir that loads: ckpt.pt, else ckpt_<step>.pt newest first (says which it took).
    -> (path, checkpoint dict)."""
    candidates = [os.path.join(out_dir, n) for n in ["ckpt.pt"] + step_checkpoints(out_dir)[::-1]]
    failed = []
    for path in candidates:
        if not os.path.isfile(path):
            continue
        try:
            ckpt = load_checkpoint(path, map_location)
        except SystemExit as e:
            failed.append(str(e))
            continue
        if failed:
            print(f"WARNING: {failed[0]}; resuming from {path} (step {ckpt.get('step')}) instead", flush=True)
        return path, ckpt
    if failed:
        raise SystemExit(f"no checkpoint in {out_dir} loads: {' | '.join(failed)}")
    raise SystemExit(f"nothing to resume: {out_dir} has no ckpt.pt or ckpt_<step>.pt; start with --init_from=scratch")


def check_tokenizer(ckpt, meta, source, data_dir):
    """Refuse data whose token ids mean something else than the checkpoint's: another tokenizer, vocab size or, for
    char tokenizers, character table (the ids would silently map to other characters)."""
    tok = ckpt.get("tokenizer") or {}
    if tok.get("tokenizer", meta["tokenizer"]) != meta["tokenizer"]:
        raise SystemExit(f"{source} was trained with tokenizer {tok['tokenizer']}, but {data_dir} uses "
                         f"{meta['tokenizer']}")
    if tok.get("vocab_size", meta["vocab_size"]) != meta["vocab_size"]:
        raise SystemExit(f"{source} was trained with tokenizer {tok['tokenizer']} of vocab {tok['vocab_size']}, but "
                         f"{data_dir} has vocab {meta['vocab_size']}: prepare the data with the checkpoint's tokenizer")
    if "chars" in tok and "chars" in meta and tok["chars"] != meta["chars"]:
        diff = "".join(sorted(set(tok["chars"]) ^ set(meta["chars"])))
        how = f"characters in one only: {diff[:40]!r}" if diff else "the same characters in another order"
        raise SystemExit(f"{source} was trained on another character table than {data_dir} ({how}): its ids would "
                         "mean other characters; prepare the data with the checkpoint's characters")


def load_model(source, device="cpu", strict=True, name=None, **overrides):
    """The one model loader: source is a checkpoint path, a Qwen3-layout folder or an already loaded checkpoint dict
    (name: where it came from, for errors); overrides replace GPTConfig fields (e.g. dropout=0.0). strict=False lets
    only DSA indexer weights be missing (a dense checkpoint starting DSA). -> (model on device, checkpoint dict)."""
    if isinstance(source, dict):
        ckpt, name = source, name or "the checkpoint"
    else:
        ckpt, name = read_checkpoint(source), source
    fields = {**ckpt["model_config"], **overrides}
    unknown = sorted(set(fields) - set(GPTConfig.__dataclass_fields__))
    if unknown:  # a checkpoint of a newer model.py, or a mistyped override
        raise SystemExit(f"{name}: model fields {unknown} are unknown to this model.py (GPTConfig has "
                         f"{sorted(GPTConfig.__dataclass_fields__)})")
    model = GPT(GPTConfig(**fields))
    state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in ckpt["model"].items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if strict or "indexer" not in k]:
        raise SystemExit(f"{name} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(device), ckpt


def setup_device(device="auto", dtype="auto", seed=0, local_rank=0):
    """Resolve "auto", seed torch, allow TF32. -> (torch.device, autocast context, dtype name)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("device=cuda but no GPU is visible; use --device=cpu (and a small model)")
    dev = torch.device(f"cuda:{local_rank}" if device == "cuda" else device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if dtype == "auto":
        dtype = "bfloat16" if dev.type == "cuda" else "float32"
    if dtype not in ("bfloat16", "float32"):
        raise SystemExit(f"dtype must be 'auto', 'bfloat16' or 'float32', not {dtype!r}")
    torch.manual_seed(seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    return dev, autocast, dtype


def rng_state(dev):
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if dev.type == "cuda" else None}


def set_rng_state(state, dev):
    torch.set_rng_state(state["torch"])
    if dev.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


def make_out_dir(out_dir):
    """os.makedirs, with one line (not a traceback) when the folder cannot be made: a file in the way, no permission."""
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"cannot create out_dir {out_dir}: {e.strerror}")


def stop_signals():
    """SIGTERM (preemption) and SIGINT (Ctrl-C) append to the returned list instead of killing the run: the loop
    finishes its step, checkpoints and exits 0."""
    received = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, f: received.append(s))
    return received


def gpu_faults_in_one_line(where, hint):
    """Out of GPU memory and CUDA errors (after which the process cannot use its GPU) end the run in one line on
    stderr, exit status 1, not a traceback: what failed, where() (the step, the checkpoint to resume from) and, for
    memory, hint (what to lower). Other exceptions keep their traceback; so does a CUDA error under
    CUDA_LAUNCH_BLOCKING=1 (asked for where it failed)."""
    default = sys.excepthook

    def hook(kind, err, tb):
        if issubclass(kind, torch.OutOfMemoryError):
            print(f"out of GPU memory {where()}: {hint} ({' '.join(str(err).split())})", file=sys.stderr)
        elif issubclass(kind, torch.AcceleratorError):
            if os.environ.get("CUDA_LAUNCH_BLOCKING") == "1":
                default(kind, err, tb)
            print(f"the GPU failed {where()}: {(str(err).splitlines() or [''])[0]}: a kernel fault or the GPU itself "
                  "(dmesg shows an Xid); CUDA_LAUNCH_BLOCKING=1 shows which call", file=sys.stderr)
        else:
            default(kind, err, tb)
    sys.excepthook = hook


def run_logger(out_dir, resume_step=None):
    """log(record): one JSON line in out_dir/log.jsonl, and TensorBoard scalars when tensorboard is installed.
    resume_step: keep the lines up to that step and drop the rest (steps a resumed run will redo); None = a new log."""
    path = os.path.join(out_dir, "log.jsonl")
    kept = []
    if resume_step is not None and os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
                except json.JSONDecodeError:  # a line cut by a kill: the steps after it are redone anyway
                    break
    log_file = open(path, "w")
    log_file.writelines(kept)
    log_file.flush()
    try:
        from torch.utils.tensorboard import SummaryWriter
        tb = SummaryWriter(os.path.join(out_dir, "tb"))
    except ImportError:
        tb = None

    def log(record):
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()
        for k, v in record.items() if tb else ():
            if isinstance(v, (int, float)) and k != "step":
                tb.add_scalar(k, v, record["step"])

    def close():  # log.close(): the log and TensorBoard's pending events to disk
        log_file.close()
        if tb:
            tb.close()
    log.close = close
    return log


# ---------------------------------------------------------------------------------------------
# A transformers folder in the Qwen3 layout (export_hf.py writes one; small Qwen3 models on the Hub are
# others) -> a checkpoint dict of the format above, so init_from can start from it. safetensors only.
# sha256 of GPT-2's vocab + merges, hashed as _hf_tokenizer_entry does
GPT2_TOKENIZER_SHA256 = "0fe5cf15f4554236dcaf74ee007f079a6a48b179f1c8c1ceaa18fb04c422264e"


def _hf_tokenizer_entry(folder):
    """The checkpoint's "tokenizer" entry for the folder's tokenizer.json: "gpt2" when it is exactly GPT-2's BPE
    (so data prepared with tiktoken matches it), else the file's path; None when the folder has none."""
    import hashlib
    from tokenizer import hf_tokenizer
    path = os.path.join(os.path.abspath(folder), "tokenizer.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        bpe = json.load(f)["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]
    text = json.dumps([sorted(bpe.get("vocab", {}).items()), merges], ensure_ascii=False)
    digest = hashlib.sha256(text.encode()).hexdigest()
    if digest == GPT2_TOKENIZER_SHA256:
        return {"tokenizer": "gpt2", "vocab_size": 50257, "eos_id": 50256}
    tok = hf_tokenizer(path)  # the vocab size and EOS that tokenizer.load_tokenizer will check against
    return {"tokenizer": path, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id}


def load_hf_folder(folder):
    """Read config.json + model.safetensors (or its shards) of a Qwen3ForCausalLM folder into a checkpoint dict
    (kind "hf": weights, model config and tokenizer; no optimizer, step 0). Anything we cannot represent exactly
    (other architectures, biases, sliding windows, RoPE scaling, pickled .bin weights) is refused with one line."""
    from dataclasses import asdict
    from safetensors.torch import load_file
    from model import from_hf_state_dict, to_hf_state_dict
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise SystemExit(f"{folder} is not a transformers model folder (no config.json)")
    with open(cfg_path) as f:
        hc = json.load(f)
    arch = hc.get("architectures") or [hc.get("model_type")]
    if "Qwen3ForCausalLM" not in arch and hc.get("model_type") != "qwen3":
        raise SystemExit(f"{folder}: architecture {arch} is not Qwen3ForCausalLM; only Qwen3-layout models load "
                         "(dense: RMSNorm, QK-norm, GQA, SwiGLU, no biases)")
    rope = hc.get("rope_parameters") or {}
    scaling = hc.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", scaling.get("rope_type", scaling.get("type", "default"))))
    problems = [f"{k}={hc.get(k)}" for k, ok in [("attention_bias", False), ("use_sliding_window", False),
                                                   ("hidden_act", "silu")] if hc.get(k, ok) != ok]
    if rope_type != "default":
        problems.append(f"rope type {rope_type!r} (RoPE scaling)")
    if set(hc.get("layer_types") or ["full_attention"]) != {"full_attention"}:
        problems.append(f"layer_types {sorted(set(hc['layer_types']))} (sliding-window layers)")
    if problems:
        raise SystemExit(f"{folder}: {', '.join(problems)} has no equivalent in model.py; cannot load it")
    n_head = hc["num_attention_heads"]
    cfg = GPTConfig(vocab_size=hc["vocab_size"], n_layer=hc["num_hidden_layers"], n_embd=hc["hidden_size"],
                    n_head=n_head, n_kv_head=hc.get("num_key_value_heads") or n_head,
                    head_dim=hc.get("head_dim") or hc["hidden_size"] // n_head, mlp_hidden=hc["intermediate_size"],
                    block_size=hc["max_position_embeddings"],
                    rope_theta=float(rope.get("rope_theta", hc.get("rope_theta", 10000.0))),
                    norm_eps=hc.get("rms_norm_eps", 1e-6), tie_embeddings=bool(hc.get("tie_word_embeddings", False)))

    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        files = ["model.safetensors"]
    elif os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif any(n.endswith((".bin", ".pt", ".pth")) for n in os.listdir(folder)):
        raise SystemExit(f"{folder} holds pickled weights (.bin/.pt), which can run code when loaded; convert them to "
                         "safetensors first (in a sandbox: transformers' save_pretrained(safe_serialization=True))")
    else:
        raise SystemExit(f"{folder}: no model.safetensors or model.safetensors.index.json")
    sd = {}
    for name in files:
        sd.update(load_file(os.path.join(folder, name)))

    with torch.device("meta"):  # names and shapes of a model of this config, without allocating it
        shapes = {k: v.shape for k, v in to_hf_state_dict(GPT(cfg)).items()}
    optional = {"lm_head.weight"} if cfg.tie_embeddings else set()
    missing, unexpected = sorted(set(shapes) - set(sd) - optional), sorted(set(sd) - set(shapes))
    if missing or unexpected:
        raise SystemExit(f"{folder}: weights do not match a Qwen3 model of its config.json: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    bad = [k for k, v in sd.items() if v.shape != shapes[k]]
    if bad:
        raise SystemExit(f"{folder}: weight shapes disagree with config.json: {bad[:4]}")
    state = {k: v.float() for k, v in from_hf_state_dict(sd, cfg).items()}  # fp32 master weights, as train.py keeps

    ckpt = {"model_config": asdict(cfg), "model": state, "optimizer": None, "step": 0, "tokens_seen": 0,
            "data_state": None, "rng": None, "config": {"init_from": os.path.abspath(folder)},
            "best_val_loss": float("inf"), "kind": "hf"}
    tok = _hf_tokenizer_entry(folder)
    if tok is not None:  # no key at all when the folder has no tokenizer: the data's tokenizer decides
        ckpt["tokenizer"] = tok
    return ckpt
