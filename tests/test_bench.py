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
