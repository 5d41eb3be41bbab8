"""
Benchmarks that print ratios against a baseline measured in the same run (machines are noisy).

    python bench.py --mode layerskip   # early-exit loss memory and time, layer dropout savings
    python bench.py --mode train       # train step tokens/s vs transformers' LlamaForCausalLM (+ MFU on CUDA)
    python bench.py --mode decode [--ckpt out-layerskip]  # batch-1 decoding vs transformers.generate, on the
                                       # same weights; self-speculation on a trained checkpoint
    python bench.py --mode kernels     # each fused op and a whole train step, fused vs unfused (kernels/)
    python bench.py --mode speculation [--ckpt out] [--plain_ckpt out-plain] [--models abc]  # does self-speculation
                                       # pay: speedup, acceptance and fraction of ideal (benchmarks/speculation.py)

CPU: fp32, a TinyLlama-shaped small model (vocab 32000). CUDA: bf16 autocast, TinyLlama-1.1B, seq 2048.
Peak memory: CUDA max_memory_allocated; on CPU each configuration runs in a fresh process and reports
its peak resident set (VmHWM) above the resident set before the measured step.
"""
import argparse
import functools
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from layerskip import dropout_rates, exit_weights, layer_dropout_mask
from kernels import FUSED
from model import PRESETS, Config, Transformer, layer_mask

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
    exits = {L: 1.0} if kind in ("last", "unfused") else {e: 1.0 / L for e in range(1, L + 1)}
    FUSED.update(dict.fromkeys(FUSED, kind != "unfused"))  # "unfused": every kernels/ op off, full-logits loss
    model = make_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = batch(cfg, B, T)

    def step():
        train_step(model, opt, x, y, exits, naive=kind == "naive")

    step()  # allocates the optimizer state
    if CUDA:
        peak = cuda_peak(step)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        base = rss_bytes("VmRSS")
        step()
        peak = rss_bytes("VmHWM") - base
    FUSED.update(dict.fromkeys(FUSED, True))
    return peak


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
    """Our train step vs transformers'. On CUDA one model at a time (memory), ours with per-block compile.
    On the CPU all live at once and their steps alternate, so that the machine's drift over minutes hits
    all alike: ours eager, ours with per-block compile (train.py --compile=True), transformers."""
    cfg, B, T = bench_config()
    x, y = batch(cfg, B, T)
    variants = {"nanoskip": CUDA} if CUDA else {"nanoskip (eager)": False, "nanoskip (per-block compile)": True}
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
    print(f"device {DEVICE}{' (' + torch.cuda.get_device_name() + ')' if CUDA else ''}; {cfg.n_layer} layers, "
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


def decode_configs():
    """Two regimes of batch-1 CPU decoding: a model whose weights stay in cache (per-token cost is the
    implementation's overhead) and a TinyLlama-shaped one whose fp32 weights (67 MB) stream from memory
    every token (per-token cost is memory bandwidth, the same for any implementation)."""
    return {"stdlib-16l shape (4M params)": PRESETS["stdlib-16l"],
            "TinyLlama-shaped (17M params)": Config(vocab_size=32000, n_layer=12, n_head=8, n_kv_head=2, n_embd=256,
                                                    intermediate_size=704, block_size=512)}


def best_time(fn, repeats):
    """Shortest of `repeats` timed calls after one warm-up: decoding has no per-step variety to average."""
    fn()
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        result = fn()
        sync()
        times.append(time.perf_counter() - t)
    return min(times), result


def decode_flops(cfg, n_layers, T):
    """Forward FLOPs per decoded token: 2 x (layer matmul params + attention over T keys) per layer + 2 x C x V."""
    hd = cfg.head_dim
    layer = cfg.n_embd * (cfg.n_head + 2 * cfg.n_kv_head) * hd + cfg.n_head * hd * cfg.n_embd \
        + 3 * cfg.n_embd * cfg.intermediate_size
    return n_layers * 2 * (layer + 2 * cfg.n_head * hd * T) + 2 * cfg.n_embd * cfg.vocab_size


def converted_pair(cfg, E):
    """A random transformers Llama and the same weights converted to nanoskip. Layers from E on get their
    output projections scaled by 0.02, so that (like a LayerSkip-trained model) the exit at E mostly agrees
    with the last layer and speculation has drafts to accept."""
    import tempfile
    from checkpoints_convert import from_hf
    hf = hf_llama(cfg).eval()
    with torch.no_grad():
        for layer in hf.model.layers[E:]:
            layer.self_attn.o_proj.weight.mul_(0.02)
            layer.mlp.down_proj.weight.mul_(0.02)
    hf.generation_config.eos_token_id = None  # random weights: never stop early, on either side
    hf.generation_config.pad_token_id = 0
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(os.path.join(tmp, "hf"))
        from_hf(os.path.join(tmp, "hf"), os.path.join(tmp, "ours"))
        return hf, Transformer.from_pretrained(os.path.join(tmp, "ours"), device=DEVICE)


def bench_decode(repeats, ckpt, new_tokens=128, d=4):
    from generate import generate, generate_speculative
    from unified import unified_plan
    n = new_tokens
    print(f"device {DEVICE}{' (' + torch.cuda.get_device_name() + ')' if CUDA else ''}, {torch.get_num_threads()} "
          f"threads; random Llama weights, fp32; batch 1, prompt 32, {n} new tokens, greedy; best of {repeats}")
    for title, cfg in decode_configs().items():
        E = cfg.n_layer // 4
        hf, ours = converted_pair(cfg, E)
        prompt = torch.randint(cfg.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0)).to(DEVICE)
        kept = unified_plan(cfg.n_layer, 2)
        plan = layer_mask([l for l in range(cfg.n_layer) if l not in kept], cfg.n_layer)
        print(f"\n{title}: {cfg.n_layer} layers, d {cfg.n_embd}, vocab {cfg.vocab_size}; draft E={E}, d={d}; "
              f"unified 2x plan keeps layers {kept}")

        def hf_generate(**kw):
            with torch.no_grad():
                return hf.generate(prompt, max_new_tokens=n, do_sample=False, **kw)

        runs = {
            "transformers generate": lambda: hf_generate(),
            f"transformers assistant_early_exit={E}": lambda: hf_generate(
                assistant_early_exit=E, num_assistant_tokens=d, num_assistant_tokens_schedule="constant"),
            "nanoskip full depth": lambda: generate(ours, prompt, n, temperature=0),
            f"nanoskip self-speculative E={E}": lambda: generate_speculative(ours, prompt, n, E, d),
            f"nanoskip exit layer {E}": lambda: generate(ours, prompt, n, temperature=0, exit_layer=E),
            "nanoskip full depth, --compile": lambda: generate(ours, prompt, n, temperature=0, compile=True),
            f"nanoskip self-speculative E={E}, --compile": lambda: generate_speculative(ours, prompt, n, E, d, compile=True),
            f"nanoskip exit layer {E}, --compile": lambda: generate(ours, prompt, n, temperature=0, exit_layer=E, compile=True),
            "nanoskip unified 2x plan": lambda: generate(ours, prompt, n, temperature=0, skip_mask=plan),
            "nanoskip unified 2x plan, --compile": lambda: generate(ours, prompt, n, temperature=0, skip_mask=plan,
                                                                   compile=True),
        }
        t, out = {}, {}
        for name, fn in runs.items():
            t[name], out[name] = best_time(fn, repeats)
            print(f"  {name:38s} {n / t[name]:8.1f} tok/s  {t[name] / n * 1e3:6.2f} ms/token")
        names = list(runs)
        reference = out[names[0]]
        greedy = [k for k in names[1:] if "exit layer" not in k and "plan" not in k]  # the full-depth decodes
        same = all(torch.equal(out[k][0] if "speculative" in k else out[k], reference) for k in greedy)
        print(f"  outputs of {len(greedy)} full-depth runs identical to transformers greedy: {same}; our acceptance "
              f"{out[names[3]][1]['acceptance_rate']:.1%}")
        if CUDA:  # compiled steps run as CUDA graphs unless Inductor skipped them (it logs why)
            print(f"  CUDA graph skips so far: {torch._dynamo.utils.counters['inductor']['cudagraph_skips']}")
        T = 32 + n // 2  # average keys attended
        predicted = decode_flops(cfg, cfg.n_layer, T) / decode_flops(cfg, E, T)
        for label, (full, spec, exit_) in (("eager", names[2:5]), ("--compile", names[5:8])):
            measured = t[full] / t[exit_]
            print(f"  {label:9s}: greedy vs transformers generate {t[names[0]] / t[full]:.2f}x (target >= 2x); "
                  f"self-speculation vs assistant_early_exit {t[names[1]] / t[spec]:.2f}x (target >= 2x); exit layer "
                  f"{E} vs full depth {measured:.2f}x = {(measured - 1) / (predicted - 1):.0%} of the FLOP-predicted "
                  f"{predicted:.2f}x (target >= 80%)")
        print(f"  unified 2x plan ({len(kept)} of {cfg.n_layer} layers) vs full depth: eager "
              f"{t[names[2]] / t[names[8]]:.2f}x, --compile {t[names[5]] / t[names[9]]:.2f}x (FLOPs predict "
              f"{decode_flops(cfg, cfg.n_layer, T) / decode_flops(cfg, len(kept), T):.2f}x)")
    if ckpt:
        bench_trained_speculation(ckpt, repeats, n)


def bench_trained_speculation(ckpt, repeats, n):
    """Self-speculation on a trained checkpoint: greedy, prompts from the stdlib's own source, one at a time."""
    import sysconfig
    from generate import generate, generate_speculative
    from tokenizer import load_tokenizer
    model = Transformer.from_pretrained(ckpt, device=DEVICE)
    tok = load_tokenizer(ckpt, model.cfg.bos_id, model.cfg.eos_id)
    stdlib = sysconfig.get_paths()["stdlib"]
    texts = [open(os.path.join(stdlib, f), encoding="utf-8").read()[:400] for f in
             ("argparse.py", "json/decoder.py", "textwrap.py", "heapq.py")]
    prompts = [torch.tensor([[tok.bos_id()] + tok.encode(t)[:48]], device=DEVICE) for t in texts]
    L = model.n_layer
    print(f"\ntrained checkpoint {ckpt!r}: {L} layers; {len(prompts)} stdlib prompts of 48 tokens, {n} new "
          f"tokens each, greedy, batch 1; best of {repeats}")
    for compile in (False, True):
        t_full, full = best_time(lambda: [generate(model, p, n, temperature=0, compile=compile) for p in prompts], repeats)
        print(f"  {'--compile' if compile else 'eager'}: full depth {t_full / (n * len(prompts)) * 1e3:.2f} ms/token")
        for E in sorted({L // 4, L // 2, 3 * L // 4}):
            for d in (2, 4, 6):
                t_spec, res = best_time(lambda: [generate_speculative(model, p, n, E, d, compile=compile)
                                                 for p in prompts], repeats)
                same = all(torch.equal(o, f) for (o, _), f in zip(res, full))
                rate = sum(s["accepted"] for _, s in res) / sum(s["drafted"] for _, s in res)
                print(f"    E={E:2d} d={d}: {t_spec / (n * len(prompts)) * 1e3:.2f} ms/token, speedup "
                      f"{t_full / t_spec:.2f}x, acceptance {rate:.1%}, identical to full depth: {same}")


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
    from kernels.linear_cross_entropy import linear_cross_entropy
    from kernels.rmsnorm import rms_norm, rms_norm_reference
    from kernels.rotary import apply_rotary, apply_rotary_reference
    from kernels.swiglu import swiglu, swiglu_reference
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


def cuda_peak(fn):
    """Peak CUDA bytes allocated while fn() runs, above what was allocated before it."""
    sync()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync()
    return torch.cuda.max_memory_allocated() - base


def whole_step(cfg, B, T, fused, steps):
    """(median step time, peak step memory) of a train step with every kernels/ op on or off; on the CPU
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
    print(f"device {DEVICE}{' (' + torch.cuda.get_device_name() + ')' if CUDA else ''}; "
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--mode", choices=("layerskip", "train", "decode", "kernels", "speculation"),
                        default="layerskip")
    parser.add_argument("--ckpt", default=None, help="decode mode: a trained checkpoint to speculate with; "
                        "speculation mode: the LayerSkip-trained checkpoint (default: out, README's job)")
    parser.add_argument("--plain_ckpt", default="out-plain", help="speculation mode: a checkpoint trained "
                        "without LayerSkip, for skip-plan drafts")
    parser.add_argument("--models", default="abc", help="speculation mode: which of (a) LayerSkip checkpoint, (b) "
                        "TinyLlama-shaped random Llama, (c) plain checkpoint to run")
    parser.add_argument("--new_tokens", type=int, default=64, help="speculation mode: tokens generated per prompt")
    parser.add_argument("--eager", action="store_true", help="speculation mode: eager decode steps, not compiled")
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
    if args.mode == "decode":
        return bench_decode(args.steps, args.ckpt)
    if args.mode == "speculation":
        from benchmarks.speculation import bench_speculation
        return bench_speculation(args.ckpt or "out", args.plain_ckpt, args.new_tokens, 1, not args.eager, args.models)
    {"layerskip": bench_layerskip, "train": bench_train, "kernels": bench_kernels}[args.mode](args.steps)


if __name__ == "__main__":
    main()
