# LayerSkip fine-tuning of TinyLlama-1.1B on Alpaca-format data: the seed recipe.
#   python checkpoints_convert.py --from_hf path/to/TinyLlama-1.1B --out ckpt/tinyllama
#   python data/instruct.py                      # or --data_dir with your own {train,val}.jsonl
#   python train.py config/layerskip.py --init_from=ckpt/tinyllama
init_from = "ckpt/tinyllama"
out_dir = "out-layerskip"
dataset = "instruct"
data_dir = "data/stdlib_instruct"
micro_batch = 2
grad_accum = 32              # global batch 64 on one process (divide by the number of processes)
block_size = 1024
epochs = 1.0
lr = 2e-4
min_lr = 2e-5
warmup_steps = 6             # ~5% of one epoch of the stdlib set (116 steps)
weight_decay = 0.1
# layer dropout: p_max 0.1, exponential in depth, constant in time (fine-tuning)
p_max = 0.1
dropout_scale = "exp"
dropout_curriculum = "constant"
# early-exit loss: rotational curriculum (the code fine-tune setting of the paper: e_scale 1.0)
early_exit_curriculum = "rotational"
exit_period = 8
e_scale = 1.0
eval_interval = 25
eval_batches = 20
