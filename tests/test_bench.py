"""bench.py on the CPU: variants (switches and shape overrides) each give a row with their own FLOPs, and JSON."""
import json
import os
import subprocess
import sys

import pytest
import torch

import bench
import fp8


def test_variants_rows_and_json(tmp_path):
    out = tmp_path / "bench.json"
    args = bench.parser.parse_args(["--device", "cpu", "--preset", "debug", "--micro_batch", "2", "--block_size", "32",
                                    "--steps", "1", "--warmup", "1", "--variant", "compile=0",
                                    "--variant", "compile=0,head_dim=32",
                                    "--variant", "compile=0,precision=fp8,fp8_skip=0", "--variant", "compile=0,tune=1",
                                    "--json", str(out)])
    bench.main(args)
    rows = json.load(open(out))["rows"]
    assert [r["batch"] for r in rows] == [2, 2, 2, 2] and all(r["tokens_per_s"] > 0 for r in rows)
    assert "tune=1" in rows[3]["name"] and not torch._inductor.config.coordinate_descent_tuning  # off again after it
    assert rows[1]["flops_per_token"] != rows[0]["flops_per_token"]  # the shape override reached the model
    assert "fp8_skip=0" in rows[2]["name"] and fp8.skip_fp8_shapes == set(bench.FP8_SKIP)  # restored after the run


def test_unknown_variant_key_is_one_clear_error():
    with pytest.raises(SystemExit, match="unknown variant key 'heads'"):
        bench.parse_variant("heads=4")


def test_kernel_classes_sum_per_step(capsys):
    """--profile's summary: kernel names fall into their classes (first match wins), times per step, shares of 100%."""
    class Event:
        def __init__(self, key, us):
            self.key, self.self_device_time_total = key, us

    class Prof:
        def key_averages(self):
            return [Event("nvjet_sm90_tst_192x192_64x3", 6000.0),
                    Event("cudnn_generated_fort_native_sdpa_sm90_flash_bprop", 3000.0),
                    Event("triton_red_fused_logsumexp_exp", 400.0),
                    Event("triton_poi_fused_add_cat_mul_neg_slice", 200.0),
                    Event("triton_poi_fused_mul_silu", 300.0), Event("multi_tensor_apply_kernel", 100.0),
                    Event("Memset", 0.0)]
    bench.print_kernel_classes(Prof(), steps=2)
    out = capsys.readouterr().out
    assert "GPU kernel time per step: 5.0 ms" in out
    for line in ("GEMMs (cuBLAS)                           3.0 ms  60.0%",
                 "attention                                1.5 ms  30.0%",
                 "loss (softmax - one-hot)                 0.2 ms   4.0%",
                 "QK-norm + RoPE (Inductor)                0.1 ms   2.0%",
                 "other fused elementwise (Inductor)       0.1 ms   3.0%",
                 "optimizer, clipping                      0.1 ms   1.0%"):
        assert line in out, line


def test_grad_accum_counts_every_micro_batch():
    """grad_accum=3: three forwards per optimizer step, and tokens/s counts all three micro-batches' tokens."""
    import types

    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cfg, self.calls, self.w = types.SimpleNamespace(vocab_size=11), 0, torch.nn.Parameter(torch.ones(()))

        def forward(self, x, y):
            self.calls += 1
            return 1e4 * self.w ** 2 + 0 * x.float().mean()  # Adam moves w by ~lr a step: the loss falls ~6 a step

    built = []
    build = lambda: built.append(Counting()) or built[-1]
    r = bench.time_training(build, 2, 8, steps=2, warmup=1, device=torch.device("cpu"), compile_model=False,
                            loss_fn=lambda m, x, y: m(x, y), grad_accum=3)
    assert built[0].calls == (1 + 2) * 3
    assert r["tokens_per_s"] * r["step_s"] == pytest.approx(2 * 8 * 3)
    assert r["learns"]  # the averaged micro-batch gradients still reach the optimizer


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without CUDA gets")
def test_profile_train_needs_a_gpu():
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, os.path.join(root, "dev", "profile_train.py"), "config/debug.py"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "profile_train.py times GPU kernels: no CUDA device here" in p.stderr


def test_compile_bench_runs_a_variant_cold_and_refuses_unknown_ones():
    """dev/compile_bench.py on the CPU (debug preset): one variant in its own process gives a table row whose loss
    fell (the same batch every step); an unknown variant is one clear error before any run."""
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dev", "compile_bench.py")
    p = subprocess.run([sys.executable, script, "--cpu", "blocks_eager_loss"], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    row = [ln for ln in p.stdout.splitlines() if ln.startswith("| blocks_eager_loss |")]
    first, last = map(float, row[0].split("|")[5].split("->"))
    assert last < first - 1.0, row
    p = subprocess.run([sys.executable, script, "--cpu", "everything"], capture_output=True, text=True)
    assert p.returncode != 0 and "unknown variant(s) ['everything']" in p.stderr.strip().splitlines()[-1]
