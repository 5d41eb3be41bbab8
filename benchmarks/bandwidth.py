"""python bench.py --mode bandwidth: batch-1 greedy decoding of a random model of TinyLlama-1.1B's shape (bf16 on
CUDA, compiled, CUDA graphs) against the memory-bandwidth limit: the bytes one decode step must read (every
weight but the embedding table, of which it reads one row, plus the keys and values it attends over) divided by
the device's copy bandwidth measured in the same run. Also self-speculation on the same weights (later layers'
output projections scaled down, so the draft agrees at a stated rate) and transformers' generate.
gpt-fast reaches about 70% of the limit on an A100; that is the target."""
import torch

from benchmarks import common
from benchmarks.common import CUDA, DEVICE, best_time, device_name, fixed_length_decoders, sync, tiny_config
from benchmarks.decode import converted_pair
from model import PRESETS


def copy_bandwidth(nbytes=2**30, repeats=5):
    """Bytes per second of a device-to-device copy of nbytes (read + written), best of `repeats`."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=DEVICE)
    dst = torch.empty_like(src)
    t, _ = best_time(lambda: dst.copy_(src), repeats)
    return 2 * nbytes / t


def step_bytes(model, keys):
    """Bytes one batch-1 decode step reads: every parameter but the embedding table (one row of it), plus the
    K and V of every layer over `keys` positions."""
    cfg, size = model.cfg, next(model.parameters()).element_size()
    weights = sum(p.numel() for p in model.parameters()) * size
    table = model.tok_emb.weight
    if model.lm_head.weight is not table:  # a tied table is read whole by the head; an untied one, one row
        weights -= (table.shape[0] - 1) * table.shape[1] * size
    return weights + 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * keys * size


def bench_bandwidth(repeats, new_tokens=256, prompt_len=32, d=4):
    generate, generate_speculative = fixed_length_decoders()
    cfg = tiny_config() if common.TINY else PRESETS["tinyllama-1.1b"]
    n, E = (8, 1) if common.TINY else (new_tokens, 4)
    dtype = torch.bfloat16 if CUDA else torch.float32
    compile = CUDA  # on the CPU (--tiny smoke run) compiling would cost more than the run
    hf, ours = converted_pair(cfg, E)
    hf, ours = hf.to(dtype), ours.to(dtype)
    prompt = torch.randint(cfg.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    bandwidth = copy_bandwidth(2**20 if common.TINY else 2**30)
    # with CUDA graphs a step attends over the whole cache (KVCache.attend_all); else over the written slots
    keys = cfg.block_size if compile and CUDA else prompt_len + n // 2
    limit = bandwidth / step_bytes(ours, keys)
    print(f"device {device_name()}; random {cfg.n_layer}-layer d {cfg.n_embd} Llama, {dtype}; batch 1, prompt "
          f"{prompt_len}, {n} new tokens, greedy; compile {compile}; copy bandwidth {bandwidth / 1e9:.0f} GB/s; "
          f"a step reads {step_bytes(ours, keys) / 2**20:.0f} MiB -> limit {limit:.0f} tokens/s")

    def hf_generate():
        with torch.no_grad():
            return hf.generate(prompt, max_new_tokens=n, do_sample=False)

    runs = {"nanoskip full depth": lambda: generate(ours, prompt, n, temperature=0, compile=compile),
            f"nanoskip self-speculative E={E} d={d}": lambda: generate_speculative(ours, prompt, n, E, d,
                                                                                   compile=compile),
            "transformers generate": hf_generate}
    t, out = {}, {}
    for name, fn in runs.items():
        t[name], out[name] = best_time(fn, repeats)
        print(f"  {name:36s} {n / t[name]:8.1f} tokens/s  {t[name] / n * 1e3:6.2f} ms/token")
    sync()
    full, spec, hf_name = runs
    print(f"  full depth: {n / t[full] / limit:.1%} of the bandwidth limit (target >= 70%); "
          f"{t[hf_name] / t[full]:.2f}x transformers generate")
    print(f"  self-speculation: acceptance {out[spec][1]['acceptance_rate']:.1%}, {t[full] / t[spec]:.2f}x full depth; "
          f"same tokens as full depth: {torch.equal(out[spec][0], out[full])}")
