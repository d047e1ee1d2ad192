"""
One checkpoint format for train.py, grpo.py, sample.py, eval and export: a dict of tensors and plain
Python values (model config, weights, optimizer, step, data position, RNG states, the resolved run
config, the tokenizer), written atomically and read with torch.load(weights_only=True), so loading
never runs pickled code from a file someone handed you.
"""
import os

import torch

from model import GPT, GPTConfig


def save_checkpoint(path, ckpt):
    """Write to a temporary file, fsync, then rename: a crash or a full disk never leaves a half-written
    file in place of a good one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path, map_location="cpu"):
    if not os.path.isfile(path):
        raise SystemExit(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, corrupt, or holding objects we refuse to unpickle
        raise SystemExit(f"cannot read checkpoint {path}: it is truncated, corrupt or not a checkpoint of this project "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise SystemExit(f"{path} is not a checkpoint of this project (no model / model_config)")
    return ckpt


def model_from_checkpoint(ckpt, device="cpu"):
    model = GPT(GPTConfig(**ckpt["model_config"]))
    state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in ckpt["model"].items()}
    model.load_state_dict(state)
    return model.to(device)
