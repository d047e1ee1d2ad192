"""GPU sanity check before long runs: gradients of the compiled model under bf16 autocast equal eager ones.
Exits 1 when they differ (or vanish); run first in every GPU evidence script."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402

torch.manual_seed(0)
dev = "cuda" if torch.cuda.is_available() else "cpu"
m = M.GPT(M.make_config("small", n_layer=2, block_size=256)).to(dev)
x, y = torch.randint(0, 50304, (2, 4, 256), device=dev)
grads = []
for compiled in (False, True):
    run = torch.compile(m) if compiled else m
    with torch.autocast(dev, dtype=torch.bfloat16):
        loss = run(x, y)
    loss.backward()
    grads.append(torch.cat([p.grad.flatten().float() for p in m.parameters()]))
    m.zero_grad(set_to_none=True)
    print(f"compiled={compiled}: loss {loss.item():.5f}, grad-norm {grads[-1].norm().item():.5f}")
rel = ((grads[0] - grads[1]).norm() / grads[0].norm()).item()
print(f"relative difference of the gradients: {rel:.2e}")
sys.exit(0 if grads[1].norm() > 0 and rel < 0.05 else 1)
