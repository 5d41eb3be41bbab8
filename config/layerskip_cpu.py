# CPU-sized LayerSkip fine-tune (a few minutes on 2 cores): the stdlib model from config/stdlib_cpu.py
# (in out/) fine-tuned on the stdlib instruction set with layer dropout and the early-exit loss.
#   python data/instruct.py && python train.py config/layerskip_cpu.py
init_from = "out"
out_dir = "out-layerskip"
dataset = "instruct"
data_dir = "data/stdlib_instruct"
micro_batch = 8
block_size = 256
max_steps = 150
lr = 1e-3
min_lr = 1e-4
warmup_steps = 10
weight_decay = 0.1
p_max = 0.1
early_exit_curriculum = "rotational"
exit_period = 4
e_scale = 1.0
eval_interval = 50
eval_batches = 10
