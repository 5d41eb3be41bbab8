"""
Generate from a trained model:  python sample.py [--out_dir out] [--prompt "def "] [--exit_layer 12]

--exit_layer E decodes with the first E layers and the shared exit. --skip_layers 3,5,7 skips
those layers (0-based) for generated tokens. temperature 0 is greedy.
"""
import os
import time
from dataclasses import dataclass

import torch

from configurator import configure, run_main
from generate import generate, generate_speculative
from model import Transformer
from tokenizer import load_tokenizer


@dataclass
class SampleConfig:
    out_dir: str = "out"
    prompt: str | None = None        # None: start from the bos token; "FILE:path" reads a file
    num_samples: int = 1
    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int | None = 200
    top_p: float | None = None
    exit_layer: int | None = None
    speculative: bool = False        # self-speculative decoding: draft with [0, exit_layer), verify with the rest
    num_speculations: int = 3        # d: tokens drafted per round
    skip_layers: str = ""            # comma-separated 0-based layers to skip while generating
    seed: int = 1337
    device: str = "auto"


def parse_skip_layers(spec, n_layer):
    if not spec:
        return None
    try:
        layers = [int(s) for s in str(spec).split(",")]
    except ValueError:
        raise ValueError(f"skip_layers {spec!r}: expected comma-separated layer indices") from None
    if not all(0 <= l < n_layer for l in layers):
        raise ValueError(f"skip_layers {spec!r}: layers must lie in [0, {n_layer - 1}]")
    skip = torch.zeros(n_layer, dtype=torch.bool)
    skip[layers] = True
    return skip


def main():
    cfg = configure(SampleConfig())
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if not os.path.isdir(cfg.out_dir):
        raise FileNotFoundError(f"no checkpoint directory {cfg.out_dir!r}: train one first (python train.py)")
    model = Transformer.from_pretrained(cfg.out_dir, device=device)
    if cfg.exit_layer is not None:
        model.check_exit_layer(cfg.exit_layer)
    skip_mask = parse_skip_layers(cfg.skip_layers, model.n_layer)
    tok = load_tokenizer(cfg.out_dir, model.cfg.bos_id, model.cfg.eos_id)
    prompt = cfg.prompt
    if prompt is not None and prompt.startswith("FILE:"):
        prompt = open(prompt[5:], encoding="utf-8").read()
    if prompt == "":
        raise ValueError("the prompt is empty; leave --prompt out to start from the bos token")
    ids = [tok.bos_id()] + (tok.encode(prompt) if prompt else [])
    idx = torch.tensor([ids] * cfg.num_samples, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    sampling = dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, generator=generator)
    if cfg.speculative:
        if cfg.exit_layer is None:
            raise ValueError("--speculative needs --exit_layer E (the draft depth)")
        if cfg.num_speculations < 1:
            raise ValueError(f"num_speculations must be at least 1, got {cfg.num_speculations}")
        for row in idx:
            t0 = time.perf_counter()
            out, stats = generate_speculative(model, row[None], cfg.max_new_tokens, cfg.exit_layer,
                                              cfg.num_speculations, **sampling)
            dt = time.perf_counter() - t0
            print(f"---------- self-speculative: draft {cfg.exit_layer} layers, d={cfg.num_speculations}, "
                  f"acceptance {stats['acceptance_rate']:.1%}, {dt / cfg.max_new_tokens * 1e3:.1f} ms/token, "
                  f"{cfg.max_new_tokens / dt:.1f} tokens/s")
            print(tok.decode(out[0, 1:].tolist()))
        return
    depth = f"exit layer {cfg.exit_layer}" if cfg.exit_layer else f"all {model.n_layer} layers"
    t0 = time.perf_counter()
    out = generate(model, idx, cfg.max_new_tokens, exit_layer=cfg.exit_layer, skip_mask=skip_mask, **sampling)
    dt = time.perf_counter() - t0
    for row in out.tolist():
        print(f"---------- {depth}, {dt / cfg.max_new_tokens * 1e3:.1f} ms/token")
        print(tok.decode(row[1:]))


if __name__ == "__main__":
    run_main(main)
