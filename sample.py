"""
Generate from a trained model:  python sample.py [--out_dir out] [--prompt "def "] [--exit_layer 12]

--exit_layer E decodes with the first E layers and the shared exit. --skip_layers 3,5,7 skips those
layers (0-based) for generated tokens; without it, a plan stored in the checkpoint's config applies
(--skip_layers none turns it off). --speculative drafts with [0, E) and verifies with the rest;
--draft_skip_layers 3,5,7 (or auto: chosen from the prompts) drafts with every layer but those instead,
for models not trained with LayerSkip; --exit_layer auto chooses E and d every round from the acceptance
measured while generating; --draft_threshold p stops a round's drafting when the draft's top
probability falls below p (--num_speculations is then the cap).
--prompts FILE (a JSON list of strings) decodes several prompts as one batch. temperature 0 is greedy.
--sweep times self-speculation over a grid of (exit_layer, num_speculations), one prompt at a time,
prints a table, writes it as CSV and names the fastest setting. --compile runs decode steps as
torch.compile'd graphs, on CUDA recorded as CUDA graphs (prompts of one length).
"""
import csv
import json
import os
import time
from dataclasses import dataclass

import torch

from configurator import configure, run_main
from generate import generate, generate_speculative, pad_prompts
from model import Transformer, atomic_write, layer_mask
from tokenizer import load_tokenizer


@dataclass
class SampleConfig:
    out_dir: str = "out"
    prompt: str | None = None        # None: start from the bos token; "FILE:path" reads a file
    prompts: str | None = None       # a JSON file holding a list of prompt strings, decoded as one batch
    num_samples: int = 1             # samples per prompt
    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int | None = 200
    top_p: float | None = None
    exit_layer: int | str | None = None  # with --speculative also "auto": E and d chosen while generating
    speculative: bool = False        # self-speculative decoding: draft with [0, exit_layer), verify with the rest
    num_speculations: int = 3        # d: the most tokens drafted per round
    draft_threshold: float | None = None  # a row stops drafting for the round when its draft's top probability < this
    draft_skip_layers: str = ""      # draft with every layer but these ("3,5,7"; "auto": chosen from the prompts)
    skip_layers: str = ""            # comma-separated 0-based layers to skip while generating; "none": no plan
    sweep: bool = False              # time self-speculation over sweep_exit_layers x sweep_num_speculations
    sweep_exit_layers: str = ""      # default: up to 6 depths spread over [1, L)
    sweep_num_speculations: str = "1,2,4,6,8"
    sweep_csv: str = "sweep.csv"
    compile: bool = False            # decode steps as torch.compile'd graphs: 2-4x faster steps (the first call compiles)
    seed: int = 1337
    device: str = "auto"


def parse_layers(spec, name, low, high):
    """'3,5,7' -> [3, 5, 7], each checked to lie in [low, high]."""
    try:
        layers = [int(s) for s in str(spec).split(",")]
    except ValueError:
        raise ValueError(f"{name} {spec!r}: expected comma-separated integers") from None
    if not all(low <= l <= high for l in layers):
        raise ValueError(f"{name} {spec!r}: values must lie in [{low}, {high}]")
    return layers


def parse_skip_layers(spec, n_layer):
    """--skip_layers -> mask [L], or None for the checkpoint's own plan; 'none' -> no skipping."""
    if not spec:
        return None
    return layer_mask([] if spec == "none" else parse_layers(spec, "skip_layers", 0, n_layer - 1), n_layer)


def read_prompts(cfg):
    """The prompt strings of this run: --prompts FILE, or --prompt (FILE:path reads one), or [None] for bos only."""
    if cfg.prompts is not None:
        try:
            prompts = json.load(open(cfg.prompts, encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"prompts file {cfg.prompts!r}: {e}") from None
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
            raise ValueError(f"prompts file {cfg.prompts!r} must hold a JSON list of non-empty strings")
        return prompts
    prompt = cfg.prompt
    if prompt is not None and prompt.startswith("FILE:"):
        prompt = open(prompt[5:], encoding="utf-8").read()
    if prompt == "":
        raise ValueError("the prompt is empty; leave --prompt out to start from the bos token")
    return [prompt]


def sweep(cfg, model, prompts, sampling):
    """Time plain decoding and self-speculation for every (E, d), averaged over prompts run one at a time."""
    L = model.n_layer
    spread = sorted({max(1, round(i * L / 6)) for i in range(1, 6)} | {1})
    exits = parse_layers(cfg.sweep_exit_layers, "sweep_exit_layers", 1, L - 1) if cfg.sweep_exit_layers else spread
    ds = parse_layers(cfg.sweep_num_speculations, "sweep_num_speculations", 1, cfg.max_new_tokens)
    n = cfg.max_new_tokens

    def timed(fn):
        fn(prompts[0])  # warm-up, untimed: with --compile a new exit layer compiles its graphs here
        t0 = time.perf_counter()
        stats = [fn(p)[1] for p in prompts]
        dt = (time.perf_counter() - t0) / len(prompts)
        rate = sum(s["accepted"] for s in stats) / max(sum(s["drafted"] for s in stats), 1)
        return rate, dt / n, n / dt

    _, base_tpt, _ = timed(lambda p: (generate(model, p, n, **sampling), {"accepted": 0, "drafted": 0}))
    rows = [(E, d, *timed(lambda p: generate_speculative(model, p, n, E, d, **sampling)))
            for E in exits for d in ds]
    header = ["exit_layer", "num_speculations", "acceptance_rate", "time_per_token", "tokens_per_second"]
    print(f"full depth: {base_tpt * 1e3:.2f} ms/token")
    print(" ".join(f"{h:>17}" for h in header) + "           speedup")
    for E, d, rate, tpt, tps in rows:
        print(f"{E:>17} {d:>17} {rate:>17.3f} {tpt * 1e3:>14.2f} ms {tps:>17.1f} {base_tpt / tpt:>17.2f}x")

    def write(path):
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows([E, d, f"{rate:.4f}", f"{tpt:.6f}", f"{tps:.2f}"] for E, d, rate, tpt, tps in rows)
    atomic_write(cfg.sweep_csv, write)
    E, d, rate, tpt, _ = min(rows, key=lambda r: r[3])
    print(f"fastest: --exit_layer {E} --num_speculations {d}: {base_tpt / tpt:.2f}x over full depth, "
          f"acceptance {rate:.1%} (table in {cfg.sweep_csv})")


def main():
    cfg = configure(SampleConfig())
    if isinstance(cfg.exit_layer, str) and not (cfg.exit_layer == "auto" and cfg.speculative):
        raise ValueError(f"exit_layer must be an integer (or auto, with --speculative), got {cfg.exit_layer!r}")
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if not os.path.isdir(cfg.out_dir):
        raise FileNotFoundError(f"no checkpoint directory {cfg.out_dir!r}: train one first (python train.py)")
    model = Transformer.from_pretrained(cfg.out_dir, device=device)
    if cfg.exit_layer not in (None, "auto"):
        model.check_exit_layer(cfg.exit_layer)
    skip_mask = parse_skip_layers(cfg.skip_layers, model.n_layer)
    tok = load_tokenizer(cfg.out_dir, model.cfg.bos_id, model.cfg.eos_id)
    model.check_vocabulary(tok.vocab_size(), f"the tokenizer in {cfg.out_dir!r}")
    texts = read_prompts(cfg)
    ids = [[tok.bos_id()] + (tok.encode(t) if t else []) for t in texts for _ in range(cfg.num_samples)]
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    sampling = dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, generator=generator,
                    compile=cfg.compile)
    if cfg.sweep:
        return sweep(cfg, model, [torch.tensor([p], device=device) for p in ids], sampling)
    idx, lens = pad_prompts(ids)
    idx = idx.to(device)
    t0 = time.perf_counter()
    if cfg.speculative:  # generate_speculative checks the draft and its values itself
        plan = cfg.draft_skip_layers
        if plan and plan != "auto":
            plan = parse_layers(plan, "draft_skip_layers", 0, model.n_layer - 1)
        out, stats = generate_speculative(model, idx, cfg.max_new_tokens, cfg.exit_layer, cfg.num_speculations,
                                          draft_skip_layers=plan or None, draft_threshold=cfg.draft_threshold,
                                          prompt_lens=lens, **sampling)
        draft = (f"{cfg.exit_layer} layers" if isinstance(cfg.exit_layer, int) else
                 f"exit layers (rounds) {stats['exit_layers']}" if cfg.exit_layer else
                 f"skipping layers {stats['draft_skip_layers']}")
        header = (f"self-speculative: draft {draft}, d={cfg.num_speculations}"
                  f"{f', threshold {cfg.draft_threshold}' if cfg.draft_threshold is not None else ''}, "
                  f"acceptance {stats['acceptance_rate']:.1%}")
    else:
        out = generate(model, idx, cfg.max_new_tokens, prompt_lens=lens, exit_layer=cfg.exit_layer,
                       skip_mask=skip_mask, **sampling)
        plan = model.cfg.skip_layers if skip_mask is None else skip_mask.nonzero()[:, 0].tolist()
        header = f"exit layer {cfg.exit_layer}" if cfg.exit_layer else f"all {model.n_layer} layers"
        header += f", skipping layers {plan}" if plan else ""
    dt = time.perf_counter() - t0
    new_tokens = cfg.max_new_tokens * len(ids)
    for row, n in zip(out.tolist(), lens.tolist()):
        print(f"---------- {header}, {dt / cfg.max_new_tokens * 1e3:.1f} ms/step, {new_tokens / dt:.1f} tokens/s")
        print(tok.decode(row[1:n + cfg.max_new_tokens]))


if __name__ == "__main__":
    run_main(main)
