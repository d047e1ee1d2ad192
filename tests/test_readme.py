"""The README's claims that code can check: the preset table, the test command, the files, configs and dev/ scripts
it names."""
import os
import re

import torch

import model as M

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()


def test_preset_table_is_computed_by_the_code():
    table = README.split("<!-- presets -->")[1].split("<!-- /presets -->")[0]
    rows = [r for r in table.strip().splitlines()[2:]]
    assert len(rows) == len(M.PRESETS)
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        c = M.PRESETS[cells[0]]
        with torch.device("meta"):
            m = M.GPT(c)
        assert cells[1:] == [str(c.n_embd), str(c.n_layer), f"{c.n_head} / {c.n_kv_head}", str(c.head_dim),
                             str(c.mlp_hidden), f"{m.num_params():,}", f"{m.matmul_params():,}"], cells[0]


def test_the_readme_test_command_is_what_ci_runs():
    command = re.search(r"python -m pytest[^\n`#]*", README).group(0).strip()
    assert command in open(os.path.join(ROOT, ".ci", "run")).read()


def test_named_files_and_configs_exist():
    names = re.findall(r"`((?:config/|dev/)?[a-z_0-9]+\.(?:py|sh))`", README)
    assert {"train.py", "dev/gpu_checks.py"} <= set(names)  # the pattern still finds what it checks
    for name in names:
        bare_config = "/" not in name and os.path.exists(os.path.join(ROOT, "config", name))
        path = f"config/{name}" if bare_config else name
        assert os.path.exists(os.path.join(ROOT, path)), name
