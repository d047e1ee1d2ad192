"""
Rollout throughput: model.py's generate() (batched, static KV cache) beside transformers' Qwen3ForCausalLM.generate()
on the same random weights, in the same process: new tokens per second.

    python dev/bench_rollout.py          # GPU: medium-large, batch 256, 128-token prompts, 256 new
    python dev/bench_rollout.py --preset debug --batch 4 --prompt_len 16 --new_tokens 16 --repeats 1   # CPU check

Both sample (temperature 1, no top-k / top-p) every one of the new tokens (no EOS: random weights would stop at random
places). Ours runs twice: fp32 master weights under bf16 autocast (what grpo.py does; autocast caches the bf16 weight
copies for the whole generate() call) and bf16 weights (no per-call weight cast). transformers runs in bf16 with its
default dynamic cache (and, with --hf_static, its static cache too). Before timing, the logits of both on the same
prompts are compared.
"""
import argparse
import json
import os
import sys
import time
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from dev/: the project's modules
import attention as A  # noqa: E402
from model import GPT, hf_config_dict, make_config, to_hf_state_dict  # noqa: E402


def timed(fn, device, repeats, warmup):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    return min(times), mem


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="medium-large")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--prompt_len", type=int, default=128)
    ap.add_argument("--new_tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per variant (the best is reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--hf_static", action="store_true",
                    help="also time transformers with cache_implementation='static'")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="", help="write the results here")
    a = ap.parse_args(argv)

    import transformers
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
    bf16 = torch.autocast(device.type, dtype=torch.bfloat16)
    torch.manual_seed(a.seed)
    ours = GPT(make_config(a.preset)).to(device).eval()  # fp32 master weights, as train.py / grpo.py hold them
    ours_bf16 = GPT(ours.cfg).to(device).eval()
    ours_bf16.load_state_dict(ours.state_dict())
    for p in ours_bf16.parameters():  # weights in bf16; the RoPE tables (buffers) stay fp32
        p.data = p.data.to(torch.bfloat16)
    kw = {k: v for k, v in hf_config_dict(ours.cfg).items() if k not in ("architectures", "model_type")}
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**kw)).eval()
    hf.load_state_dict(to_hf_state_dict(ours), strict=True)
    hf = hf.to(device=device, dtype=torch.bfloat16)
    V = ours.cfg.vocab_size
    g = torch.Generator().manual_seed(a.seed)
    prompts = torch.randint(0, V, (a.batch, a.prompt_len), generator=g)
    prompt_lists = prompts.tolist()
    prompts = prompts.to(device)
    print(f"{a.preset}: {ours.num_params():,} parameters; batch {a.batch}, {a.prompt_len}-token prompts, "
          f"{a.new_tokens} new tokens, "
          f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), "
          f"torch {torch.__version__}, transformers {transformers.__version__}, ATTENTION={A.ATTENTION}")

    with torch.no_grad():  # the same weights: logits agree up to bf16 rounding
        x = prompts[:4]
        with bf16:
            ref = ours(x)
        diff_hf = (hf(x).logits.float() - ref).abs().max().item()
        with bf16:
            diff_bf16 = (ours_bf16(x) - ref).abs().max().item()
    print(f"max |logit difference| vs ours (fp32 weights + bf16 autocast): transformers bf16 {diff_hf:.3f}, "
          f"ours bf16 {diff_bf16:.3f} (logit scale {ref.abs().max().item():.2f})")

    def run_ours(m, ctx):
        def fn():
            with ctx:
                out, _ = m.generate(prompt_lists, a.new_tokens, temperature=1.0, eos_id=None)
            assert out.shape == (a.batch, a.new_tokens)
        return fn

    gen_cfg = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=a.new_tokens,
                   min_new_tokens=a.new_tokens, pad_token_id=0, eos_token_id=None)
    mask = torch.ones_like(prompts)

    def run_hf(cache):
        def fn():
            extra = {"cache_implementation": cache} if cache != "dynamic" else {}
            with torch.no_grad():
                out = hf.generate(prompts, attention_mask=mask, **gen_cfg, **extra)
            assert out.shape == (a.batch, a.prompt_len + a.new_tokens), out.shape
        return fn

    variants = [("ours: fp32 weights + bf16 autocast (grpo.py)", run_ours(ours, bf16)),
                ("ours: bf16 weights (autocast: bf16 KV cache)", run_ours(ours_bf16, bf16)),
                ("transformers Qwen3 generate(), bf16, dynamic cache", run_hf("dynamic"))]
    if a.hf_static:
        variants.append(("transformers Qwen3 generate(), bf16, static cache", run_hf("static")))
    results = {}
    new_tokens = a.batch * a.new_tokens
    for name, fn in variants:
        seconds, mem = timed(fn, device, a.repeats, a.warmup)
        results[name] = {"seconds": seconds, "new_tokens_per_s": new_tokens / seconds, "peak_mem_gib": mem}
        print(f"{name:55s} {new_tokens / seconds:12,.0f} new tokens/s  ({seconds:.2f} s, peak {mem:.1f} GiB)",
              flush=True)
    hf_tps = results["transformers Qwen3 generate(), bf16, dynamic cache"]["new_tokens_per_s"]
    for name in list(results)[:2]:
        print(f"ratio {name} / transformers dynamic: {results[name]['new_tokens_per_s'] / hf_tps:.2f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "device": str(device), "logit_diff_hf": diff_hf, "results": results}, f,
                      indent=1)
    return results


if __name__ == "__main__":
    main()
