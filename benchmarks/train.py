"""python bench.py --mode train: our training step's tokens/s against transformers' LlamaForCausalLM on the same
shapes (+ MFU on CUDA)."""
import functools
import statistics

import torch

from benchmarks import common
from benchmarks.common import (CUDA, autocast, batch, bench_config, device_name, hf_llama, make_model, median_time,
                               train_step)
from model import Transformer
from train import PEAK_BF16_FLOPS

H100_BF16_PEAK = PEAK_BF16_FLOPS["H100"]  # MFU is reported against the dense bf16 datasheet peak


def bench_train(steps):
    """Our train step vs transformers'. On CUDA one model at a time (memory), ours with per-block compile.
    On the CPU all live at once and their steps alternate, so that the machine's drift over minutes hits
    all alike: ours eager, ours with per-block compile (train.py --compile=True), transformers."""
    cfg, B, T = bench_config()
    x, y = batch(cfg, B, T)
    variants = {"nanoskip": CUDA} if CUDA else {"nanoskip (eager)": False, "nanoskip (per-block compile)": True}
    if common.TINY and not CUDA:  # the smoke run: compiling costs more than the rest of it
        del variants["nanoskip (per-block compile)"]
    steps_of = {}
    for name, compile_blocks in variants.items():
        model = make_model(cfg, compile_blocks=compile_blocks)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=CUDA)
        steps_of[name] = functools.partial(train_step, model, opt, x, y)
    if CUDA:
        t = {"nanoskip": median_time(lambda _: steps_of["nanoskip"](), steps)}
        del steps_of, model, opt
        torch.cuda.empty_cache()
    hf = hf_llama(cfg)
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=CUDA)

    def hf_step():
        with autocast():
            loss = hf(input_ids=x, labels=x).loss  # transformers shifts labels itself
        loss.backward()
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)

    if CUDA:
        t["transformers"] = median_time(lambda _: hf_step(), steps)
    else:
        steps_of["transformers"] = hf_step
        per_step = [{k: median_time(lambda _: fn(), 1, warmup=2 * (s == 0)) for k, fn in steps_of.items()}
                    for s in range(steps)]  # step by step, the variants in turn
        t = {k: statistics.median(row[k] for row in per_step) for k in steps_of}
    tokens, t_hf = B * T, t.pop("transformers")
    print(f"device {device_name()}; {cfg.n_layer} layers, "
          f"d {cfg.n_embd}, vocab {cfg.vocab_size}; batch {B} x {T}; {'bf16 autocast, per-block compile' if CUDA else 'fp32'}")
    for name, t_ours in t.items():
        print(f"  {name:30s} {tokens / t_ours:10,.0f} tok/s  ({t_ours * 1e3:.1f} ms/step)  {t_hf / t_ours:.2f}x transformers")
    print(f"  {'transformers':30s} {tokens / t_hf:10,.0f} tok/s  ({t_hf * 1e3:.1f} ms/step)")
    if CUDA:
        t_ours = t["nanoskip"]
        with torch.device("meta"):
            flops = Transformer(cfg).flops_per_token(T)
        print(f"  MFU {flops * tokens / t_ours / H100_BF16_PEAK:.1%} (nanoskip), "
              f"{flops * tokens / t_hf / H100_BF16_PEAK:.1%} (transformers) of {H100_BF16_PEAK / 1e12:.0f} TFLOP/s")
