"""
Dynamic layer selection (Glavas et al. 2024, arXiv 2410.20022): learned controllers choose, from the
hidden state entering a layer, whether response tokens run it; a budget loss sets how many do.

    python dynamic.py config/dynamic_cpu.py     # learn controllers on the stdlib instruction set

The other modes need no training: a static list (`skip_layers`) and stochastic skipping (a Bernoulli
skip mask per layer) are plain skip masks. Controllers only choose masks too: at evaluation their
decisions become the [B, T, L] skip mask of model.run_layers, layer by layer (the decision for layer l
needs the hidden state entering it), so skipped work is really not computed. In training the hard
decisions must pass a gradient to the controllers (straight-through hard Gumbel-softmax, its noise
annealed to zero so training ends on the argmax decisions evaluation uses), so every layer is
computed and blended, x + g (block(x) - x) with g in {0, 1}: no savings while learning, by necessity.
The prompt always runs every layer; the first and last layers always run.
"""
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import savedir
from configurator import configure, run_main
from data.instruct import IGNORE
from model import Transformer
from rules import above, at_least, check_values
from train import (TRAIN_RULES, TrainConfig, check_val_loss, copy_tokenizer, kept, load_data, lr_at,
                   nonfinite_tensor, run_inputs, val_loss_limit)
from unified import response_tokens


class Controllers(nn.Module):
    """One Linear(C, 2) per middle layer l = 1..L-2 on the detached hidden state entering it: logits of
    (run, skip). Per sequence, the decision comes from the mean hidden state of the row's prompt."""

    def __init__(self, n_layer, n_embd, per_sequence):
        super().__init__()
        self.per_sequence = per_sequence
        self.heads = nn.ModuleList(nn.Linear(n_embd, 2) for _ in range(n_layer - 2))
        for head in self.heads:  # start by running every layer: a clear preference for "run"
            nn.init.zeros_(head.weight)
            head.bias.data = torch.tensor([2.0, 0.0])

    def logits(self, l, x, response):
        """x [B, T, C] entering layer l, response [B, T] bool -> logits [B, T, 2]."""
        x = x.detach()
        if self.per_sequence:  # mean over the prompt's tokens: the same decision for every response token
            prompt = (~response).to(x.dtype)[..., None]
            x = ((x * prompt).sum(1) / prompt.sum(1)).unsqueeze(1).expand_as(x)
        return self.heads[l - 1](x)


def hard_gate(logits, tau, noise):
    """Hard Gumbel-softmax with the Gumbel noise scaled by `noise`: forward 1 (run) or 0 (skip), backward
    the gradient of the soft sample (straight-through). Annealing noise 1 -> 0 over training ends on the
    decisions evaluation takes (argmax), so a budget met in training is met at evaluation."""
    g = -torch.empty_like(logits).exponential_().log()  # Gumbel(0, 1)
    soft = torch.softmax((logits + noise * g) / tau, dim=-1)
    hard = F.one_hot(soft.argmax(-1), 2).to(soft.dtype)
    return (hard - soft.detach() + soft)[..., 0]


def gated_forward(model, ctrl, idx, targets, tau=1.0, noise=1.0):
    """Training: (response-token loss, fraction of layers run by response tokens, differentiable)."""
    L = model.n_layer
    response = response_tokens(targets.cpu()).to(idx.device)
    x = model.embed(idx)
    attn_mask = model.attention_mask(idx.shape[1], 0, idx.device, x.dtype)
    runs = []
    for l in range(L):
        h = model.run_layers(x, l, l + 1, attn_mask=attn_mask)
        if l in (0, L - 1):
            x = h
            continue
        gate = hard_gate(ctrl.logits(l, x, response), tau, noise)  # [B, T]: 1 = run
        gate = torch.where(response, gate, torch.ones_like(gate))
        x = x + gate[..., None] * (h - x)
        runs.append(gate)
    fraction = (torch.stack(runs).sum(0) + 2) / L                      # [B, T] layers run per token
    fraction = fraction[response].mean()
    loss = F.cross_entropy(model.head(x).flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)
    return loss, fraction


@torch.no_grad()
def controlled_layers(model, ctrl, idx, response):
    """Evaluation: each layer's argmax decisions become column l of a [B, T, L] skip mask before the
    layer runs -> (final hidden state [B, T, C], skip mask). Prompt tokens never skip."""
    B, T = idx.shape
    L = model.n_layer
    skip_mask = torch.zeros(B, T, L, dtype=torch.bool)
    x = model.embed(idx)
    attn_mask = model.attention_mask(T, 0, idx.device, x.dtype)
    for l in range(L):
        if 0 < l < L - 1:
            skip_mask[..., l] = (ctrl.logits(l, x, response.to(idx.device)).argmax(-1) == 1).cpu() & response
        x = model.run_layers(x, l, l + 1, skip_mask, attn_mask=attn_mask)
    return x, skip_mask


@torch.no_grad()
def sequence_plan(model, ctrl, idx):
    """Per-sequence controllers in decoding: prompts idx [B, T] (no padding) -> skip mask [B, L] for the tokens
    generated after them. Layer l's decision comes from the mean hidden state of the prompt entering l, which
    runs every layer: the decision controlled_layers takes for a response following the same prompt."""
    if not ctrl.per_sequence:
        raise ValueError("per-token controllers decide per token and layer; only per-sequence ones give a skip plan")
    B, T = idx.shape
    response = torch.zeros(B, T + 1, dtype=torch.bool)
    response[:, T] = True  # one response token after the prompt: its mask is the plan
    _, skip_mask = controlled_layers(model, ctrl, torch.cat([idx, idx[:, -1:]], dim=1), response)
    return skip_mask[:, T]


def controlled_forward(model, ctrl, idx, targets):
    """(response-token loss, fraction of layers run by response tokens) with the controllers' decisions."""
    response = response_tokens(targets.cpu())
    x, skip_mask = controlled_layers(model, ctrl, idx, response)
    loss = F.cross_entropy(model.head(x).flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)
    return loss, 1 - skip_mask[response].float().mean().item()


def budget_loss(fraction, budget, alpha):
    """alpha x |fraction of layers run - budget|; budget 0 is the paper's alpha x fraction."""
    return alpha * (fraction - budget).abs()


def save_controllers(ctrl, out_dir, budget):
    """controllers.safetensors and controllers.json (per_sequence, budget) into out_dir."""
    state = {k: v.contiguous() for k, v in ctrl.state_dict().items()}
    save_file(state, os.path.join(out_dir, "controllers.safetensors"))
    with open(os.path.join(out_dir, "controllers.json"), "w") as f:
        f.write(json.dumps({"per_sequence": ctrl.per_sequence, "budget": budget}) + "\n")


def load_controllers(ckpt_dir, model):
    """The controllers dynamic.py saved in ckpt_dir for `model`, checked against ckpt_dir's manifest."""
    path = os.path.join(ckpt_dir, "controllers.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{ckpt_dir!r} has no controllers.json: train controllers with dynamic.py")
    savedir.verify(ckpt_dir, only=lambda rel: rel.startswith("controllers."), required=False)
    ctrl = Controllers(model.n_layer, model.cfg.n_embd, json.load(open(path))["per_sequence"])
    ctrl.load_state_dict(load_file(os.path.join(ckpt_dir, "controllers.safetensors")))
    weight = model.layers[0].attn.wo.weight  # the backbone's device and dtype
    return ctrl.to(device=weight.device, dtype=weight.dtype).eval()


@dataclass
class DynamicConfig(TrainConfig):
    init_from: str = "out-layerskip"  # the backbone
    out_dir: str = "out-dynamic"
    dataset: str = "instruct"
    data_dir: str = "data/stdlib_instruct"
    per_sequence: bool = False       # one decision per sequence (from its prompt), else per token
    budget: float = 0.5              # target fraction of layers run by response tokens
    alpha: float = 1.0               # weight of the budget loss
    tau: float = 1.0                 # Gumbel-softmax temperature
    freeze_backbone: bool = True     # warm-up: train the controllers only
    max_steps: int = 150
    lr: float = 1e-2
    min_lr: float = 1e-3
    warmup_steps: int = 10


@torch.no_grad()
def evaluate(model, ctrl, val_batch, batches):
    losses, fractions = zip(*(controlled_forward(model, ctrl, *val_batch(i)) for i in range(batches)))
    return sum(l.item() for l in losses) / batches, sum(fractions) / batches


DYNAMIC_RULES = {**TRAIN_RULES, "budget": (lambda v: 0 < v <= 1, "in (0, 1]"), "alpha": at_least(0),
                 "tau": above(0)}


def main():
    cfg = check_values(configure(DynamicConfig()), DYNAMIC_RULES)
    savedir.check_target(cfg.out_dir, savedir.CONTROLLERS, run_inputs(cfg))
    torch.manual_seed(cfg.seed)
    train_batch, val_batch, _, _, tok_file = load_data(cfg)
    model = Transformer.from_pretrained(cfg.init_from).train()
    model.requires_grad_(not cfg.freeze_backbone)
    ctrl = Controllers(model.n_layer, model.cfg.n_embd, cfg.per_sequence)
    params = list(ctrl.parameters()) + [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=0.0)
    out_lock = savedir.claim(cfg.out_dir, savedir.CONTROLLERS, run_inputs(cfg))  # noqa: F841 (held until exit)
    limit, best = val_loss_limit(cfg, model.cfg.vocab_size), math.inf
    print(f"controllers ({'per sequence' if cfg.per_sequence else 'per token'}), budget {cfg.budget:.0%} of "
          f"{model.n_layer} layers, backbone {'frozen' if cfg.freeze_backbone else 'trained'}")
    for step in range(cfg.max_steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        x, y = train_batch(step, 0)
        loss, fraction = gated_forward(model, ctrl, x, y, cfg.tau, noise=1 - step / cfg.max_steps)
        (loss + budget_loss(fraction, cfg.budget, cfg.alpha)).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % cfg.eval_interval == 0 or step == cfg.max_steps - 1:
            model.eval()
            val_loss, val_fraction = evaluate(model, ctrl, val_batch, cfg.eval_batches)
            model.train()
            print(f"step {step}: train loss {loss.item():.4f} running {fraction.item():.1%}; "
                  f"val loss {val_loss:.4f} running {val_fraction:.1%} of layers")
            check_val_loss({model.n_layer: val_loss}, model.n_layer, best, limit, step, cfg)
            best = min(best, val_loss)
    weights = {**model.state_dict(), **{f"controllers.{k}": v for k, v in ctrl.state_dict().items()}}
    bad = nonfinite_tensor(weights)
    if bad:
        raise ValueError(f"weight {bad} holds NaN or inf; stopping without saving: {kept(cfg)}")

    def write(nxt):
        model.save_pretrained(nxt)
        copy_tokenizer(tok_file, nxt)
        save_controllers(ctrl, nxt, cfg.budget)
    savedir.save(cfg.out_dir, savedir.CONTROLLERS, write)
    print(f"saved the backbone and controllers to {cfg.out_dir}/ (val: {val_fraction:.1%} of layers run, "
          f"budget {cfg.budget:.0%})")


if __name__ == "__main__":
    run_main(main)
