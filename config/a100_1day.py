# The seed's 1-day recipe: a100_2day.py with half the tokens (1B) and half the warmup.
import os
exec(open(os.path.join(os.path.dirname(__file__), "a100_2day.py")).read())
out_dir = "out/a100_1day"
warmup_tokens = 50_000_000
max_tokens = 1_000_000_000
