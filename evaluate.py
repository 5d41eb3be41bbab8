"""
Validation loss vs fraction of layers run, for one trained model and the skipping methods built on it:

    python evaluate.py --ckpt out-layerskip --unified out-unified --dynamic out-dynamic --distill out-distill

On instruction data (loss on response tokens). Every method is a skip mask on the response tokens
(prompts run every layer), except early exit, which runs layers [0, E). The fraction is the mean
share of the L layers that response tokens run. Rows: full depth; early exit; the unified 2x and 3x
plans applied to --ckpt as it is; LayerSkip-style dropout at inference (depth-rising rates, per
sequence: what a dropout-trained model learned to survive); and, when given, a checkpoint fine-tuned
for its unified plan (train.py --skip_speedup), learned controllers (dynamic.py), and a
skip-distilled student (distill.py) against --ckpt with the same layers skipped.
"""
import json
import math
import os
from dataclasses import dataclass

import torch

from configurator import at_least, check_values, configure, run_main
from dynamic import controlled_forward, load_controllers
from layerskip import dropout_rates, layer_dropout_mask
from model import Transformer
from train import TrainConfig, load_data
from unified import response_skip_mask, response_tokens, skipped_layers


@dataclass
class EvalConfig:
    ckpt: str = "out-layerskip"
    data_dir: str = "data/stdlib_instruct"
    unified: str = ""                # a checkpoint trained with --skip_speedup (its plan is in its config)
    dynamic: str = ""                # backbone + controllers from dynamic.py
    distill: str = ""                # a student from distill.py (its distilled layers from metrics.jsonl)
    eval_batches: int = 20
    micro_batch: int = 8
    block_size: int = 256
    seed: int = 1337


@torch.no_grad()
def masked_eval(model, val_batch, batches, choose_mask):
    """(mean loss, fraction of layers run by response tokens); choose_mask(i, y, response) -> [B, T, L] or [B, L]."""
    loss, run = 0.0, 0.0
    for i in range(batches):
        x, y = val_batch(i)
        response = response_tokens(y)
        mask = choose_mask(i, y, response)
        if mask.dim() == 2:  # per sequence: its response tokens skip
            mask = response[..., None] & mask[:, None]
        loss += model(x, y, skip_mask=mask)[0].item() / batches
        run += (1 - mask[response].float().mean().item()) / batches
    return loss, run


@torch.no_grad()
def early_exit_eval(model, val_batch, batches, exit_layer):
    return sum(model(*val_batch(i), exits={exit_layer: 1.0})[0].item() for i in range(batches)) / batches


def load(path):
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint directory {path!r}")
    return Transformer.from_pretrained(path)


EVAL_RULES = {k: at_least(1) for k in ("eval_batches", "micro_batch", "block_size")}


def main():
    cfg = check_values(configure(EvalConfig()), EVAL_RULES)
    data_cfg = TrainConfig(dataset="instruct", data_dir=cfg.data_dir, init_from=cfg.ckpt,
                           micro_batch=cfg.micro_batch, block_size=cfg.block_size, seed=cfg.seed)
    _, val_batch, _, _, _ = load_data(data_cfg)
    n = cfg.eval_batches
    model = load(cfg.ckpt)
    L = model.n_layer
    rows = [("full depth", 1.0, masked_eval(model, val_batch, n, lambda i, y, r: torch.zeros(len(y), L, dtype=torch.bool))[0])]
    for E in sorted({L // 4, L // 2, 3 * L // 4}):
        rows.append((f"early exit at layer {E}", E / L, early_exit_eval(model, val_batch, n, E)))
    for speedup in (s for s in (2, 3) if L // s >= 2):  # a plan keeps at least the first and the last layer
        plan = skipped_layers(L, speedup)
        loss, run = masked_eval(model, val_batch, n, lambda i, y, r: response_skip_mask(y, plan, L))
        rows.append((f"unified {speedup}x plan, as trained", run, loss))
    for p_max in (0.3, 0.6):
        rates = dropout_rates(L, 0, 1, p_max)
        loss, run = masked_eval(model, val_batch, n, lambda i, y, r: layer_dropout_mask(rates, len(y), cfg.seed + i))
        rows.append((f"LayerSkip dropout p_max {p_max} per sequence", run, loss))
    if cfg.unified:
        tuned = load(cfg.unified)
        plan = tuned.cfg.skip_layers or []
        loss, run = masked_eval(tuned, val_batch, n, lambda i, y, r: response_skip_mask(y, plan, L))
        rows.append((f"unified plan {plan}, fine-tuned", run, loss))
    if cfg.dynamic:
        backbone = load(cfg.dynamic)
        ctrl = load_controllers(cfg.dynamic, backbone)
        results = [controlled_forward(backbone, ctrl, *val_batch(i)) for i in range(n)]
        kind = "per sequence" if ctrl.per_sequence else "per token"
        rows.append((f"learned controllers, {kind}", sum(r for _, r in results) / n,
                     sum(l.item() for l, _ in results) / n))
    if cfg.distill:
        student = load(cfg.distill)
        done = [json.loads(line) for line in open(os.path.join(cfg.distill, "metrics.jsonl"))][-1]["skipped"]
        for name, m in ((f"skip-distilled, skipping {sorted(done)}", student), (f"--ckpt, skipping {sorted(done)}", model)):
            loss, run = masked_eval(m, val_batch, n, lambda i, y, r: response_skip_mask(y, done, L))
            rows.append((name, run, loss))
    print(f"{cfg.ckpt}: {L} layers; {n} validation batches of {cfg.micro_batch} x {cfg.block_size} from {cfg.data_dir}")
    print(f"| method | layers run | val loss | perplexity |\n|---|---|---|---|")
    for name, run, loss in sorted(rows, key=lambda r: -r[1]):
        print(f"| {name} | {run:.1%} | {loss:.4f} | {math.exp(loss):.2f} |")


if __name__ == "__main__":
    run_main(main)
