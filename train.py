"""
Train a skippable Llama:  python train.py [config/NAME.py] [--key=value ...]

Single process: fp32 on CPU, bf16 autocast (and per-block torch.compile) on CUDA. Every batch is a
function of (seed, step, micro step), so a resumed run (--init_from=resume) sees exactly the
data an uninterrupted run would; the resumable state is one file written atomically.
"""
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from tqdm import tqdm

from configurator import configure, run_main
from data.instruct import encode_records, epoch_indices, load_records, make_batch
from layerskip import dropout_rates, exit_weights, layer_dropout_mask
from model import PRESETS, Transformer, atomic_write
from tokenizer import load_tokenizer


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out"
    data_dir: str = "data/stdlib"
    dataset: str = "tokens"          # "tokens": data_dir/{train,val}.bin; "instruct": data_dir/{train,val}.jsonl (Alpaca)
    tokenizer: str = ""              # instruct data: tokenizer file or dir (default: init_from, else data/stdlib)
    init_from: str = "scratch"       # "scratch", "resume" (from out_dir), or a checkpoint directory
    # model: a preset from model.PRESETS, optionally reshaped
    model: str = "stdlib-16l"
    n_layer: int | None = None
    n_embd: int | None = None
    n_head: int | None = None
    n_kv_head: int | None = None
    intermediate_size: int | None = None
    # batches: micro_batch x block_size tokens, grad_accum micro batches per step
    micro_batch: int = 16
    block_size: int = 256
    grad_accum: int = 1
    # optimizer and schedule
    max_steps: int = 1500
    epochs: float | None = None      # if set: max_steps = epochs x train records / (micro_batch x grad_accum)
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 100
    lr_decay_steps: int | None = None  # default max_steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # evaluation and checkpoints
    eval_interval: int = 250         # also the checkpoint interval
    eval_batches: int = 20
    eval_exits: str = "all"          # "all" exit layers, "last", or a comma list like "4,8,16"
    # LayerSkip (layerskip.py): layer dropout p_{l,t} = S(t) D(l) p_max, and the early-exit loss
    p_max: float = 0.0               # 0: no layer dropout
    dropout_scale: str = "exp"       # D(l): exp | linear | uniform
    dropout_curriculum: str = "constant"  # S(t): constant | exp (from scratch)
    early_exit_curriculum: str = "off"    # off (last layer only) | none (all exits) | rotational | gradual
    e_scale: float = 1.0
    exit_period: int = 8             # R of the rotational curriculum
    seed: int = 1337
    device: str = "auto"             # auto: cuda if available
    compile: bool | None = None      # per-block torch.compile; default on for CUDA


# ---- data ----

def load_split(data_dir, split):
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"no prepared data in {data_dir!r}: run python data/prepare.py first")
    meta = json.load(open(meta_path))
    return np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=meta["dtype"], mode="r"), meta


def get_batch(data, batch_size, block_size, seed):
    """batch_size random windows of block_size+1 tokens, chosen by a generator seeded with `seed`."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(len(data) - block_size - 1, (batch_size,), generator=g).tolist()
    chunk = torch.from_numpy(np.stack([data[s:s + block_size + 1].astype(np.int64) for s in starts]))
    return chunk[:, :-1], chunk[:, 1:]  # inputs, targets [B, T]


def batch_seed(seed, step, micro):
    return (seed * 1_000_003 + step) * 1_009 + micro


def load_data(cfg):
    """(train_batch(step, micro), val_batch(i), n_train_records or None, vocab_size, tokenizer file)."""
    B, T = cfg.micro_batch, cfg.block_size
    if cfg.dataset == "tokens":
        train, meta = load_split(cfg.data_dir, "train")
        val, _ = load_split(cfg.data_dir, "val")
        return (lambda step, micro: get_batch(train, B, T, batch_seed(cfg.seed, step, micro)),
                lambda i: get_batch(val, B, T, batch_seed(cfg.seed, -1, i)),
                None, meta["vocab_size"], os.path.join(cfg.data_dir, "tokenizer.model"))
    if cfg.dataset != "instruct":
        raise ValueError(f"dataset must be tokens or instruct, got {cfg.dataset!r}")
    source = cfg.tokenizer or (cfg.init_from if os.path.isdir(cfg.init_from) else "data/stdlib/tokenizer.model")
    tok = load_tokenizer(source)
    tok_file = source if os.path.isfile(source) else next(
        os.path.join(source, f) for f in ("tokenizer.model", "tokenizer.json") if os.path.isfile(os.path.join(source, f)))
    train = encode_records(tok, load_records(os.path.join(cfg.data_dir, "train.jsonl")), T)
    val = encode_records(tok, load_records(os.path.join(cfg.data_dir, "val.jsonl")), T)
    if not train or not val:
        raise ValueError(f"{cfg.data_dir}: no usable train or val records")
    return (lambda step, micro: make_batch(train, epoch_indices(len(train), (step * cfg.grad_accum + micro) * B, B, cfg.seed), T),
            lambda i: make_batch(val, [(i * B + j) % len(val) for j in range(B)], T),
            len(train), tok.vocab_size(), tok_file)


# ---- schedule ----

def lr_at(step, cfg):
    """Linear warmup then cosine decay to min_lr over lr_decay_steps."""
    decay_steps = cfg.lr_decay_steps or cfg.max_steps
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= decay_steps:
        return cfg.min_lr
    ratio = (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


# ---- model and optimizer ----

def build_model(cfg, vocab_size):
    if cfg.init_from not in ("scratch", "resume"):
        return Transformer.from_pretrained(cfg.init_from)
    if cfg.model not in PRESETS:
        raise ValueError(f"unknown model preset {cfg.model!r}; choose from {sorted(PRESETS)}")
    shape = {k: getattr(cfg, k) for k in ("n_layer", "n_embd", "n_head", "n_kv_head", "intermediate_size")
             if getattr(cfg, k) is not None}
    model_cfg = replace(PRESETS[cfg.model], vocab_size=vocab_size, block_size=cfg.block_size, **shape)
    torch.manual_seed(cfg.seed)
    return Transformer(model_cfg)


def make_optimizer(model, cfg, fused):
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def parse_exits(spec, n_layer):
    if spec == "all":
        return list(range(1, n_layer + 1))
    if spec == "last":
        return [n_layer]
    exits = sorted({int(e) for e in spec.split(",")})
    if not all(1 <= e <= n_layer for e in exits):
        raise ValueError(f"eval_exits {spec!r}: exit layers must lie in [1, {n_layer}]")
    return exits


# ---- evaluation and checkpoints ----

@torch.no_grad()
def evaluate(model, val_batch, cfg, exits, device, autocast):
    """Mean validation loss at each exit layer, over fixed batches; no layer dropout (eval mode)."""
    model.eval()
    totals = {e: 0.0 for e in exits}
    for i in range(cfg.eval_batches):
        x, y = val_batch(i)
        with autocast:
            _, exit_losses = model(x.to(device), y.to(device), exits={e: 1.0 for e in exits})
        for e in exits:
            totals[e] += exit_losses[e].item() / cfg.eval_batches
    model.train()
    return totals


def format_exit_table(losses):
    lines = ["exit layer | val loss | perplexity"]
    lines += [f"{e:10d} | {v:8.4f} | {math.exp(min(v, 50)):10.2f}" for e, v in sorted(losses.items())]
    return "\n".join(lines)


def save_checkpoint(model, optimizer, step, cfg, tokenizer_file):
    """Model directory for sample.py plus train_state.pt for resume, each file written atomically."""
    model.save_pretrained(cfg.out_dir)
    tok_dst = os.path.join(cfg.out_dir, os.path.basename(tokenizer_file))
    if os.path.abspath(tok_dst) != os.path.abspath(tokenizer_file):
        atomic_write(tok_dst, lambda p: shutil.copyfile(tokenizer_file, p))
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
             "train_config": asdict(cfg)}
    atomic_write(os.path.join(cfg.out_dir, "train_state.pt"), lambda p: torch.save(state, p))


def load_train_state(cfg):
    path = os.path.join(cfg.out_dir, "train_state.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"cannot resume: {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"cannot resume: {path} is not a valid training state ({type(e).__name__})") from None


# ---- main loop ----

def main():
    cfg = configure(TrainConfig())
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    use_compile = cfg.compile if cfg.compile is not None else device == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")
    train_batch, val_batch, n_train, vocab_size, tokenizer_file = load_data(cfg)
    if cfg.epochs is not None:
        if n_train is None:
            raise ValueError("epochs needs dataset=instruct; use max_steps for token data")
        cfg = replace(cfg, max_steps=math.ceil(cfg.epochs * n_train / (cfg.micro_batch * cfg.grad_accum)))

    state = load_train_state(cfg) if cfg.init_from == "resume" else None
    model = build_model(cfg, vocab_size)
    if state is not None:
        model.load_state_dict(state["model"])
    if cfg.block_size > model.cfg.block_size:
        raise ValueError(f"block_size {cfg.block_size} exceeds the model's context of {model.cfg.block_size}")
    model.to(device).train()
    optimizer = make_optimizer(model, cfg, fused=device == "cuda")
    start_step = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        start_step = state["step"]
    if use_compile:
        for block in model.layers:
            block.compile()
    eval_exits = parse_exits(cfg.eval_exits, model.n_layer)
    L = model.n_layer
    os.makedirs(cfg.out_dir, exist_ok=True)
    print(f"model: {model.num_params() / 1e6:.2f}M parameters, {model.n_layer} layers; device {device}; "
          f"{cfg.micro_batch * cfg.grad_accum * cfg.block_size:,} tokens per step; starting at step {start_step}")

    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    tokens_per_step = cfg.micro_batch * cfg.grad_accum * cfg.block_size
    bar = tqdm(range(start_step, cfg.max_steps + 1), initial=start_step, total=cfg.max_steps + 1, desc="train")
    for step in bar:
        if step % cfg.eval_interval == 0 or step == cfg.max_steps:
            losses = evaluate(model, val_batch, cfg, eval_exits, device, autocast)
            tqdm.write(f"step {step}: validation\n{format_exit_table(losses)}")
            with open(metrics_path, "a") as f:
                f.write(json.dumps({"step": step, "val_loss": {str(e): v for e, v in losses.items()},
                                    "val_ppl": {str(e): math.exp(min(v, 50)) for e, v in losses.items()}}) + "\n")
            if step > start_step:
                save_checkpoint(model, optimizer, step, cfg, tokenizer_file)
            t0, timed_steps = time.time(), 0
        if step == cfg.max_steps:
            break
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        exits = exit_weights(L, step, cfg.max_steps, cfg.e_scale, cfg.early_exit_curriculum, cfg.exit_period)
        rates = dropout_rates(L, step, cfg.max_steps, cfg.p_max, cfg.dropout_scale, cfg.dropout_curriculum)
        loss_sum = 0.0  # of the last layer's loss, comparable across curricula
        for micro in range(cfg.grad_accum):
            x, y = train_batch(step, micro)
            skip_mask = layer_dropout_mask(rates, x.shape[0], batch_seed(cfg.seed + 1, step, micro)) if cfg.p_max > 0 else None
            with autocast:
                loss, exit_losses = model(x.to(device), y.to(device), exits=exits, skip_mask=skip_mask)
            (loss / cfg.grad_accum).backward()
            loss_sum += exit_losses[L].item() / cfg.grad_accum
        if not math.isfinite(loss_sum):
            raise ValueError(f"loss is {loss_sum} at step {step}; stopping, the last checkpoint in "
                             f"{cfg.out_dir} is kept as it was")
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timed_steps += 1
        tok_s = tokens_per_step * timed_steps / (time.time() - t0)
        bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")


if __name__ == "__main__":
    run_main(main)
