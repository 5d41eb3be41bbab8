"""
Benchmarks that print ratios against a baseline measured in the same run (machines are noisy).

    python bench.py --mode layerskip   # early-exit loss memory and time, layer dropout savings
    python bench.py --mode train       # train step tokens/s vs transformers' LlamaForCausalLM (+ MFU on CUDA)

CPU: fp32, a TinyLlama-shaped small model (vocab 32000). CUDA: bf16 autocast, TinyLlama-1.1B, seq 2048.
Peak memory: CUDA max_memory_allocated; on CPU each configuration runs in a fresh process and reports
its peak resident set (VmHWM) above the resident set before the measured step.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from layerskip import dropout_rates, exit_weights, layer_dropout_mask
from model import PRESETS, Config, Transformer

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
from train import PEAK_BF16_FLOPS

H100_BF16_PEAK = PEAK_BF16_FLOPS["H100"]  # MFU is reported against the dense bf16 datasheet peak


BATCH = None  # --batch overrides the default batch size


def bench_config():
    """(config, batch, sequence): TinyLlama-1.1B at 2048 on CUDA, a TinyLlama-shaped small model on CPU."""
    if CUDA:
        return PRESETS["tinyllama-1.1b"], BATCH or 1, 2048
    cfg = Config(vocab_size=32000, n_layer=8, n_head=8, n_kv_head=1, n_embd=256, intermediate_size=704, block_size=256)
    return cfg, BATCH or 4, 256


def sync():
    if CUDA:
        torch.cuda.synchronize()


def median_time(fn, steps, warmup=2):
    for _ in range(warmup):
        fn(0)
    times = []
    for i in range(steps):
        sync()
        t = time.perf_counter()
        fn(i + 1)
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def autocast():
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=CUDA)


def make_model(cfg, compile_blocks=False):
    torch.manual_seed(0)
    model = Transformer(cfg).to(DEVICE).train()
    if compile_blocks:
        for block in model.layers:
            block.compile()
    return model


def batch(cfg, B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(cfg.vocab_size, (B, T + 1), generator=g)
    return x[:, :-1].to(DEVICE), x[:, 1:].to(DEVICE)


def naive_exit_loss(model, x, y, exits):
    """The loss a straightforward implementation computes: full [B*T, V] logits at every exit."""
    h, done, loss = model.embed(x), 0, 0.0
    for e, w in sorted(exits.items()):
        h = model.run_layers(h, done, e)
        done = e
        loss = loss + w * F.cross_entropy(model.head(h).flatten(0, 1).float(), y.flatten())
    return loss


def train_step(model, opt, x, y, exits=None, skip_mask=None, naive=False):
    with autocast():
        if naive:
            loss = naive_exit_loss(model, x, y, exits)
        else:
            loss, _ = model(x, y, exits=exits, skip_mask=skip_mask)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


# ---- peak memory ----

def rss_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def measure_memory(kind):
    """Peak bytes of one training step above the memory held before it (model, optimizer state, batch)."""
    cfg, B, T = bench_config()
    L = cfg.n_layer
    exits = {L: 1.0} if kind == "last" else {e: 1.0 / L for e in range(1, L + 1)}
    model = make_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = batch(cfg, B, T)
    train_step(model, opt, x, y, exits, naive=kind == "naive")  # allocates the optimizer state
    if CUDA:
        sync()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        base = rss_bytes("VmRSS")
    train_step(model, opt, x, y, exits, naive=kind == "naive")
    sync()
    peak = torch.cuda.max_memory_allocated() if CUDA else rss_bytes("VmHWM")
    return peak - base


def memory_in_fresh_process(kind):
    if CUDA:
        result = measure_memory(kind)
        torch.cuda.empty_cache()
        return result
    cmd = [sys.executable, __file__, "--_memory", kind] + (["--batch", str(BATCH)] if BATCH else [])
    # allocations over 1 MiB get their own mapping, returned to the OS when freed: the resident set then
    # follows live tensors instead of what the allocator keeps from the warm-up step
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(2**20))
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return int(out.stdout.strip().splitlines()[-1])


# ---- FLOPs ----

def flops_per_token(cfg, T):
    """Forward+backward FLOPs per token of the body (6 x matmul params + attention over T keys) and of one
    exit through our fused loss when several exits recompute their logits (8 x C x V); a single exit
    forms its gradients in the forward (6 x C x V)."""
    hd = cfg.head_dim
    layer_params = cfg.n_embd * (cfg.n_head + 2 * cfg.n_kv_head) * hd + cfg.n_head * hd * cfg.n_embd \
        + 3 * cfg.n_embd * cfg.intermediate_size
    body = cfg.n_layer * (6 * layer_params + 12 * T * cfg.n_embd)
    exit_ = 8 * cfg.n_embd * cfg.vocab_size
    return body, exit_


def average_exit_count(L, curriculum, period, steps):
    return statistics.mean(len(exit_weights(L, s, steps, 1.0, curriculum, period)) for s in range(steps))


# ---- modes ----

def bench_layerskip(steps):
    cfg, B, T = bench_config()
    L = cfg.n_layer
    print(f"device {DEVICE}{' (' + torch.cuda.get_device_name() + ')' if CUDA else ''}; model {L} layers, "
          f"d {cfg.n_embd}, vocab {cfg.vocab_size}; batch {B} x {T}; {'bf16 autocast' if CUDA else 'fp32'}")

    mem = {k: memory_in_fresh_process(k) for k in ("last", "all", "naive")}
    print("\npeak memory of a training step (above weights + optimizer state):")
    print(f"  loss at the last layer only        {mem['last'] / 2**20:9.1f} MiB")
    print(f"  loss at all {L} exits (fused)       {mem['all'] / 2**20:9.1f} MiB   ratio {mem['all'] / mem['last']:.2f}x (target <= 1.3x)")
    print(f"  loss at all {L} exits (naive logits) {mem['naive'] / 2**20:9.1f} MiB   ratio {mem['naive'] / mem['last']:.2f}x")

    model = make_model(cfg, compile_blocks=CUDA)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = batch(cfg, B, T)
    body, per_exit = flops_per_token(cfg, T)
    R = 4

    def timed(curriculum):
        return median_time(lambda s: train_step(model, opt, x, y, exit_weights(L, s, steps, 1.0, curriculum, R)), steps)

    t_last, t_all, t_rot = timed("off"), timed("none"), timed("rotational")
    print("\nstep time with the early-exit loss (measured vs predicted from FLOPs):")
    n_all, n_rot = average_exit_count(L, "none", R, steps), average_exit_count(L, "rotational", R, R)
    for name, t, n in (("all exits", t_all, n_all), (f"rotational R={R}", t_rot, n_rot)):
        predicted = (body + n * per_exit) / (body + 0.75 * per_exit)  # the baseline's one exit: 6CV
        measured = t / t_last
        print(f"  {name:16s} {t * 1e3:8.1f} ms  measured {measured:.2f}x  predicted {predicted:.2f}x "
              f"({n:.2f} exits)  measured/predicted {measured / predicted:.2f}")
    print(f"  last layer only  {t_last * 1e3:8.1f} ms")

    p_max = 0.8
    rates = dropout_rates(L, 0, 1, p_max)
    last = {L: 1.0}
    t_none = median_time(lambda s: train_step(model, opt, x, y, last), steps)
    t_drop = median_time(lambda s: train_step(model, opt, x, y, last, layer_dropout_mask(rates, B, s)), steps)
    skipped = rates.mean().item() * body / (body + 0.75 * per_exit)
    achieved = 1 - t_drop / t_none
    print(f"\nlayer dropout p_max {p_max} (exp scale): {t_drop * 1e3:.1f} ms vs {t_none * 1e3:.1f} ms without; "
          f"saving {achieved:.1%} of the step vs {skipped:.1%} theoretical "
          f"(skipped layer FLOPs) -> {achieved / skipped:.0%} of it (target >= 70%)")


def hf_llama(cfg):
    from transformers import LlamaConfig, LlamaForCausalLM
    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.intermediate_size,
                         num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                         num_key_value_heads=cfg.n_kv_head, max_position_embeddings=cfg.block_size,
                         rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=False)
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(hf_cfg).to(DEVICE).train()


def bench_train(steps):
    cfg, B, T = bench_config()
    x, y = batch(cfg, B, T)
    ours = make_model(cfg, compile_blocks=CUDA)
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=CUDA)
    t_ours = median_time(lambda s: train_step(ours, opt, x, y), steps)
    del ours, opt
    if CUDA:
        torch.cuda.empty_cache()
    hf = hf_llama(cfg)
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=CUDA)

    def hf_step(_):
        with autocast():
            loss = hf(input_ids=x, labels=x).loss  # transformers shifts labels itself
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t_hf = median_time(hf_step, steps)
    tokens = B * T
    print(f"device {DEVICE}{' (' + torch.cuda.get_device_name() + ')' if CUDA else ''}; {cfg.n_layer} layers, "
          f"d {cfg.n_embd}, vocab {cfg.vocab_size}; batch {B} x {T}; {'bf16 autocast, per-block compile' if CUDA else 'fp32'}")
    print(f"  nanoskip      {tokens / t_ours:10,.0f} tok/s  ({t_ours * 1e3:.1f} ms/step)")
    print(f"  transformers  {tokens / t_hf:10,.0f} tok/s  ({t_hf * 1e3:.1f} ms/step)")
    print(f"  ratio {t_hf / t_ours:.2f}x")
    if CUDA:
        with torch.device("meta"):
            flops = Transformer(cfg).flops_per_token(T)
        print(f"  MFU {flops * tokens / t_ours / H100_BF16_PEAK:.1%} (nanoskip), "
              f"{flops * tokens / t_hf / H100_BF16_PEAK:.1%} (transformers) of {H100_BF16_PEAK / 1e12:.0f} TFLOP/s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--mode", choices=("layerskip", "train"), default="layerskip")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--_memory", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    global BATCH
    BATCH = args.batch
    if args._memory:
        print(measure_memory(args._memory))
        return
    torch.manual_seed(0)
    {"layerskip": bench_layerskip, "train": bench_train}[args.mode](args.steps)


if __name__ == "__main__":
    main()
