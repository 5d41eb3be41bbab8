# Unified layer skipping on CPU (a few minutes): the LayerSkip model of config/layerskip_cpu.py (out-layerskip/)
# fine-tuned on the stdlib instruction set so that response tokens skip the layers of a 2x plan
# (prompt tokens run every layer); embeddings frozen. The plan is saved in out-unified/config.json
# and sample.py honours it.
#   python data/instruct.py && python train.py config/unified_cpu.py && python sample.py --out_dir out-unified
init_from = "out-layerskip"
out_dir = "out-unified"
dataset = "instruct"
data_dir = "data/stdlib_instruct"
skip_speedup = 2.0
freeze_embeddings = True
micro_batch = 8
block_size = 256
max_steps = 150
lr = 1e-3
min_lr = 1e-4
warmup_steps = 5
eval_interval = 50
eval_batches = 10
