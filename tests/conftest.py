import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # tests import the repo's flat modules (model, tasks, tokenizer, ...)
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
needs_shared = pytest.mark.skipif(
    not os.path.isdir(SHARED),
    reason="../shared/data not found (tests that read real data need the shared folder beside the checkout)")
