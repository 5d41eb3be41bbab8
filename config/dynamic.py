# Learned skip controllers for a converted checkpoint (e.g. OPT or TinyLlama, Glavas et al. 2024):
# warm-up with the backbone frozen, then (optionally) a second run with --freeze_backbone=False.
#   python checkpoints_convert.py --from_hf path/to/model --out ckpt/model && python data/instruct.py
#   python dynamic.py config/dynamic.py
init_from = "ckpt/tinyllama"
out_dir = "out-dynamic"
dataset = "instruct"
data_dir = "data/stdlib_instruct"
per_sequence = True
budget = 0.6
alpha = 1.0
freeze_backbone = True
micro_batch = 4
block_size = 1024
max_steps = 1000
lr = 1e-3
min_lr = 1e-4
warmup_steps = 50
eval_interval = 100
eval_batches = 20
