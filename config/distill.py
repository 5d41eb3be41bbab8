# Skip-layer distillation of a converted Phi-3-mini (the Phi-3 project's recipe): every other layer from
# the top, KL to the frozen teacher with and (weight 0.01) without the layer, on instruction data
# tokenized with the checkpoint's own tokenizer.json (needs the optional `tokenizers`).
#   python checkpoints_convert.py --from_hf path/to/Phi-3-mini-4k-instruct --out ckpt/phi3
#   python data/instruct.py && python distill.py config/distill.py
init_from = "ckpt/phi3"
out_dir = "out-distill-phi3"
dataset = "instruct"
data_dir = "data/stdlib_instruct"
micro_batch = 1
block_size = 2048
steps_per_layer = 200
kl_weight = 0.01
lr = 1e-5
eval_batches = 20
