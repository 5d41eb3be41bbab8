"""python bench.py --mode decode [--ckpt DIR]: batch-1 decoding against transformers' generate on the same weights
(full depth, self-speculation vs assistant_early_exit, an exit layer, a unified skip plan; eager and compiled),
and self-speculation on a trained checkpoint."""
import os

import torch

from benchmarks.common import CUDA, DEVICE, best_time, device_name, fixed_length_decoders, hf_llama
from model import PRESETS, Config, Transformer, layer_mask


def decode_configs():
    """Two regimes of batch-1 CPU decoding: a model whose weights stay in cache (per-token cost is the
    implementation's overhead) and a TinyLlama-shaped one whose fp32 weights (67 MB) stream from memory
    every token (per-token cost is memory bandwidth, the same for any implementation)."""
    return {"stdlib-16l shape (4M params)": PRESETS["stdlib-16l"],
            "TinyLlama-shaped (17M params)": Config(vocab_size=32000, n_layer=12, n_head=8, n_kv_head=2, n_embd=256,
                                                    intermediate_size=704, block_size=512)}



def decode_flops(cfg, n_layers, T):
    """Forward FLOPs per decoded token: 2 x (layer matmul params + attention over T keys) per layer + 2 x C x V."""
    hd = cfg.head_dim
    layer = cfg.n_embd * (cfg.n_head + 2 * cfg.n_kv_head) * hd + cfg.n_head * hd * cfg.n_embd \
        + 3 * cfg.n_embd * cfg.intermediate_size
    return n_layers * 2 * (layer + 2 * cfg.n_head * hd * T) + 2 * cfg.n_embd * cfg.vocab_size


def converted_pair(cfg, E, scale=0.02):
    """A random transformers Llama of cfg's shape and the same weights converted to nanoskip. Layers from E on
    get their output projections scaled by `scale`, so that (like a LayerSkip-trained model) the exit at E mostly
    agrees with the last layer and speculation has drafts to accept (at the rate a run measures and prints)."""
    import tempfile
    from checkpoints_convert import from_hf
    hf = hf_llama(cfg).eval()
    with torch.no_grad():
        for layer in hf.model.layers[E:]:
            layer.self_attn.o_proj.weight.mul_(scale)
            layer.mlp.down_proj.weight.mul_(scale)
    hf.generation_config.eos_token_id = None  # random weights: never stop early, on either side
    hf.generation_config.pad_token_id = 0
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(os.path.join(tmp, "hf"))
        from_hf(os.path.join(tmp, "hf"), os.path.join(tmp, "ours"))
        return hf, Transformer.from_pretrained(os.path.join(tmp, "ours"), device=DEVICE)


def bench_decode(repeats, ckpt, new_tokens=128, d=4):
    generate, generate_speculative = fixed_length_decoders()
    from unified import unified_plan
    n = new_tokens
    print(f"device {device_name()}, {torch.get_num_threads()} "
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
    generate, generate_speculative = fixed_length_decoders()
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
