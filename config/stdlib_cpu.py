# A deep, narrow model (16 layers x 128) on the stdlib corpus: about 8 minutes on 2 CPU cores.
# python train.py config/stdlib_cpu.py
out_dir = "out"
data_dir = "data/stdlib"
model = "stdlib-16l"
micro_batch = 16
block_size = 256
max_steps = 500
warmup_steps = 50
lr = 3e-3
min_lr = 3e-4
eval_interval = 100
eval_batches = 10
