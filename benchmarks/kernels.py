"""python bench.py --mode kernels: each fused op of fused/ against its eager reference (time, bytes saved for
backward, CUDA peak), and a whole training step with every op fused vs unfused."""
import torch
import torch.nn.functional as F

from benchmarks.common import (CUDA, DEVICE, batch, bench_config, cuda_peak, device_name, make_model, median_time,
                               memory_in_fresh_process, train_step)
from fused import FUSED


def saved_bytes(fn, *args):
    """Bytes that autograd keeps from fn's forward for its backward (each storage counted once)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    inputs = {a.untyped_storage().data_ptr() for a in args if torch.is_tensor(a)}
    return sum(n for ptr, n in storages.items() if ptr not in inputs)  # inputs are held anyway


def op_cases(cfg, N):
    """(name, fused fn, reference fn, inputs) per op on N tokens of a TinyLlama-shaped layer."""
    from fused.linear_cross_entropy import linear_cross_entropy
    from fused.rmsnorm import rms_norm, rms_norm_reference
    from fused.rotary import apply_rotary, apply_rotary_reference
    from fused.swiglu import swiglu, swiglu_reference
    dtype = torch.bfloat16 if CUDA else torch.float32
    C, H, Hkv, hd, V = cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.vocab_size

    def leaf(*shape):
        return torch.randn(*shape, device=DEVICE, dtype=dtype).requires_grad_()

    qkv = leaf(1, N, H + 2 * Hkv, hd)
    angle = torch.randn(N, hd // 2, device=DEVICE)
    cos, sin = torch.cat((angle, angle), -1).cos().to(dtype), torch.cat((angle, angle), -1).sin().to(dtype)
    weight = torch.ones(C, device=DEVICE, dtype=dtype, requires_grad=True)
    targets = torch.randint(V, (N,), device=DEVICE)
    head = (0.02 * torch.randn(V, C, device=DEVICE, dtype=dtype)).requires_grad_()
    return [
        ("RMSNorm + residual add", lambda x, r: rms_norm(x, weight, 1e-5, r)[0],
         lambda x, r: rms_norm_reference(x, weight, 1e-5, r)[0], (leaf(N, C), leaf(N, C))),
        ("rotary (q and k together)", lambda t: apply_rotary(t.transpose(1, 2)[:, :H + Hkv], cos, sin),
         lambda t: apply_rotary_reference(t.transpose(1, 2)[:, :H + Hkv], cos, sin), (qkv,)),
        ("SwiGLU (packed gate/up)", swiglu, swiglu_reference, (leaf(N, 2 * cfg.intermediate_size),)),
        ("linear + cross-entropy", lambda h: linear_cross_entropy(h, head, targets, recompute=False),
         lambda h: F.cross_entropy((h @ head.T).float(), targets), (leaf(N, C),)),
    ]


def time_and_memory(fn, inputs, steps):
    """(median seconds of forward + backward, bytes saved for backward, peak CUDA bytes above the inputs or None)."""
    def step(_):
        out = fn(*inputs)
        out.backward(torch.ones_like(out))

    t = median_time(step, steps)
    saved = saved_bytes(fn, *inputs)
    peak = cuda_peak(lambda: step(0)) if CUDA else None
    for x in inputs:
        x.grad = None
    return t, saved, peak



def whole_step(cfg, B, T, fused, steps):
    """(median step time, peak step memory) of a train step with every fused/ op on or off; on the CPU
    the memory is measured in a fresh process (memory_in_fresh_process)."""
    FUSED.update(dict.fromkeys(FUSED, fused))
    torch._dynamo.reset()
    model = make_model(cfg, compile_blocks=CUDA)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=CUDA)
    x, y = batch(cfg, B, T)
    t = median_time(lambda s: train_step(model, opt, x, y), steps)
    if CUDA:
        peak = cuda_peak(lambda: train_step(model, opt, x, y))
        del model, opt
        torch.cuda.empty_cache()
    else:
        peak = memory_in_fresh_process("last" if fused else "unfused")
    FUSED.update(dict.fromkeys(FUSED, True))
    return t, peak


def bench_kernels(steps):
    cfg, B, T = bench_config()
    MiB = 2**20
    print(f"device {device_name()}; "
          f"{'bf16, fused = torch.compile of the hand-written forward/backward' if CUDA else 'fp32, eager'}; "
          f"TinyLlama-shaped layer (d {cfg.n_embd}, {cfg.n_head}/{cfg.n_kv_head} heads, MLP {cfg.intermediate_size}, "
          f"vocab {cfg.vocab_size}), {B * T} tokens")
    print(f"{'op':28s} {'fwd+bwd ms fused/unfused':>26s} {'speed':>7s} {'saved MiB fused/unfused':>25s} "
          f"{'ratio':>6s}" + (f" {'peak MiB fused/unfused':>24s}" if CUDA else ""))
    for name, fused, reference, inputs in op_cases(cfg, B * T):
        tf, sf, pf = time_and_memory(fused, inputs, steps)
        tr, sr, pr = time_and_memory(reference, inputs, steps)
        line = (f"{name:28s} {tf * 1e3:12.2f} / {tr * 1e3:9.2f} {tr / tf:6.2f}x "
                f"{sf / MiB:12.1f} / {sr / MiB:9.1f} {sf / max(sr, 1):6.2f}")
        print(line + (f" {pf / MiB:12.1f} / {pr / MiB:9.1f}" if CUDA else ""))
    t_f, m_f = whole_step(cfg, B, T, True, steps)
    t_u, m_u = whole_step(cfg, B, T, False, steps)
    print(f"\nwhole train step, batch {B} x {T} ({'per-block compile, ' if CUDA else ''}one exit, AdamW):")
    print(f"  fused {t_f * 1e3:.1f} ms vs unfused {t_u * 1e3:.1f} ms: {t_u / t_f - 1:+.1%} speed")
    print(f"  peak step memory fused {m_f / MiB:.1f} MiB vs unfused {m_u / MiB:.1f} MiB: {m_f / m_u - 1:+.1%}")
