"""python bench.py --mode bandwidth [--ckpt DIR] [--dtype bfloat16]: batch-1 greedy decoding against
the memory-bandwidth limit, measured in the same run. The limit is the bytes one decode step must
read (every weight but an untied embedding table, of which it reads one row, plus the keys and
values it attends over) divided by the bandwidth: on the CPU a read of a buffer 4x the last-level
cache (at least 1 GiB), on CUDA a device-to-device copy (read + written); best of several. For
each model: bytes per token, ms/token and the fraction of the limit for our eager and compiled
decoding (and the opt-in packed layout, fused/decode_layout.py, on the CPU), transformers'
generate on the same weights, and the resident memory (CPU) before, at its peak during, and after
each. The model: a converted checkpoint (--ckpt, e.g. SmolLM2-135M-Instruct), then also the cost
of a verification of 1, 2, 4 and 8 positions relative to one step and self-speculation with each
drafting mode (benchmarks/speculation.py); without --ckpt, a random model of TinyLlama-1.1B's
shape. --dtype bfloat16: the same in bf16, with its greedy tokens against fp32's.
"""

import ctypes
import gc
import glob
import os
import tempfile

import torch

from benchmarks import common
from benchmarks.common import (
    CUDA,
    DEVICE,
    best_time,
    device_name,
    fixed_length_decoders,
    sync,
    tiny_config,
)
from benchmarks.decode import converted_pair
from model import PRESETS, Transformer

PROMPT_LEN = 32


def last_level_cache_bytes():
    """The largest CPU cache's size from sysfs (Linux), else 0."""
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        with open(path) as f:
            text = f.read().strip()  # e.g. 491520K
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=0)


def read_bandwidth(nbytes=None, repeats=5):
    """Bytes per second: CPU, a sum over a float32 buffer of nbytes (default 4x the last-level
    cache, at least 1 GiB), read once a call; CUDA, a device-to-device copy of 1 GiB (read +
    written). Best of `repeats`."""
    if CUDA:
        nbytes = nbytes or 2**30
        src = torch.empty(nbytes // 4, dtype=torch.float32, device=DEVICE)
        dst = torch.empty_like(src)
        t, _ = best_time(lambda: dst.copy_(src), repeats)
        return 2 * nbytes / t
    nbytes = nbytes or max(2**30, 4 * last_level_cache_bytes())
    buf = torch.ones(nbytes // 4, dtype=torch.float32)
    t, _ = best_time(buf.sum, repeats)
    return nbytes / t


def step_bytes(model, keys):
    """Bytes one batch-1 decode step reads: every parameter but the embedding table (one row of it),
    plus the K and V of every layer over `keys` positions."""
    cfg, size = model.cfg, next(model.parameters()).element_size()
    weights = sum(p.numel() for p in model.parameters()) * size
    table = model.tok_emb.weight
    if (
        model.lm_head.weight is not table
    ):  # a tied table is read whole by the head; an untied one, one row
        weights -= (table.shape[0] - 1) * table.shape[1] * size
    return weights + 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * keys * size


def resident_mib(field="VmRSS"):
    """CPU: the process's resident set (or its peak, VmHWM) in MiB, after giving freed heap memory
    back to the system (glibc's malloc_trim, so that the figure is live memory); CUDA: allocated
    device memory."""
    if CUDA:
        return (
            torch.cuda.max_memory_allocated() if field == "VmHWM" else torch.cuda.memory_allocated()
        ) / 2**20
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    return common.rss_bytes(field) / 2**20


def reset_peak():
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
        return
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM back to the current resident set


def timed_with_memory(fn, repeats):
    """best_time of fn, with the resident memory in MiB before, at its peak during, and after it."""
    gc.collect()
    before = resident_mib()
    reset_peak()
    t, out = best_time(fn, repeats)
    return t, out, (before, resident_mib("VmHWM"), resident_mib())


def hf_twin(ours):
    """transformers' model on our weights (checkpoints_convert.to_hf), eval, on DEVICE."""
    from transformers import AutoModelForCausalLM
    from checkpoints_convert import to_hf

    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(os.path.join(tmp, "ours"))
        to_hf(os.path.join(tmp, "ours"), os.path.join(tmp, "hf"))
        hf = (
            AutoModelForCausalLM.from_pretrained(os.path.join(tmp, "hf"), dtype=torch.float32)
            .to(DEVICE)
            .eval()
        )
    hf.generation_config.eos_token_id = None  # decode every requested token, as ours do
    hf.generation_config.pad_token_id = 0
    return hf


def decode_rows(hf, ours, prompt, n, compile_too, repeats):
    """transformers' generate and our decoding of n tokens -> {name: (seconds, tokens, memory)}."""
    generate, _ = fixed_length_decoders()

    def hf_generate():
        with torch.no_grad():
            return hf.generate(prompt, max_new_tokens=n, do_sample=False)

    runs = {
        "transformers generate": hf_generate,
        "nanoskip eager": lambda: generate(ours, prompt, n, temperature=0),
    }
    if compile_too:
        runs["nanoskip compiled"] = lambda: generate(ours, prompt, n, temperature=0, compile=True)
    rows = {name: timed_with_memory(fn, repeats) for name, fn in runs.items()}
    if (
        not CUDA and torch.backends.mkldnn.is_available()
    ):  # the opt-in layout, last: its copies stay
        from fused.decode_layout import pack, unpack

        pack(ours)
        rows["nanoskip eager, packed (opt-in)"] = timed_with_memory(runs["nanoskip eager"], repeats)
        unpack(ours)
    return rows


def report(title, hf, ours, prompt, n, bandwidth, repeats, compile_too, reference=None):
    """Print one model's table -> our eager tokens (to compare another dtype's with)."""
    # CUDA graphs attend over the whole cache
    keys = ours.cfg.block_size if CUDA and compile_too else PROMPT_LEN + n // 2
    nbytes = step_bytes(ours, keys)
    limit_s = nbytes / bandwidth
    weights = sum(p.numel() * p.element_size() for p in ours.parameters()) / 2**20
    print(
        f"\n{title}: {weights:.0f} MiB of weights, {next(ours.parameters()).dtype}; batch 1, "
        f"prompt {PROMPT_LEN}, {n} new tokens, greedy, best of {repeats}; a step reads "
        f"{nbytes / 2**20:.0f} MiB -> limit "
        f"{limit_s * 1e3:.2f} ms/token"
    )
    rows = decode_rows(hf, ours, prompt, n, compile_too, repeats)
    t_hf = rows["transformers generate"][0]
    unit = "MiB allocated" if CUDA else "MiB resident"
    for name, (t, out, (before, peak, after)) in rows.items():
        print(
            f"  {name:32s} {t / n * 1e3:7.2f} ms/token  "
            f"{limit_s * n / t:6.1%} of the bandwidth limit"
            f"  {t_hf / t:5.2f}x transformers  {unit} before {before:.0f}, "
            f"peak during {peak:.0f}, after {after:.0f}"
        )
    ours_out = rows["nanoskip eager"][1]
    print(
        f"  identical to transformers' tokens: "
        f"{torch.equal(ours_out, rows['transformers generate'][1])}"
    )
    if reference is not None:
        same = (ours_out == reference).all(0).long().cumprod(0).sum().item() - PROMPT_LEN
        print(f"  greedy tokens equal to float32's: the first {same} of {n}")
    return ours_out


def verification_costs(model, prompt, repeats, ks=(1, 2, 4, 8)):
    """Seconds of a forward of k positions at the prompt's end over the cache (a verification of k
    positions through every layer), for each k, timed in turns (speculation.seconds_in_turns),
    relative to k = 1."""
    from benchmarks.speculation import seconds_in_turns
    from model import KVCache

    T = prompt.shape[1]
    cache = KVCache(model.cfg, 1, T + max(ks), prompt.device, next(model.parameters()).dtype)
    tokens = prompt[:, : max(ks)]
    with torch.inference_mode():
        model(prompt, cache=cache)
        times = seconds_in_turns(
            {k: lambda k=k: (model(tokens[:, :k], cache=cache, pos=T), sync()) for k in ks}, repeats
        )[0]
    print(
        "  verification of k positions / one step (eager): "
        + ", ".join(f"k={k} {times[k] / times[1]:.2f}x" for k in ks)
    )


def speculation_modes(model, ckpt, n, repeats):
    """Self-speculation with each drafting mode on the checkpoint's prompts:
    benchmarks/speculation.py's table."""
    from benchmarks import speculation
    from tokenizer import load_tokenizer

    L = model.n_layer
    if common.TINY:
        prompts = [
            torch.randint(model.cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
        ]
    else:
        prompts = speculation.code_prompts(
            load_tokenizer(ckpt, model.cfg.bos_id, model.cfg.eos_id), DEVICE
        )[:4]
    settings = [
        (f"exit layer E={E} d={d}", dict(exit_layer=E, num_speculations=d))
        for E in sorted({L // 2, 2 * L // 3})
        for d in (1, 3)
    ]
    settings += [
        (
            "skip plan: every other layer of the second half, d=2",
            dict(draft_skip_layers=list(range(L // 2, L, 2)), num_speculations=2),
        ),
        ("skip plan auto, d=2", dict(draft_skip_layers="auto", num_speculations=2)),
        ("exit layer auto, cap 8", dict(exit_layer="auto", num_speculations=8)),
    ]
    print(
        f"  self-speculation (eager; {len(prompts)} stdlib code prompts, {n} new tokens; "
        f"speedup over "
        f"our full depth; without LayerSkip training the exits agree rarely, so a speedup below 1 "
        f"means it does not pay):"
    )
    speculation.bench_model(model, prompts, n, repeats, False, settings)


def bench_bandwidth(repeats, ckpt=None, dtype=None):
    dtype = dtype or (torch.bfloat16 if CUDA else torch.float32)
    n = 8 if common.TINY else 32
    compile_too = CUDA or not common.TINY  # --tiny on the CPU: compiling would cost more than the run
    bandwidth = read_bandwidth(2**24 if common.TINY else None)
    print(
        f"device {device_name()}; {torch.get_num_threads()} threads; last-level cache "
        f"{last_level_cache_bytes() / 2**20:.0f} MiB; measured {'copy' if CUDA else 'read'} bandwidth "
        f"{bandwidth / 1e9:.1f} GB/s; dtype {dtype}"
    )
    prompt_for = lambda cfg: torch.randint(
        cfg.vocab_size, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(0)  # noqa: E731
    ).to(DEVICE)
    if ckpt:
        ours = Transformer.from_pretrained(ckpt, device=DEVICE)
        hf, prompt = hf_twin(ours), prompt_for(ours.cfg)
        reference = None
        if dtype != torch.float32:
            reference = report(f"{ckpt} (float32)", hf, ours, prompt, n, bandwidth, repeats, False)
            hf, ours = hf.to(dtype), ours.to(dtype)
        report(ckpt, hf, ours, prompt, n, bandwidth, repeats, compile_too, reference)
        verification_costs(ours, prompt, max(repeats, 5))
        hf = None
        speculation_modes(ours, ckpt, n, repeats)
        return
    cfg = tiny_config() if common.TINY else PRESETS["tinyllama-1.1b"]
    hf, ours = converted_pair(cfg, cfg.n_layer)
    hf, ours = hf.to(dtype), ours.to(dtype)
    report(
        f"random model of {'a test' if common.TINY else 'TinyLlama-1.1B'}'s shape",
        hf,
        ours,
        prompt_for(cfg),
        n,
        bandwidth,
        repeats,
        compile_too,
    )
