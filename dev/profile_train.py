"""Profile train.py as it runs: GPU kernel time of optimizer steps FROM .. FROM+STEPS against the wall, by kernel
class (bench.print_kernel_classes), then the 40 longest kernels. Same arguments as train.py; needs a GPU.
    PROFILE_FROM=5 PROFILE_STEPS=2 python dev/profile_train.py config/a100_2day.py --max_tokens=5242880
The profiled steps run slower (the profiler's own host work); compare the kernel time with the unprofiled
tok/s that train.py logs for the other steps."""
import os
import runpy
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import bench  # noqa: E402

FROM, STEPS = int(os.environ.get("PROFILE_FROM", 5)), int(os.environ.get("PROFILE_STEPS", 2))
if not torch.cuda.is_available():
    raise SystemExit("profile_train.py times GPU kernels: no CUDA device here")
state = {"calls": 0}
clip_grad_norm = torch.nn.utils.clip_grad_norm_


def clip_and_profile(*args, **kwargs):
    """train.py calls clip_grad_norm_ once per optimizer step, after queuing all its micro-batches: the hook
    that marks step boundaries without changing train.py."""
    state["calls"] += 1
    if state["calls"] in (FROM, FROM + STEPS):
        torch.cuda.synchronize()
        if state["calls"] == FROM:
            state["prof"] = profile(activities=[ProfilerActivity.CUDA])
            state["prof"].start()
            state["t0"] = time.perf_counter()
        else:
            wall_ms = (time.perf_counter() - state["t0"]) / STEPS * 1e3
            state["prof"].stop()
            rows = sorted(((e.key, e.count / STEPS, e.self_device_time_total / STEPS / 1e3)
                           for e in state["prof"].key_averages()), key=lambda r: -r[2])
            kernels_ms = sum(ms for _, _, ms in rows)
            print(f"profile of optimizer steps {FROM}..{FROM + STEPS}: wall {wall_ms:.1f} ms a step under the "
                  f"profiler, GPU kernels {kernels_ms:.1f} ms")
            bench.print_kernel_classes(state["prof"], STEPS)
            for key, n, ms in rows[:40]:
                print(f"{ms:9.2f} ms {n:7.0f}x {1e3 * ms / max(n, 1):8.1f} us  {key[:110]}")
    return clip_grad_norm(*args, **kwargs)


torch.nn.utils.clip_grad_norm_ = clip_and_profile
sys.argv = ["train.py"] + sys.argv[1:]
runpy.run_path(os.path.join(ROOT, "train.py"), run_name="__main__")
if state["calls"] < FROM + STEPS:  # a run too short for the window would otherwise print nothing
    raise SystemExit(f"profile_train.py: train.py ran {state['calls']} optimizer steps, fewer than PROFILE_FROM + "
                     f"PROFILE_STEPS = {FROM + STEPS}: nothing profiled")
