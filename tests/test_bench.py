"""bench.py on the CPU: variants (switches and shape overrides) each give a row with their own FLOPs, and JSON."""
import json

import pytest

import bench
import fp8


def test_variants_rows_and_json(tmp_path):
    out = tmp_path / "bench.json"
    args = bench.parser.parse_args(["--device", "cpu", "--preset", "debug", "--micro_batch", "2", "--block_size", "32",
                                    "--steps", "1", "--warmup", "1", "--variant", "compile=0",
                                    "--variant", "compile=0,head_dim=32",
                                    "--variant", "compile=0,precision=fp8,fp8_skip=0", "--json", str(out)])
    bench.main(args)
    rows = json.load(open(out))["rows"]
    assert [r["batch"] for r in rows] == [2, 2, 2] and all(r["tokens_per_s"] > 0 for r in rows)
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
            return [Event("nvjet_sm90_tst_192x192_64x3", 6000.0), Event("cudnn_generated_fort_native_sdpa_sm90_flash_bprop", 3000.0),
                    Event("triton_red_fused_logsumexp_exp", 400.0), Event("triton_poi_fused_add_cat_mul_neg_slice", 200.0),
                    Event("triton_poi_fused_mul_silu", 300.0), Event("multi_tensor_apply_kernel", 100.0), Event("Memset", 0.0)]
    bench.print_kernel_classes(Prof(), steps=2)
    out = capsys.readouterr().out
    assert "GPU kernel time per step: 5.0 ms" in out
    for line in ("GEMMs (cuBLAS)                           3.0 ms  60.0%", "attention                                1.5 ms  30.0%",
                 "loss (softmax - one-hot)                 0.2 ms   4.0%", "QK-norm + RoPE (Inductor)                0.1 ms   2.0%",
                 "other fused elementwise (Inductor)       0.1 ms   3.0%", "optimizer, clipping                      0.1 ms   1.0%"):
        assert line in out, line
