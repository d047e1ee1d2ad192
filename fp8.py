"""
FP8 training matmuls (train.py's precision = "fp8" calls convert_to_fp8), in the style of nanochat's fp8.py.

How it works. An H100/H200 multiplies 8-bit floats at about twice the bf16 rate. FP8 has little range, so
every operand is scaled before the cast: scale = FP8_MAX / amax(tensor) ("dynamic per-tensor scaling": the
amax is taken fresh each step, no history). The product is computed by torch._scaled_mm, which accumulates
in higher precision and multiplies the inverse scales back in:

    forward    y  = x @ W.T           x, W in e4m3 (3 mantissa bits: precision for values)
    backward   dx = dy @ W            dy in e5m2 (5 exponent bits: range for gradients), W in e4m3
               dW = dy.T @ x          dy in e5m2, x in e4m3

Only the Linear layers inside the transformer blocks become Float8Linear (qkv, attention output, gate/up,
down: most of the FLOPs). Embeddings, norms, the output head, the loss and the optimizer
state stay in bf16/fp32. Master weights stay fp32; the state_dict is unchanged.
`python fp8.py` times every block GEMM shape in bf16 and fp8 so a shape where FP8 loses can be left out
(skip_fp8_shapes below).

_scaled_mm wants its first operand row-major and its second column-major, with dimensions divisible by 16.
On a CPU (tests) the same quantization is emulated with float matmuls: slow, but the numbers are FP8's.
"""
import torch
import torch.nn as nn

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
# (in_features, out_features) left in bf16: medium-large's qkv and attention output measured slower in FP8 by
# `python fp8.py` (BENCHMARKS.md), while gate/up and down gain
skip_fp8_shapes = {(1152, 1728), (1152, 1152)}


def quantize(x, dtype):
    """x -> (x8, inverse scale): x8 * inv_scale ~= x, with |x8| filling dtype's range."""
    amax = x.abs().amax().float().clamp(min=1e-12)
    scale = torch.finfo(dtype).max / amax
    return (x.float() * scale).clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype), scale.reciprocal()


def scaled_mm(a8, sa, b8, sb, out_dtype, fast_accum):
    """a8 (M, K) @ b8 (K, N) with inverse scales; b8 must be a column-major view (a transposed row-major tensor)."""
    if a8.is_cuda:
        return torch._scaled_mm(a8, b8, scale_a=sa, scale_b=sb, out_dtype=out_dtype, use_fast_accum=fast_accum)
    return ((a8.float() @ b8.float()) * (sa * sb)).to(out_dtype)  # CPU: emulate, same quantization


class _FP8Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        x8, sx = quantize(x, E4M3)
        w8, sw = quantize(weight, E4M3)
        ctx.save_for_backward(x8, sx, w8, sw)
        ctx.weight_dtype = weight.dtype
        return scaled_mm(x8, sx, w8.t(), sw, torch.bfloat16, fast_accum=True)

    @staticmethod
    def backward(ctx, grad_y):
        x8, sx, w8, sw = ctx.saved_tensors
        g8, sg = quantize(grad_y, E5M2)
        grad_x = scaled_mm(g8, sg, w8.t().contiguous().t(), sw, torch.bfloat16, fast_accum=False)
        grad_w = scaled_mm(g8.t().contiguous(), sg, x8.t().contiguous().t(), sx, torch.float32, fast_accum=False)
        return grad_x, grad_w.to(ctx.weight_dtype)


class Float8Linear(nn.Linear):
    """nn.Linear (no bias) whose matmul runs in FP8; parameters and state_dict as nn.Linear's."""

    def forward(self, x):
        shape = x.shape
        y = _FP8Matmul.apply(x.reshape(-1, shape[-1]), self.weight)
        return y.reshape(*shape[:-1], self.out_features)


def convert_to_fp8(model):
    """Turn the Linear layers of the transformer blocks into Float8Linear, in place (same parameters)."""
    n = 0
    for block in model.blocks:
        for name, m in block.named_modules():
            if "indexer" in name:  # DSA's small indexer projections stay in bf16
                continue
            if type(m) is nn.Linear and m.bias is None and (m.in_features, m.out_features) not in skip_fp8_shapes:
                if m.in_features % 16 or m.out_features % 16:
                    continue  # _scaled_mm needs multiples of 16
                m.__class__ = Float8Linear
                n += 1
    return n


if __name__ == "__main__":  # per-GEMM timing: bf16 vs fp8, forward + backward, at a preset's block shapes
    import argparse
    import triton.testing
    from model import PRESETS

    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="medium-large")
    parser.add_argument("--tokens", type=int, default=16 * 2048)
    args = parser.parse_args()
    c = PRESETS[args.preset]
    shapes = {"qkv": (c.n_embd, (c.n_head + 2 * c.n_kv_head) * c.head_dim),
              "attn out": (c.n_head * c.head_dim, c.n_embd), "gate/up": (c.n_embd, 2 * c.mlp_hidden),
              "down": (c.mlp_hidden, c.n_embd)}
    try:  # torchao's Float8Linear (tensorwise dynamic scaling), where installed, as a second FP8 implementation
        from torchao.float8 import convert_to_float8_training
    except ImportError:
        convert_to_float8_training = None
    bench = lambda f: triton.testing.do_bench(f, warmup=25, rep=200, return_mode="median")
    print(f"M = {args.tokens} tokens; fwd+bwd of the layer (ms, compiled), then the three bare GEMMs without "
          f"quantization (bf16 vs _scaled_mm as this file calls it)"
          f"{'' if convert_to_float8_training else '; torchao not installed'}")
    print(f"{'GEMM':<9} {'in x out':>12} {'bf16':>7} {'fp8':>7} {'ratio':>6} {'torchao':>8} {'ratio':>6} | "
          f"{'bare bf16':>9} {'bare fp8':>8} {'ratio':>6}")
    for name, (k, n) in shapes.items():
        x = torch.randn(args.tokens, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        times = []
        for kind in ("bf16", "fp8", "torchao"):
            lin = nn.Linear(k, n, bias=False, device="cuda")
            if kind == "fp8":
                lin.__class__ = Float8Linear
            if kind == "torchao":
                if convert_to_float8_training is None:
                    times.append(float("nan"))
                    continue
                lin = convert_to_float8_training(nn.Sequential(lin))

            def step():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    y = lin(x)
                y.backward(torch.ones_like(y))
            torch._dynamo.reset()  # a fresh compile per layer kind: a shared cache hits the recompile limit
            try:
                times.append(bench(torch.compile(step)))
            except Exception as e:  # e.g. a torchao built for another torch
                print(f"{kind} failed: {type(e).__name__}: {str(e)[:200]}")
                times.append(float("nan"))
        # the same three products on ready operands: what the tensor cores alone take
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        g = torch.randn(args.tokens, n, device="cuda", dtype=torch.bfloat16)
        xb = x.detach()
        bare_bf16 = bench(lambda: (xb @ w.t(), g @ w, g.t() @ xb))
        (x8, sx), (w8, sw), (g8, sg) = quantize(xb, E4M3), quantize(w, E4M3), quantize(g, E5M2)
        w8c, g8t, x8c = w8.t().contiguous().t(), g8.t().contiguous(), x8.t().contiguous().t()
        bare_fp8 = bench(lambda: (scaled_mm(x8, sx, w8.t(), sw, torch.bfloat16, True),
                                  scaled_mm(g8, sg, w8c, sw, torch.bfloat16, False),
                                  scaled_mm(g8t, sg, x8c, sx, torch.float32, False)))
        print(f"{name:<9} {k:>5} x {n:<5} {times[0]:>7.3f} {times[1]:>7.3f} {times[0] / times[1]:>5.2f}x "
              f"{times[2]:>8.3f} {times[0] / times[2]:>5.2f}x | {bare_bf16:>9.3f} {bare_fp8:>8.3f} "
              f"{bare_bf16 / bare_fp8:>5.2f}x")
