# LayerSkip fine-tune of a real pretrained model on CPU, 150 steps: SmolLM2-135M-Instruct (30 layers),
# imported from its GGUF file, fine-tuned on the stdlib instruction set with layer dropout and the
# rotational early-exit loss, so that its early exits (10, 15, 20, 25) learn to agree with full depth.
#   the import: README.md, "Real checkpoints" (ckpt/smollm2), then
#   python3 data/instruct.py && python3 train.py config/layerskip_smollm2.py
# Instruction records are encoded with the checkpoint's own tokenizer (no bos: SmolLM2 adds none).
init_from = "ckpt/smollm2"
out_dir = "ckpt/smollm2-layerskip"
dataset = "instruct"
data_dir = "data/stdlib_instruct"
micro_batch = 4
block_size = 256
max_steps = 150
lr = 1e-4            # a pretrained model: a tenth of a from-scratch rate
min_lr = 1e-5
warmup_steps = 10
weight_decay = 0.01
p_max = 0.1          # layer dropout up to 0.1 at the last layer (exp scale)
early_exit_curriculum = "rotational"
exit_period = 8      # each layer's exit is in the loss every 8 steps
e_scale = 1.0
eval_interval = 50
eval_batches = 10
eval_exits = "10,15,20,25,30"
