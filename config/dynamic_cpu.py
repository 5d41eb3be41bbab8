# Learned skip controllers on CPU (a couple of minutes): the LayerSkip model of config/layerskip_cpu.py
# (in out-layerskip/), backbone frozen (warm-up), per-token decisions, half of the layers as the budget.
#   python dynamic.py config/dynamic_cpu.py [--per_sequence]
init_from = "out-layerskip"
out_dir = "out-dynamic"
dataset = "instruct"
data_dir = "data/stdlib_instruct"
per_sequence = False
budget = 0.5
alpha = 1.0
freeze_backbone = True
micro_batch = 8
block_size = 256
max_steps = 150
lr = 1e-2
min_lr = 1e-3
warmup_steps = 10
eval_interval = 50
eval_batches = 10
