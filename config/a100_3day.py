# The seed's 3-day recipe: a100_2day.py with 1.5x the tokens (3B).
import os
exec(open(os.path.join(os.path.dirname(__file__), "a100_2day.py")).read())
out_dir = "out/a100_3day"
max_tokens = 3_000_000_000
