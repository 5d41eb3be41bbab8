# Unified layer skipping for TinyLlama-1.1B (Liu et al. 2024 recipe): one fine-tune per target speedup,
# word embeddings frozen, lr 2e-5, cosine, 3% warmup, block 512.
#   python checkpoints_convert.py --from_hf path/to/TinyLlama-1.1B --out ckpt/tinyllama
#   python data/instruct.py
#   torchrun --nproc_per_node 8 train.py config/unified.py --skip_speedup=3 --out_dir=out-unified-3x
init_from = "ckpt/tinyllama"
out_dir = "out-unified-2x"
dataset = "instruct"
data_dir = "data/stdlib_instruct"
skip_speedup = 2.0
freeze_embeddings = True
micro_batch = 4
grad_accum = 16
block_size = 512
epochs = 1.0
lr = 2e-5
min_lr = 0.0
warmup_steps = 4             # 3% of one epoch of the stdlib set at global batch 64
weight_decay = 0.0
eval_interval = 25
eval_batches = 20
