"""
What every benchmark mode shares: the device, timing, the models and batches they build, peak memory, and
the header that makes a pasted run self-describing (machine, versions, commit, command).
"""
import functools
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from fused import FUSED
from model import Config, PRESETS, Transformer

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
BATCH = None  # bench.py --batch overrides the default batch size
TINY = False  # bench.py --tiny: test-sized shapes, so that every mode runs in seconds on a CPU (the test suite)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_name():
    """The CPU's model name from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit():
    """HEAD's short hash, with '-dirty' when tracked files differ from it; 'unknown' outside a checkout."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode != 0:
            return "unknown"
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def header(argv):
    """Lines naming the machine (GPU name, or CPU model + torch's CPU ISA and threads), torch and transformers
    versions, the UTC date, the commit and the command: BENCHMARKS.md keys every figure by these."""
    try:
        import transformers
        hf_version = transformers.__version__
    except ImportError:
        hf_version = "not installed"
    if CUDA:
        machine = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    else:
        machine = (f"{cpu_name()}, {os.cpu_count()} cores, torch ISA {torch.backends.cpu.get_cpu_capability()}, "
                   f"{torch.get_num_threads()} threads")
    return [f"machine: {machine}",
            f"software: torch {torch.__version__}, transformers {hf_version}, python {platform.python_version()}",
            f"date: {time.strftime('%Y-%m-%d', time.gmtime())}; commit: {git_commit()}",
            "command: python " + " ".join(argv)]


def device_name():
    return f"{DEVICE}{' (' + torch.cuda.get_device_name() + ')' if CUDA else ''}"


def bench_config():
    """(config, batch, sequence): TinyLlama-1.1B at 2048 on CUDA, a TinyLlama-shaped small model on CPU,
    a test-sized one with --tiny."""
    if TINY:
        return tiny_config(), BATCH or 2, 64
    if CUDA:
        return PRESETS["tinyllama-1.1b"], BATCH or 1, 2048
    cfg = Config(vocab_size=32000, n_layer=8, n_head=8, n_kv_head=1, n_embd=256, intermediate_size=704, block_size=256)
    return cfg, BATCH or 4, 256


def tiny_config():
    return Config(vocab_size=512, n_layer=4, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=160, block_size=128)


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
    FUSED.update(dict.fromkeys(FUSED, kind != "unfused"))  # "unfused": every fused/ op off, full-logits loss
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
    cmd = [sys.executable, os.path.join(ROOT, "bench.py"), "--_memory", kind] + ["--tiny"] * TINY
    cmd += ["--batch", str(BATCH)] if BATCH else []
    # allocations over 1 MiB get their own mapping, returned to the OS when freed: the resident set then
    # follows live tensors instead of what the allocator keeps from the warm-up step
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(2**20))
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return int(out.stdout.strip().splitlines()[-1])


def cuda_peak(fn):
    """Peak CUDA bytes allocated while fn() runs, above what was allocated before it."""
    sync()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync()
    return torch.cuda.max_memory_allocated() - base



def hf_llama(cfg):
    from transformers import LlamaConfig, LlamaForCausalLM
    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.intermediate_size,
                         num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                         num_key_value_heads=cfg.n_kv_head, max_position_embeddings=cfg.block_size,
                         rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=False)
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(hf_cfg).to(DEVICE).train()



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



def fixed_length_decoders():
    """generate and generate_speculative decoding every requested token (no stop at eos): timed runs do equal
    work, and compare token for token with transformers' generate run with eos off."""
    from generate import generate
    from speculate import generate_speculative
    return functools.partial(generate, stop_at_eos=False), functools.partial(generate_speculative, stop_at_eos=False)
