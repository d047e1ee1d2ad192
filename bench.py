"""
Training and decoding speed on one GPU, in one process, against transformers' Qwen3ForCausalLM of the same
shape (compiled) as the baseline. Prints a table last and writes JSON.

    python bench.py --preset medium-large --micro_batch 16 --block_size 2048 \
        --variant attention=sdpa --variant attention=sdpa,checkpoint_activations=1 --variant precision=fp8 \
        --baseline --decode --json bench.json

A variant is comma-separated key=value over: attention, precision, residual, compile (1/0), checkpoint_activations
(1/0), micro_batch, block_size, grad_accum (micro-batches per optimizer step; 16 in config/a100_2day.py), tune (1:
Inductor's coordinate-descent tuning of its Triton kernels; train.py does not tune), fp8_skip (0: FP8 in every block
layer) and model shape keys (n_head, head_dim, ...). MFU: PaLM appendix B's FLOPs over a 989e12 peak.
Runs on the CPU too (tiny presets, for a smoke check): --device cpu --preset debug.
"""
import argparse
import gc
import json
import time

import torch

import attention as A
import engine
import fp8
import model as M
from model import GPT, PRESETS, make_config

FP8_SKIP = frozenset(fp8.skip_fp8_shapes)  # the measured default; variant fp8_skip=0 puts every block layer in FP8
SWITCHES = {"ATTENTION": A.ATTENTION, "RESIDUAL": M.RESIDUAL}  # the modules' defaults

PEAK_FLOPS = 989e12

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--preset", default="medium-large", choices=sorted(PRESETS))
parser.add_argument("--micro_batch", type=int, default=16)
parser.add_argument("--block_size", type=int, default=2048)
parser.add_argument("--steps", type=int, default=15, help="timed optimizer steps per variant")
parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
parser.add_argument("--variant", action="append", default=[],
                    help="key=value,...; repeatable; default: one bf16 compiled run")
parser.add_argument("--baseline", action="store_true", help="also time transformers' Qwen3ForCausalLM (compiled)")
parser.add_argument("--decode", action="store_true",
                    help="also time generate(): batch x prompt_len prompt, new_tokens sampled")
parser.add_argument("--skip_train", action="store_true", help="no training variants (decode and baselines only)")
parser.add_argument("--decode_batch", type=int, default=256)
parser.add_argument("--prompt_len", type=int, default=128)
parser.add_argument("--new_tokens", type=int, default=256)
parser.add_argument("--device", default="cuda")
parser.add_argument("--attention_table", action="store_true",
                    help="also time causal attention fwd+bwd per SDPA backend")
parser.add_argument("--json", default=None, help="write all results here")
parser.add_argument("--profile", action="store_true",
                    help="print the GPU kernels' time of two more steps of each variant")
SHAPE_KEYS = ("n_layer", "n_embd", "n_head", "n_kv_head", "head_dim", "mlp_hidden")  # model shape overrides
VARIANT_KEYS = ("attention", "precision", "compile", "checkpoint_activations", "micro_batch", "block_size", "fp8_skip",
                "residual", "grad_accum", "tune")


def parse_variant(text):
    v = {"attention": "sdpa", "precision": "bf16", "compile": 1, "checkpoint_activations": 0}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in VARIANT_KEYS + SHAPE_KEYS:
            raise SystemExit(f"unknown variant key {key!r}")
        v[key] = int(value) if value.isdigit() else value
    if v["precision"] not in ("bf16", "fp8"):
        raise SystemExit(f"unknown precision {v['precision']!r}; use bf16 or fp8")
    return v


def build(cfg, precision):
    """GPT(cfg), its blocks' matmuls in FP8 when precision is "fp8" (as train.py does)."""
    model = GPT(cfg)
    if precision == "fp8":
        fp8.convert_to_fp8(model)
    return model


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_training(build, batch, block, steps, warmup, device, compile_model, loss_fn, profile=False, grad_accum=1):
    """Tokens/s and peak memory of full optimizer steps (grad_accum x (forward, backward), clip, fused AdamW) on
    random tokens; synchronized once per optimizer step, as train.py is."""
    model = build().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=device.type == "cuda")
    step_model = torch.compile(model) if compile_model else model
    gen = torch.Generator(device="cpu").manual_seed(0)
    vocab = model.config.vocab_size if hasattr(model, "config") else model.cfg.vocab_size
    x = torch.randint(0, vocab, (batch, block + 1), generator=gen).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    def one_step():
        for _ in range(grad_accum):
            with autocast:
                loss = loss_fn(step_model, x[:, :-1], x[:, 1:])
            (loss / grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    times, losses = [], []
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        loss = one_step()
        sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    if profile:  # where the step's GPU time goes: matmuls vs attention vs elementwise vs optimizer
        from torch.profiler import ProfilerActivity
        activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
        with torch.profiler.profile(activities=[activity]) as prof:
            for _ in range(2):
                one_step()
            sync(device)  # classes below are per optimizer step (grad_accum micro-batches)
        print(prof.key_averages().table(sort_by=f"self_{device.type}_time_total", row_limit=30,
                                        max_name_column_width=90), flush=True)
        if device.type == "cuda":
            print_kernel_classes(prof, steps=2)
    timed = sorted(times[warmup:])
    median = timed[len(timed) // 2]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    # the same batch every step: a loss that does not fall means the gradients are broken, whatever the speed
    result = {"tokens_per_s": batch * block * grad_accum / median, "step_s": median, "peak_gib": peak,
              "loss_first": losses[0], "loss_last": losses[-1], "learns": losses[-1] < losses[0] - 0.1}
    del model, opt, step_model
    return result


KERNEL_CLASSES = (  # (class, substrings of a kernel's name), first match wins; the rest is "other"
    ("GEMMs (cuBLAS)", ("nvjet", "gemm", "xmma", "cutlass")),
    ("attention", ("sdpa", "fmha", "flash", "cudnn", "flex")),
    ("loss (softmax - one-hot)", ("logsumexp",)),
    ("QK-norm + RoPE (Inductor)", ("_neg_", "cat_mul_transpose", "rms_norm_backward__to_copy_mul_sum")),
    ("optimizer, clipping", ("multi_tensor_apply", "lpnorm", "reduce_kernel")),
    ("other fused elementwise (Inductor)", ("triton_",)))


def print_kernel_classes(prof, steps):
    """GPU kernel time per step by class, by kernel name (the QK-norm + RoPE names are those Inductor gave
    medium-large's kernels under torch 2.11: elsewhere they may count as other fused elementwise)."""
    total = {}
    for e in prof.key_averages():
        name = next((c for c, keys in KERNEL_CLASSES if any(k in e.key for k in keys)), "other")
        total[name] = total.get(name, 0.0) + e.self_device_time_total / 1e3 / steps
    whole = sum(total.values())
    print(f"GPU kernel time per step: {whole:.1f} ms")
    for name, ms in sorted(total.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<36} {ms:7.1f} ms {100 * ms / whole:5.1f}%")


def attention_table(cfg, batch, block, device):
    """Causal attention forward+backward (ms) at the model's shape, per SDPA backend; K/V repeated for backends
    that take no grouped-query heads (cuDNN), and given as GQA where the backend accepts it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import triton.testing
    q = torch.randn(batch, cfg.n_head, block, cfg.head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    kv = [torch.randn(batch, cfg.n_kv_head, block, cfg.head_dim, device=device, dtype=torch.bfloat16,
                      requires_grad=True) for _ in range(2)]
    rep = cfg.n_head // cfg.n_kv_head
    out = {}
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        for gqa in (True, False):
            def run():
                k, v = (kv[0], kv[1]) if gqa else (kv[0].repeat_interleave(rep, 1), kv[1].repeat_interleave(rep, 1))
                with sdpa_kernel(backend):
                    y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
                y.sum().backward()
            name = f"{backend.name.lower()}{' gqa' if gqa else ' repeated kv'}"
            try:
                out[name] = triton.testing.do_bench(run, warmup=50, rep=300, return_mode="median")
            except Exception as e:
                out[name] = f"{type(e).__name__}"
    try:  # the flash-attn package, where installed
        flash = A._load_flash()
        qf, kf, vf = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, *kv))

        def run_flash():
            flash(qf, kf, vf, 0.0).sum().backward()
        out["flash-attn package"] = triton.testing.do_bench(run_flash, warmup=50, rep=300, return_mode="median")
    except Exception as e:
        out["flash-attn package"] = f"not measured: {str(e)[:80]}"
    return out


def release():
    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(args):
    import torch._inductor.config  # here, not at import: it loads triton, which tests want in interpreter mode
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    with torch.device("meta"):
        meta_model = GPT(make_config(args.preset, block_size=args.block_size))
    n_params = meta_model.num_params()
    for text in [] if args.skip_train else args.variant or [""]:
        v = parse_variant(text)
        batch, block = v.get("micro_batch", args.micro_batch), v.get("block_size", args.block_size)
        A.ATTENTION, M.RESIDUAL = v["attention"], v.get("residual", SWITCHES["RESIDUAL"])
        fp8.skip_fp8_shapes = set(FP8_SKIP) if v.get("fp8_skip", 1) else set()
        shape = {k: v[k] for k in SHAPE_KEYS if k in v}
        cfg = make_config(args.preset, block_size=max(block, args.block_size),
                          checkpoint_activations=bool(v["checkpoint_activations"]), **shape)
        name = "ours " + ",".join(f"{k}={v[k]}" for k in v)
        torch._inductor.config.coordinate_descent_tuning = bool(v.get("tune", 0))
        print(f"--- {name}: {batch} x {block}", flush=True)
        try:
            r = time_training(lambda: build(cfg, v["precision"]), batch, block, args.steps, args.warmup, device,
                              v["compile"], lambda m, x, y: m(x, y), args.profile, v.get("grad_accum", 1))
        except Exception as e:  # one failing variant (e.g. a missing package) must not hide the others
            print(f"FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)
            r = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        with torch.device("meta"):
            r.update(name=name, batch=batch, block=block, flops_per_token=GPT(cfg).flops_per_token(block))
        rows.append(r)
        print(f"    {json.dumps(r)}", flush=True)  # each row as soon as measured: a cut-off run keeps what it had
        release()
    A.ATTENTION, M.RESIDUAL = SWITCHES.values()  # the baseline and decoding run on the defaults
    torch._inductor.config.coordinate_descent_tuning = False
    fp8.skip_fp8_shapes = set(FP8_SKIP)
    if args.baseline:
        from transformers import Qwen3Config, Qwen3ForCausalLM
        kw = {k: v for k, v in M.hf_config_dict(meta_model.cfg).items() if k not in ("architectures", "model_type")}
        hf_cfg = Qwen3Config(**kw, attn_implementation="sdpa")
        print("--- transformers Qwen3ForCausalLM, compiled", flush=True)
        r = time_training(lambda: Qwen3ForCausalLM(hf_cfg), args.micro_batch, args.block_size, args.steps, args.warmup,
                          device, True, lambda m, x, y: m(input_ids=x, labels=x).loss)
        r.update(name="transformers Qwen3 compiled", batch=args.micro_batch, block=args.block_size,
                 flops_per_token=meta_model.flops_per_token(args.block_size))
        rows.append(r)
        print(f"    {json.dumps(r)}", flush=True)
        release()
    attn = attention_table(meta_model.cfg, args.micro_batch, args.block_size, device) if args.attention_table else None
    decode = None
    if args.decode:
        model = GPT(make_config(args.preset)).to(device=device, dtype=torch.bfloat16).eval()
        gen = torch.Generator(device="cpu").manual_seed(0)
        prompts = torch.randint(0, model.cfg.vocab_size, (args.decode_batch, args.prompt_len), generator=gen).tolist()
        for i in range(2):  # the first call warms up (and compiles, where the decode path compiles)
            sync(device)
            t0 = time.perf_counter()
            out, lengths = engine.generate(model, prompts, args.new_tokens, temperature=1.0)
            sync(device)
            elapsed = time.perf_counter() - t0
        decode = {"new_tokens_per_s": int(lengths.sum()) / elapsed, "seconds": elapsed, "batch": args.decode_batch,
                  "prompt_len": args.prompt_len, "new_tokens": args.new_tokens}
        print(f"    {json.dumps(decode)}", flush=True)
        if args.profile:  # kernels of one generate() call, graphs off so each kernel is named (GPU time is the same)
            from torch.profiler import ProfilerActivity
            with torch.profiler.profile(activities=[ProfilerActivity.CUDA]) as prof:
                engine.generate(model, prompts, args.new_tokens, temperature=1.0, cuda_graph=False)
                sync(device)
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=90),
                  flush=True)
        del model
        release()

    base = next((r for r in rows if r["name"].startswith("transformers") and "tokens_per_s" in r), None)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"\n{args.preset}: {n_params:,} parameters; {device_name}; torch {torch.__version__}")
    print(f"{'run':<78} {'batch':>9} {'tok/s':>9} {'MFU':>6} {'peak GiB':>9} {'vs HF':>6} {'loss first->last':>17}")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:<78} {r['batch']:>4}x{r['block']:<4} {r['error'][:60]}")
            continue
        r["mfu"] = r["tokens_per_s"] * r["flops_per_token"] / PEAK_FLOPS
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        print(f"{r['name']:<78} {r['batch']:>4}x{r['block']:<4} {r['tokens_per_s']:>9,.0f} {100 * r['mfu']:>5.1f}% "
              f"{r['peak_gib']:>9.1f} {ratio:>6} "
              f"{r['loss_first']:>7.3f}->{r['loss_last']:.3f}{'' if r['learns'] else ' NOT LEARNING'}")
    if attn:
        c = meta_model.cfg
        print(f"causal attention fwd+bwd, {args.micro_batch} x {c.n_head} heads x {args.block_size}, "
              f"head_dim {c.head_dim}:")
        for k, v in attn.items():
            print(f"  {k:<32} {v:.3f} ms" if isinstance(v, float) else f"  {k:<32} {v}")
    if decode:
        print(f"generate(): batch {decode['batch']}, prompt {decode['prompt_len']}, {decode['new_tokens']} new tokens: "
              f"{decode['new_tokens_per_s']:,.0f} new tokens/s ({decode['seconds']:.1f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": args.preset, "params": n_params, "rows": rows, "decode": decode, "attention": attn,
                       "device": device_name, "torch": torch.__version__}, f, indent=1)


if __name__ == "__main__":
    main(parser.parse_args())
