# Skip-layer distillation on CPU (a few minutes): the LayerSkip model of config/layerskip_cpu.py (out-layerskip/)
# teaches a copy of itself to survive layers 14, 12, ..., 2 being skipped, 40 steps per layer.
#   python distill.py config/distill_cpu.py
init_from = "out-layerskip"
out_dir = "out-distill"
data_dir = "data/stdlib"
micro_batch = 8
block_size = 256
steps_per_layer = 40
kl_weight = 0.01
lr = 3e-4
eval_batches = 10
