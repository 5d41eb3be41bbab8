"""python bench.py --mode layerskip: the early-exit loss's peak memory and step time at every exit (fused vs
naive logits, measured vs FLOP-predicted), and what layer dropout saves."""
import statistics

import torch

from benchmarks.common import (CUDA, batch, bench_config, device_name, make_model, median_time,
                               memory_in_fresh_process, train_step)
from layerskip import dropout_rates, exit_weights, layer_dropout_mask


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
    print(f"device {device_name()}; model {L} layers, "
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
