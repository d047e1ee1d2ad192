# The seed's 2-day recipe: medium-large (401,277,888 parameters), 2B tokens of 85% FineWeb-Edu + 15% MedQA-style
# text, 524,288 tokens per step = 16 x 2048 x 16 accumulation, lr 3e-4 -> 3e-5 cosine, 100M warmup tokens.
# data: python prepare_data.py --hf HuggingFaceFW/fineweb-edu:0.85 --hf-config sample-10BT \
#         --source medmcqa.jsonl:0.15 --max-tokens 2100000000 --out data/fineweb_medqa   (see README)
out_dir = "out/a100_2day"
data_dir = "data/fineweb_medqa"
preset = "medium-large"
block_size = 2048
micro_batch = 16
grad_accum = 16
lr = 3e-4
min_lr = 3e-5
schedule = "cosine"
warmup_tokens = 100_000_000
max_tokens = 2_000_000_000
eval_every_steps = 250
eval_tokens = 4_000_000
checkpoint_every_steps = 500
keep_checkpoints = 3
compile = True
