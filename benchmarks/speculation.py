"""
python bench.py --mode speculation: does self-speculation pay, and how close does it come to what its
acceptance allows? Batch 1, greedy, prompts one at a time; every speedup is against our own full-depth decoding
of the same prompts in the same process, and every speculative output is checked identical to it.

For each setting: measured speedup, acceptance, and the ideal speedup that the measured rounds (draft steps,
verifications) and the measured cost of one draft step and one verification predict (docs/equations.md section 5:
tokens per round over the round's cost); fraction = measured / ideal; "in draft/verify": the share of the time
inside rounds' draft steps and verifications as the loop timed them (the rest: bookkeeping, and for exit auto
reading other exits). Each prompt is timed alone, beside its full-depth decoding (the two called in turns, so
that a drift of this machine's speed during the run cancels in their ratio), so the last line, the best static
setting of each prompt, says what choosing a setting per context could gain.
Models: (a) a LayerSkip-trained checkpoint on a mixed code prompt set, (b) a converted random transformers
Llama of TinyLlama-1.1B's shape with later layers' output projections scaled down (against transformers'
assistant_early_exit on the same weights), (c) a checkpoint trained without LayerSkip, with skip-plan drafts.
"""
import os
import sysconfig
import time
from dataclasses import replace

import torch

from benchmarks import common
from benchmarks.common import fixed_length_decoders
from benchmarks.decode import converted_pair
from drafts import draft_plan
from generate import compiled, decode_cache, layer_runs, next_logits, prefill
from model import PRESETS, Transformer
from speculate import draft_step, verify_step
from tokenizer import load_tokenizer

generate, generate_speculative = fixed_length_decoders()  # every run decodes all its tokens: equal work

# (file, character offset): repetitive tables and boilerplate (easy to draft) to prose and dense logic (hard)
PROMPT_FILES = [("token.py", 200), ("keyword.py", 300), ("argparse.py", 6000), ("json/decoder.py", 1200),
                ("heapq.py", 9000), ("this.py", 0), ("textwrap.py", 4000), ("colorsys.py", 2000)]


def code_prompts(tok, device, n_tokens=48):
    stdlib = sysconfig.get_paths()["stdlib"]
    texts = [open(os.path.join(stdlib, f), encoding="utf-8").read()[at:at + 800] for f, at in PROMPT_FILES]
    return [torch.tensor([[tok.bos_id()] + tok.encode(t)[:n_tokens]], device=device) for t in texts]


WARM_UP = True  # a first, untimed call (compiled steps compile in it)


def seconds_in_turns(calls, repeats):
    """Shortest of `repeats` timed calls of each function in `calls` (name -> function), the functions called in
    turns after one warm-up call of each when WARM_UP -> ({name: seconds}, {name: result of its shortest call}).
    Timed side by side, their ratios hold where this machine's speed drifts within a run (a setting timed minutes
    after the full-depth baseline moved by up to 0.3x between runs)."""
    best, results = dict.fromkeys(calls, float("inf")), dict.fromkeys(calls)
    if WARM_UP:
        for call in calls.values():
            call()
    for _ in range(repeats):
        for name, call in calls.items():
            t = time.perf_counter()
            out = call()
            t = time.perf_counter() - t
            if t < best[name]:
                best[name], results[name] = t, out
    return best, results


def seconds(fn, repeats):
    """seconds_in_turns of fn alone -> (seconds of its shortest call, that call's result)."""
    best, results = seconds_in_turns({"fn": fn}, repeats)
    return best["fn"], results["fn"]


def paired_seconds(baseline, fn, repeats):
    """seconds_in_turns of baseline and fn -> (seconds of baseline, seconds of fn, fn's result)."""
    best, results = seconds_in_turns({"baseline": baseline, "fn": fn}, repeats)
    return best["baseline"], best["fn"], results["fn"]


@torch.inference_mode()
def step_costs(model, prompt, plan, d, compile, repeats=20):
    """Seconds of one full-depth decode step, one draft step and one verification of d+1 positions (the last
    draft through layers [0, f), all through [f, L) + head), batch 1 at the prompt's end, through the graphs
    decoding uses; the three timed in turns (seconds_in_turns), so that their ratios, which set the ideal, hold
    where the machine's speed drifts (timed one after the other instead, the ideal of one setting moved by up to
    0.5x between runs)."""
    L, T = model.n_layer, prompt.shape[1]
    cache = decode_cache(model, prompt, T + d + 1, compile)
    prefill(model, prompt, torch.tensor([T]), L, cache)
    f = int(plan.nonzero()[0])
    runs = tuple(r for r in layer_runs(plan[None], L)[0] if r[0] > f)
    full, draft, verify = [compiled(fn, prompt.device) if compile else fn
                           for fn in (next_logits, draft_step, verify_step)]
    token = prompt[:, -1:]
    states = torch.randn(1, d, model.cfg.n_embd, device=prompt.device,
                         dtype=next(model.parameters()).dtype)  # as a hidden state
    calls = {"full": lambda: full(model, token, T, ((0, L),), cache),
             "draft": lambda: draft(model, token, T, f, runs, cache),
             "verify": lambda: verify(model, states, T, f, L, cache, token)}
    return seconds_in_turns(calls, repeats)[0]


def per_prompt(fn, prompts, repeats):
    """seconds() of fn(prompt) for each prompt -> ([seconds per prompt], [result per prompt])."""
    return tuple(map(list, zip(*(seconds(lambda: fn(p), repeats) for p in prompts))))


def run_setting(model, prompts, n, full_out, repeats, compile, costs, label, **draft):
    """Time one speculative setting over the prompts, each prompt beside its full-depth decoding (paired_seconds);
    print speedup, acceptance, ideal speedup, fraction -> (speedup, [speedup per prompt])."""
    paired = [paired_seconds(lambda: generate(model, p, n, temperature=0, compile=compile),
                             lambda: generate_speculative(model, p, n, compile=compile, **draft), repeats)
              for p in prompts]
    full_times, times, results = map(list, zip(*paired))
    same = all(torch.equal(o, f) for (o, _), f in zip(results, full_out))
    t = sum(times)
    ideal_time = full_depth_time = 0.0
    for _, s in results:  # the plan (auto: chosen per prompt; exit auto: its most used exit) sets the step costs
        plain = s.get("exit_layers", {}).get(0, 0)  # exit auto's rounds without drafts: full-depth steps
        used = {e: r for e, r in s.get("exit_layers", {}).items() if e} or {1: 0}
        skipped = s.get("draft_skip_layers") or list(range(max(used, key=used.get), model.n_layer))
        c = costs(skipped, round(s["drafted"] / max(s["rounds"] - plain, 1)))  # batch 1: a round verifies drafts + 1
        ideal_time += s["draft_steps"] * c["draft"] + (s["rounds"] - plain) * c["verify"] + plain * c["full"]
        full_depth_time += n * c["full"]
    total = {k: sum(s[k] for _, s in results) for k in ("drafted", "accepted", "rounds", "draft_seconds",
                                                        "verify_seconds", "round_seconds")}
    ideal, speedup = full_depth_time / ideal_time, sum(full_times) / t
    in_calls = sum(total[k] for k in ("draft_seconds", "verify_seconds", "round_seconds")) / t  # the rest: host work
    plans = sorted({str(s.get("draft_skip_layers", s.get("exit_layers"))) for _, s in results})
    shown = "draft_skip_layers" in draft or draft.get("exit_layer") == "auto"
    print(f"  {label:42s} {speedup:5.2f}x  acceptance {total['accepted'] / max(total['drafted'], 1):6.1%}  "
          f"tokens/round {n * len(prompts) / total['rounds']:4.2f}  ideal {ideal:5.2f}x  fraction "
          f"{speedup / ideal:4.0%}  in draft/verify {in_calls:4.0%}  identical {same}"
          + (f"  plans {' '.join(plans)}" if shown else ""))
    return speedup, [f / s for f, s in zip(full_times, times)]


def bench_model(model, prompts, n, repeats, compile, settings):
    """Full depth, then every setting in `settings` (label -> generate_speculative keywords, or a function of
    the results so far returning them)."""
    generate(model, prompts[0], 2, temperature=0, compile=compile)  # first-call costs (eager too) out of the timings
    full_times, full_out = per_prompt(lambda p: generate(model, p, n, temperature=0, compile=compile), prompts, repeats)
    t_full = sum(full_times)
    print(f"  full depth: {t_full / (n * len(prompts)) * 1e3:.2f} ms/token")
    cost_cache = {}

    def costs(skipped, d):
        if (tuple(skipped), d) not in cost_cache:
            plan = draft_plan(model, None, skipped)
            cost_cache[tuple(skipped), d] = step_costs(model, prompts[0], plan, d, compile)
        return cost_cache[tuple(skipped), d]

    results = {}
    for label, draft in settings:
        if callable(draft):
            draft = draft(results)
            label = label.format(**draft)
        speedup, speedups = run_setting(model, prompts, n, full_out, repeats, compile, costs, label, **draft)
        results[label] = (speedup, draft, speedups)
    static = [speedups for _, draft, speedups in results.values() if "draft_threshold" not in draft
              and "auto" not in (draft.get("exit_layer"), draft.get("draft_skip_layers"))]
    if len(prompts) > 1 and static:  # what choosing the static setting per prompt would give: dynamic's ceiling?
        best = [max(s) for s in zip(*static)]  # each prompt's best speedup, over its full depth's time above
        speedup = t_full / sum(t / b for t, b in zip(full_times, best))
        print(f"  {'best static setting of each prompt':42s} {speedup:5.2f}x  (from the speedups above)")
    return t_full, full_out


def best_static(results):
    return max((r for r in results.values() if "draft_threshold" not in r[1]), key=lambda r: r[0])[1]


def layerskip_settings(L):
    exits = sorted({min(2, L - 1), L // 4, L // 2, 3 * L // 4} - {0})  # exit 2: the cheapest exit auto drafts with
    static = [(f"E={E} d={d}", dict(exit_layer=E, num_speculations=d)) for E in exits for d in (1, 2, 4, 6)]
    dynamic = [("threshold {draft_threshold} at E={exit_layer}, cap {num_speculations}",
                lambda r, p=p: dict(best_static(r), num_speculations=8, draft_threshold=p)) for p in (0.5, 0.8)]
    auto = [("exit layer auto, cap 8", dict(exit_layer="auto", num_speculations=8))]
    return static + dynamic + auto


def plain_settings(L):
    return [(f"auto plan, d={d}", dict(draft_skip_layers="auto", num_speculations=d)) for d in (2, 4)] + [
        (f"plan skipping every other layer of the second half, d={d}",
         dict(draft_skip_layers=list(range(L // 2, L, 2)), num_speculations=d)) for d in (2, 4)]


def bench_tinyllama(n, repeats, compile, E=4, scale=0.05, d=4):
    """Model (b): ours against transformers on the same weights, then our settings (eager: no warm-up calls,
    each fp32 1.1B decode being tens of seconds on a shared CPU). --tiny: the test-sized model instead."""
    cfg = common.tiny_config() if common.TINY else replace(PRESETS["tinyllama-1.1b"], block_size=512)
    E = min(E, cfg.n_layer - 1)
    hf, ours = converted_pair(cfg, E, scale)
    prompt = torch.randint(cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0)).to(common.DEVICE)
    print(f"\n(b) random Llama of {cfg.n_layer} x {cfg.n_embd} (TinyLlama-1.1B's shape unless --tiny), fp32, layers "
          f">= {E} output projections x{scale}; prompt 16, {n} new tokens")

    def hf_generate(threshold=None, **kw):
        hf.generation_config.assistant_confidence_threshold = threshold  # read by the early-exit assistant
        with torch.no_grad():
            return hf.generate(prompt, max_new_tokens=n, do_sample=False, **kw)

    # transformers first, then its model freed: beside ours, 24 GB is tight
    t_hf, hf_out = seconds(hf_generate, repeats)
    t_assistant = {threshold: seconds(lambda: hf_generate(threshold, assistant_early_exit=E, num_assistant_tokens=d,
                                                          num_assistant_tokens_schedule="constant"), repeats)
                   for threshold in (0.0, 0.4)}
    hf = None  # hf_generate is not called again
    settings = [(f"E={E} d={dd}", dict(exit_layer=E, num_speculations=dd)) for dd in ((2, 4, 6) if compile else (d,))] + [
        ("exit layer auto, cap 8", dict(exit_layer="auto", num_speculations=8))]
    t_ours, (ours_out,) = bench_model(ours, [prompt], n, repeats, compile, settings)
    print(f"  transformers generate: {t_hf / n * 1e3:.0f} ms/token, our full depth {t_hf / t_ours:.2f}x faster; "
          f"identical {torch.equal(hf_out, ours_out)}")
    for threshold, (t, out) in t_assistant.items():
        print(f"  transformers assistant_early_exit={E} d={d} confidence threshold {threshold}: {t_ours / t:.2f}x "
              f"over our full depth; identical {torch.equal(out, ours_out)}")


def bench_speculation(ls_ckpt, plain_ckpt, n, repeats, compile, models):
    global WARM_UP
    compile = compile and not common.TINY  # --tiny: a smoke run, where compiling would cost more than the rest
    WARM_UP = compile
    print(f"{torch.get_num_threads()} threads; greedy, batch 1; {'--compile' if compile else 'eager'}; best of "
          f"{repeats}, each setting's calls in turns with full-depth decoding of the same prompt; speedups over our "
          f"own full-depth decoding in this process")
    for key, ckpt, title, settings in (("a", ls_ckpt, "LayerSkip-trained", layerskip_settings),
                                       ("c", plain_ckpt, "trained without LayerSkip", plain_settings)):
        if key not in models:
            continue
        if not os.path.isdir(ckpt):
            print(f"\n({key}) no checkpoint {ckpt!r}: skipped")
            continue
        model = Transformer.from_pretrained(ckpt)
        prompts = code_prompts(load_tokenizer(ckpt, model.cfg.bos_id, model.cfg.eos_id), "cpu")
        print(f"\n({key}) {title} {ckpt!r}: {model.n_layer} layers x {model.cfg.n_embd}; {len(prompts)} mixed stdlib "
              f"code prompts of 48 tokens, {n} new tokens each")
        bench_model(model, prompts, n, repeats, compile, settings(model.n_layer))
    if "b" in models:
        bench_tinyllama(8 if common.TINY else min(n, 32), repeats, compile)
