"""
Train a skippable Llama:  python train.py [config/NAME.py] [--key=value ...]

Single process: fp32 on CPU, bf16 autocast (and per-block torch.compile) on CUDA. Every batch is a
function of (seed, step, micro step), so a resumed run (--init_from=resume) sees exactly the
data an uninterrupted run would; a checkpoint and its resumable state are saved as one unit (savedir.py).
"""
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from tqdm import tqdm

import savedir
from configurator import configure, run_main
from data.instruct import IGNORE, encode_records, epoch_indices, load_records, make_batch, save_template
from layerskip import dropout_rates, exit_weights, layer_dropout_mask
from model import PRESETS, Config, Transformer
from rules import UNIT_INTERVAL, above, at_least, check_values, one_of
from savedir import atomic_write
from tokenizer import load_tokenizer
from unified import response_skip_mask, skipped_layers


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out"             # checkpoint, train_state/ and metrics.jsonl
    data_dir: str = "data/stdlib"    # a data set of data/prepare.py (tokens) or data/instruct.py (instruct)
    dataset: str = "tokens"          # "tokens": data_dir/{train,val}.bin; "instruct": data_dir/{train,val}.jsonl (Alpaca)
    tokenizer: str = ""              # instruct data: tokenizer file or dir (default: init_from, else data/stdlib)
    init_from: str = "scratch"       # "scratch", "resume" (from out_dir), or a checkpoint directory
    # model: a preset from model.PRESETS, optionally reshaped
    model: str = "stdlib-16l"        # preset name (scratch runs)
    n_layer: int | None = None       # None: the preset's
    n_embd: int | None = None        # None: the preset's
    n_head: int | None = None        # None: the preset's
    n_kv_head: int | None = None     # None: the preset's
    intermediate_size: int | None = None  # None: the preset's
    # batches: micro_batch x block_size tokens, grad_accum micro batches per step
    micro_batch: int = 16            # rows per micro batch and process
    block_size: int = 256            # tokens per row
    grad_accum: int = 1              # micro batches per optimizer step
    # optimizer and schedule
    max_steps: int = 1500            # optimizer steps
    epochs: float | None = None      # if set: max_steps = epochs x train records / (micro_batch x grad_accum)
    lr: float = 2e-3                 # peak learning rate
    min_lr: float = 2e-4             # learning rate at the end of the cosine decay
    warmup_steps: int = 100          # linear warmup from 0
    lr_decay_steps: int | None = None  # default max_steps
    weight_decay: float = 0.1        # AdamW, on matrices only
    beta1: float = 0.9               # AdamW
    beta2: float = 0.95              # AdamW
    grad_clip: float = 1.0           # max gradient norm (0: no clipping)
    # evaluation and checkpoints
    eval_interval: int = 250         # also the checkpoint interval
    eval_batches: int = 20           # validation batches per evaluation
    eval_exits: str = "all"          # "all" exit layers, "last", or a comma list like "4,8,16"
    log_interval: int = 1            # train loss per exit into metrics.jsonl every this many steps
    max_val_loss: float | None = None  # a run whose last-exit validation loss was under 0.95x this and passes
    # it has collapsed: it stops before saving (None: 0.99 ln vocab_size, just under a uniform prediction's loss)
    # LayerSkip (layerskip.py): layer dropout p_{l,t} = S(t) D(l) p_max, and the early-exit loss
    p_max: float = 0.0               # 0: no layer dropout
    dropout_scale: str = "exp"       # D(l): exp | linear | uniform
    dropout_curriculum: str = "constant"  # S(t): constant | exp (from scratch)
    early_exit_curriculum: str = "off"    # off (last layer only) | none (all exits) | rotational | gradual
    e_scale: float = 1.0             # scale of the early-exit loss weights
    exit_period: int = 8             # R of the rotational curriculum
    # unified layer skipping (unified.py): response tokens skip the layers of a target speedup's plan
    skip_speedup: float = 0.0        # 0: off; e.g. 2 or 3 (dataset=instruct); the plan is saved in config.json
    freeze_embeddings: bool = False  # keep the token embedding (and a tied head) fixed
    seed: int = 1337                 # batches and initialization
    device: str = "auto"             # auto: cuda if available
    compile: bool | None = None      # per-block torch.compile; default on for CUDA


def device_available(device):
    if device.startswith("cuda"):
        return torch.cuda.is_available() and (device == "cuda" or int(device[5:]) < torch.cuda.device_count())
    return device == "cpu"


DEVICE_RULE = (lambda d: d == "auto" or (re.fullmatch(r"cpu|cuda(:\d+)?", d) is not None and device_available(d)),
               "auto, cpu or cuda[:N] (cuda only where a CUDA device is present)")

TRAIN_RULES = {
    **{k: at_least(1) for k in ("micro_batch", "block_size", "grad_accum", "max_steps", "lr_decay_steps",
                                "eval_interval", "eval_batches", "log_interval", "exit_period",
                                "n_layer", "n_embd", "n_head", "n_kv_head", "intermediate_size")},
    **{k: at_least(0) for k in ("lr", "min_lr", "warmup_steps", "weight_decay", "grad_clip", "e_scale")},
    "max_val_loss": above(0),
    "epochs": above(0),
    "beta1": UNIT_INTERVAL, "beta2": UNIT_INTERVAL, "p_max": UNIT_INTERVAL,
    "skip_speedup": (lambda v: v == 0 or v >= 1, "0 (off) or >= 1"),
    "dataset": one_of("tokens", "instruct"),
    "model": one_of(*PRESETS),
    "dropout_scale": one_of("exp", "linear", "uniform"),
    "dropout_curriculum": one_of("constant", "exp"),
    "early_exit_curriculum": one_of("off", "none", "rotational", "gradual"),
    "device": DEVICE_RULE,
}


# dense bf16 datasheet peaks for MFU, by GPU name; other devices report no MFU
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(device):
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


# ---- data ----

def load_split(data_dir, split, block_size):
    """The token memmap of data_dir/{split}.bin and meta.json; ValueError when the split is shorter than
    one window of block_size + 1 tokens (inputs and their shifted targets)."""
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"no prepared data in {data_dir!r}: run python data/prepare.py first")
    meta = read_meta(meta_path)
    path = os.path.join(data_dir, f"{split}.bin")
    data = token_file(path, meta)
    if len(data) < block_size + 1:
        raise ValueError(f"the {split} split ({path}) holds {len(data)} tokens; one window of block_size "
                         f"{block_size} needs {block_size + 1}")
    return data, meta


def read_meta(path):
    """meta.json of a token data set: a JSON object with an integer vocab_size >= 1 and dtype uint16 or uint32."""
    try:
        meta = json.load(open(path))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("dtype") not in ("uint16", "uint32") or \
            not isinstance(meta.get("vocab_size"), int) or meta["vocab_size"] < 1:
        raise ValueError(f"{path}: needs a JSON object with an integer vocab_size >= 1 and dtype uint16 or uint32")
    return meta


def token_file(path, meta):
    """The token ids of a .bin file as a memmap (an empty array for an empty file, which np.memmap cannot map),
    checked: whole ids, all below meta's vocab_size."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: run python data/prepare.py first")
    itemsize, size = np.dtype(meta["dtype"]).itemsize, os.path.getsize(path)
    if size % itemsize:
        raise ValueError(f"{path} holds {size} bytes: not a whole number of {meta['dtype']} token ids")
    if size == 0:
        return np.zeros(0, dtype=meta["dtype"])
    data = np.memmap(path, dtype=meta["dtype"], mode="r")
    if int(data.max()) >= meta["vocab_size"]:
        raise ValueError(f"{path} holds token id {int(data.max())}, beyond meta.json's vocab_size {meta['vocab_size']}")
    return data


def get_batch(data, batch_size, block_size, seed):
    """batch_size random windows of block_size+1 tokens, chosen by a generator seeded with `seed`: every
    start in [0, len(data) - block_size - 1] can be drawn, so the last token is too."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=g).tolist()
    chunk = torch.from_numpy(np.stack([data[s:s + block_size + 1].astype(np.int64) for s in starts]))
    return chunk[:, :-1], chunk[:, 1:]  # inputs, targets [B, T]


def batch_seed(seed, step, micro):
    return (seed * 1_000_003 + step) * 1_009 + micro


def load_data(cfg, rank=0, world=1):
    """(train_batch(step, micro), val_batch(i), n_train_records or None, vocab_size, tokenizer file).

    A training micro batch is drawn for all processes at once (world x micro_batch rows, a function of
    seed, step and micro step) and each rank keeps its own rows, so 2 processes x b rows see exactly
    the data of 1 process x 2b. Validation batches are the same on every rank."""
    train_batch, val_batch, n_train, vocab_size, tok_file = _load_data(cfg, cfg.micro_batch * world)
    rows = slice(rank * cfg.micro_batch, (rank + 1) * cfg.micro_batch)

    def local_batch(step, micro):
        x, y = train_batch(step, micro)
        return x[rows], y[rows]
    return local_batch, val_batch, n_train, vocab_size, tok_file


def _load_data(cfg, global_batch):
    B, T = cfg.micro_batch, cfg.block_size
    G = global_batch
    savedir.verify(cfg.data_dir, required=False)  # a data set data/prepare.py or data/instruct.py wrote as a whole
    if cfg.dataset == "tokens":
        train, meta = load_split(cfg.data_dir, "train", T)
        val, _ = load_split(cfg.data_dir, "val", T)
        return (lambda step, micro: get_batch(train, G, T, batch_seed(cfg.seed, step, micro)),
                lambda i: get_batch(val, B, T, batch_seed(cfg.seed, -1, i)),
                None, meta["vocab_size"], os.path.join(cfg.data_dir, "tokenizer.model"))
    if cfg.dataset != "instruct":
        raise ValueError(f"dataset must be tokens or instruct, got {cfg.dataset!r}")
    checkpoint = cfg.out_dir if cfg.init_from == "resume" else cfg.init_from  # its tokenizer comes along
    source = cfg.tokenizer or (checkpoint if os.path.isdir(checkpoint) else "data/stdlib/tokenizer.model")
    bos_id, eos_id = special_ids(cfg, checkpoint)
    tok = load_tokenizer(source, bos_id, eos_id)
    if (tok.bos_id(), tok.eos_id()) != (bos_id, eos_id):  # a sentencepiece model has ids of its own
        raise ValueError(f"tokenizer {source!r} has bos/eos ids {tok.bos_id()}/{tok.eos_id()}, the model "
                         f"{bos_id}/{eos_id}: they do not belong together")
    tok_file = source if os.path.isfile(source) else next(
        os.path.join(source, f) for f in ("tokenizer.model", "tokenizer.json") if os.path.isfile(os.path.join(source, f)))
    train, val = (encode_records(tok, load_records(path), T, path) for path in
                  (os.path.join(cfg.data_dir, "train.jsonl"), os.path.join(cfg.data_dir, "val.jsonl")))
    if not train or not val:
        raise ValueError(f"{cfg.data_dir}: no usable train or val records")
    return (lambda step, micro: make_batch(train, epoch_indices(len(train), (step * cfg.grad_accum + micro) * G, G, cfg.seed), T),
            lambda i: make_batch(val, [(i * B + j) % len(val) for j in range(B)], T),
            len(train), tok.vocab_size(), tok_file)


def special_ids(cfg, checkpoint):
    """(bos, eos) ids of the model being trained: from the checkpoint's config.json (init_from, or out_dir
    on resume), else from the preset (a model trained from scratch). Instruction rows are encoded with them,
    as sample.py encodes prompts: OPT's bos is 2, not the Llama 1 that is its pad token."""
    path = os.path.join(checkpoint, "config.json")
    if os.path.isfile(path):
        saved = json.load(open(path))
        return saved.get("bos_id", Config.bos_id), saved.get("eos_id", Config.eos_id)
    preset = PRESETS.get(cfg.model, Config())
    return preset.bos_id, preset.eos_id


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
    """From a checkpoint (init_from=DIR), or on the meta device: a preset (scratch) or out_dir's own config (resume)."""
    if cfg.init_from not in ("scratch", "resume"):
        return Transformer.from_pretrained(cfg.init_from)
    if cfg.init_from == "resume":
        with torch.device("meta"):
            return Transformer(Config.from_dict(json.load(open(os.path.join(cfg.out_dir, "config.json")))))
    if cfg.model not in PRESETS:
        raise ValueError(f"unknown model preset {cfg.model!r}; choose from {sorted(PRESETS)}")
    shape = {k: getattr(cfg, k) for k in ("n_layer", "n_embd", "n_head", "n_kv_head", "intermediate_size")
             if getattr(cfg, k) is not None}
    model_cfg = replace(PRESETS[cfg.model], vocab_size=vocab_size, block_size=cfg.block_size, **shape)
    with torch.device("meta"):  # weights are allocated after sharding, then initialized or loaded
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
def evaluate(model, val_batch, cfg, exits, device, autocast, plan=False):
    """Validation loss at each exit layer: the mean over every target token of fixed batches (batches with
    more response tokens weigh more); no layer dropout (eval mode).
    plan: only the last exit, with response tokens skipping the model's skip plan."""
    model.eval()
    totals, n_tokens = {e: 0.0 for e in exits}, 0
    for i in range(cfg.eval_batches):
        x, y = val_batch(i)
        skip_mask = response_skip_mask(y, model.cfg.skip_layers, model.n_layer) if plan else None
        with autocast:
            _, exit_losses = model(x.to(device), y.to(device), exits={e: 1.0 for e in exits}, skip_mask=skip_mask)
        n = int((y != IGNORE).sum())
        for e in exits:
            totals[e] += exit_losses[e].item() * n
        n_tokens += n
    model.train()
    return {e: total / max(n_tokens, 1) for e, total in totals.items()}


def format_exit_table(losses):
    lines = ["exit layer | val loss | perplexity"]
    lines += [f"{e:10d} | {v:8.4f} | {math.exp(min(v, 50)):10.2f}" for e, v in sorted(losses.items())]
    return "\n".join(lines)


def finite_weights(model, step, cfg, rank):
    """The full state dict (on rank 0's CPU) to save; ValueError naming the first weight with NaN or inf."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    bad = on_all_ranks(nonfinite_tensor(full) if rank == 0 else None)
    if bad:
        raise ValueError(f"weight {bad} holds NaN or inf at step {step}; stopping without saving: {kept(cfg)}")
    return full


def save_checkpoint(model, optimizer, step, cfg, tokenizer_file, rank, val_loss, full):
    """Save the weights (`full`, from finite_weights: config.json, model.safetensors), the tokenizer and
    train_state/ (the sharded resumable state: model, optimizer, step; torch.distributed.checkpoint) as one
    unit (savedir.py): written into out_dir/.next/, committed by its manifest, then moved into out_dir
    (rank 0 moves, every rank writes its shards); the manifest records the step and the last exit's
    validation loss. A failed write (a full disk) raises ValueError while out_dir still holds the previous
    checkpoint untouched."""
    nxt = os.path.join(cfg.out_dir, savedir.NEXT)
    try:
        if rank == 0:
            savedir.start_next(cfg.out_dir)
            model.save_pretrained(nxt, state=full)
            copy_tokenizer(tokenizer_file, nxt)
            if cfg.dataset == "instruct":
                save_template(nxt)
        barrier()
        model_state, optim_state = get_state_dict(model, optimizer)
        state_dir = os.path.join(nxt, "train_state")
        dcp.save({"model": model_state, "optim": optim_state, "step": torch.tensor(step)}, checkpoint_id=state_dir)
        barrier()
        if rank == 0:
            with open(os.path.join(state_dir, "step.json"), "w") as f:
                f.write(json.dumps({"step": step}))
            savedir.write_manifest(nxt, kind=savedir.CHECKPOINT, step=step, val_loss=val_loss)
    except (Exception, CheckpointException) as e:
        if rank == 0:
            shutil.rmtree(nxt, ignore_errors=True)
        raise ValueError(f"cannot save the checkpoint of step {step} ({one_line(e)}): {kept(cfg)}") from None
    if rank == 0:
        savedir.commit(cfg.out_dir)
    barrier()


def nonfinite_tensor(state):
    """The name of the first tensor of `state` holding NaN or inf, else None."""
    return next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)


def kept(cfg):
    """What a stopped run leaves in out_dir: its last complete unit (a checkpoint, or distill.py's student...)."""
    try:
        manifest = savedir.read_manifest(cfg.out_dir)
    except ValueError:
        return f"nothing had been saved in {cfg.out_dir}"
    unit = f"the {savedir.kind_of(manifest)}"
    if "step" in manifest:
        unit = f"the checkpoint of step {manifest['step']}"
    return f"{unit} in {cfg.out_dir} is kept as it was"


def run_inputs(cfg):
    """(name, path) of what a run reads, which its out_dir may not be: data, tokenizer and, but on resume,
    the checkpoint it starts from."""
    return [("data_dir", cfg.data_dir), ("tokenizer", cfg.tokenizer)] + \
        ([("init_from", cfg.init_from)] if cfg.init_from not in ("scratch", "resume") else [])


def check_finite_val_loss(losses, step, cfg):
    """Before a save: ValueError when a validation loss is NaN or inf."""
    bad = next((e for e, v in losses.items() if not math.isfinite(v)), None)
    if bad is not None:
        raise ValueError(f"validation loss at exit {bad} is {losses[bad]} at step {step}; stopping without "
                         f"saving: {kept(cfg)}")


def check_collapse(losses, last, best, limit, step, cfg):
    """Before a save: ValueError when the last exit's loss passes `limit` although the run had been clearly
    below it (best, the lowest so far, under 0.95 limit; a run still near a uniform prediction's loss, as a
    run from scratch starts, is not judged): a collapsed run (a learning rate far too high) must not replace
    the good checkpoint it started from."""
    if best < 0.95 * limit and losses[last] > limit:
        raise ValueError(f"validation loss {losses[last]:.4f} at step {step} is past max_val_loss "
                         f"{limit:.4f} (the best so far {best:.4f}): the run collapsed; stopping without "
                         f"saving: {kept(cfg)}")


def check_val_loss(losses, last, best, limit, step, cfg):
    """check_finite_val_loss, then check_collapse (distill.py and dynamic.py check their weights apart)."""
    check_finite_val_loss(losses, step, cfg)
    check_collapse(losses, last, best, limit, step, cfg)


def val_loss_limit(cfg, vocab_size):
    return cfg.max_val_loss if cfg.max_val_loss is not None else 0.99 * math.log(vocab_size)


def check_same_tokenizer(checkpoint, tokenizer_file):
    """A checkpoint continues with the tokenizer it was trained with: ValueError when it holds a tokenizer
    file of the same name whose bytes differ (SHA-256) from the data's."""
    own = os.path.join(checkpoint, os.path.basename(tokenizer_file))
    if os.path.isfile(own) and savedir.sha256(own) != savedir.sha256(tokenizer_file):
        raise ValueError(f"the tokenizer of the data ({tokenizer_file}) is not the one {checkpoint} was trained "
                         f"with ({own}): use a data set prepared with the checkpoint's tokenizer")


def one_line(e):
    """A short reason for an exception; torch's CheckpointException carries each rank's own exception."""
    for failure in getattr(e, "failures", {}).values():
        e = getattr(failure, "exc", e)
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


def copy_tokenizer(tokenizer_file, out_dir):
    """Put the tokenizer next to the weights, so that sample.py finds it, with the files beside it that hold
    its rules (tokenizer_config.json, chat_template.jinja: bos, special tokens, chat template)."""
    src = os.path.dirname(tokenizer_file)
    for f in [tokenizer_file] + [os.path.join(src, n) for n in ("tokenizer_config.json", "chat_template.jinja")]:
        dst = os.path.join(out_dir, os.path.basename(f))
        if os.path.isfile(f) and os.path.abspath(dst) != os.path.abspath(f):
            atomic_write(dst, lambda p: shutil.copyfile(f, p))


def claim_out_dir(cfg, rank):
    """Lock out_dir against a second run (the lock lives as long as the returned file) and settle an
    interrupted save, once out_dir is checked to hold nothing but this run's checkpoints; rank 0 does it, the
    other ranks wait."""
    lock = savedir.claim(cfg.out_dir, savedir.CHECKPOINT, run_inputs(cfg)) if rank == 0 else None
    barrier()
    return lock


def verify_resumable(cfg):
    """out_dir's checkpoint, every file checked against its manifest (a changed config.json, a damaged
    shard, a garbage step.json are each one line naming the file); return the manifest."""
    manifest = savedir.verify(cfg.out_dir)
    if not isinstance(manifest.get("step"), int) or "train_state/step.json" not in manifest["files"]:
        raise ValueError(f"cannot resume: {cfg.out_dir}/{savedir.MANIFEST} names no training state")
    return manifest


def load_train_state(model, optimizer, cfg, manifest):
    """Restore model and optimizer (resharded to this run's process count); return the step."""
    path = os.path.join(cfg.out_dir, "train_state")
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state, "step": torch.tensor(-1)}
    try:
        dcp.load(state, checkpoint_id=path)
    except (Exception, CheckpointException) as e:  # a state that does not fit the model
        raise ValueError(f"cannot resume: {path} does not fit the model of config.json ({one_line(e)})") from None
    if int(state["step"]) != manifest["step"]:
        raise ValueError(f"cannot resume: {path} holds step {int(state['step'])}, its manifest step {manifest['step']}")
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return int(state["step"])


# ---- processes ----

def setup_distributed(cfg):
    """(rank, world size, device). Under torchrun: one process per device, nccl on CUDA, gloo on CPU."""
    cuda = torch.cuda.is_available() and cfg.device in ("auto", "cuda")
    if "RANK" not in os.environ:
        return 0, 1, cfg.device if cfg.device != "auto" else ("cuda" if cuda else "cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return dist.get_rank(), dist.get_world_size(), f"cuda:{os.environ['LOCAL_RANK']}" if cuda else "cpu"


def barrier():
    if dist.is_initialized():
        dist.barrier()


def on_all_ranks(value):
    """Rank 0's `value` (any picklable object) on every rank."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def collective_device():
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def sum_over_ranks(values):
    """Sum a list of numbers over processes."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=collective_device())
    dist.all_reduce(t)
    return t.tolist()


def check_same_on_all_ranks(mask):
    """Layer dropout must decide identically everywhere, or FSDP ranks wait on each other forever."""
    if not dist.is_initialized():
        return
    mask = mask.to(collective_device(), torch.uint8)
    gathered = [torch.empty_like(mask) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mask)
    if any(not torch.equal(g, mask) for g in gathered):
        raise RuntimeError("layer dropout masks differ between ranks")


def shard(model, device):
    """FSDP2 per block, then the root (torchtitan's recipe); bf16 compute, fp32 reductions on CUDA."""
    mp = {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)} \
        if device.startswith("cuda") else {}
    for i, block in enumerate(model.layers):
        fully_shard(block, reshard_after_forward=i < len(model.layers) - 1, **mp)
    fully_shard(model, **mp)


# ---- main loop ----

def main():
    cfg = check_values(configure(TrainConfig()), TRAIN_RULES)
    rank, world, device = setup_distributed(cfg)
    master = rank == 0
    out_lock, manifest = None, None  # out_lock: the lock on out_dir, held while this file stays open
    start = cfg.init_from
    if start not in ("scratch", "resume") and not os.path.isfile(os.path.join(start, "config.json")):
        raise FileNotFoundError(f"init_from {start!r} holds no checkpoint (config.json); make it with: python "
                                f"checkpoints_convert.py --from_hf <transformers checkpoint dir> --out {start}")
    savedir.check_target(cfg.out_dir, savedir.CHECKPOINT, run_inputs(cfg))
    if cfg.init_from == "resume":  # verified before anything is built from it
        if not any(os.path.isfile(os.path.join(cfg.out_dir, d, savedir.MANIFEST)) for d in ("", savedir.NEXT)):
            raise FileNotFoundError(f"cannot resume: {cfg.out_dir} holds no saved checkpoint (no {savedir.MANIFEST})")
        out_lock = claim_out_dir(cfg, rank)  # noqa: F841 (the open lock file is held until the process exits)
        manifest = verify_resumable(cfg)
    cuda = device.startswith("cuda")
    use_compile = cfg.compile if cfg.compile is not None else cuda
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)
    train_batch, val_batch, n_train, vocab_size, tokenizer_file = load_data(cfg, rank, world)
    if cfg.init_from != "scratch":
        check_same_tokenizer(cfg.out_dir if cfg.init_from == "resume" else cfg.init_from, tokenizer_file)
    if cfg.epochs is not None:
        if n_train is None:
            raise ValueError("epochs needs dataset=instruct; use max_steps for token data")
        cfg = replace(cfg, max_steps=math.ceil(cfg.epochs * n_train / (cfg.micro_batch * cfg.grad_accum * world)))

    model = build_model(cfg, vocab_size)
    model.check_vocabulary(vocab_size, f"the tokenizer of {cfg.data_dir!r}")
    if cfg.block_size > model.cfg.block_size:
        raise ValueError(f"block_size {cfg.block_size} exceeds the model's context of {model.cfg.block_size}")
    on_meta = any(p.is_meta for p in model.parameters())
    if not on_meta:
        model.to(device)
    if use_compile:
        for block in model.layers:
            block.compile()
    if dist.is_initialized():  # under torchrun, even with one process
        shard(model, device)
    if on_meta:  # allocate (each rank its shard), then initialize; resume overwrites it below
        model.to_empty(device=device)
        if model.cfg.tie_embeddings and not dist.is_initialized():  # to_empty gives each module its own tensor
            model.lm_head.weight = model.tok_emb.weight
        torch.manual_seed(cfg.seed)
        model.init_weights()
    model.train()
    if cfg.skip_speedup:
        if cfg.dataset != "instruct" or cfg.p_max > 0:
            raise ValueError("skip_speedup needs dataset=instruct (prompt and response) and p_max=0")
        model.cfg.skip_layers = skipped_layers(model.n_layer, cfg.skip_speedup)
    if cfg.freeze_embeddings:
        model.tok_emb.weight.requires_grad_(False)
    optimizer = make_optimizer(model, cfg, fused=cuda)
    start_step = load_train_state(model, optimizer, cfg, manifest) if cfg.init_from == "resume" else 0
    eval_exits = parse_exits(cfg.eval_exits, model.n_layer)
    L = model.n_layer
    last = eval_exits[-1]  # the deepest exit evaluated: its validation loss is checked for a collapse
    best, limit = (manifest or {}).get("val_loss", math.inf), val_loss_limit(cfg, model.cfg.vocab_size)
    if cfg.init_from != "resume":  # a resumed run holds it already
        out_lock = claim_out_dir(cfg, rank)  # noqa: F841 (the open lock file is held until the process exits)
    if master:
        print(f"model: {model.num_params() / 1e6:.2f}M parameters, {L} layers; {world} process(es) on {device}; "
              f"{cfg.micro_batch * cfg.grad_accum * world * cfg.block_size:,} tokens per step; starting at step {start_step}")

    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    if master:
        metrics_path = start_metrics(metrics_path, start_step)
    tokens_per_step = cfg.micro_batch * cfg.grad_accum * world * cfg.block_size
    peak = peak_flops(device)  # per device; MFU = achieved FLOP/s per process / peak
    flops_per_token = model.flops_per_token(cfg.block_size)
    bar = tqdm(range(start_step, cfg.max_steps + 1), initial=start_step, total=cfg.max_steps + 1, desc="train",
               disable=not master)
    t0, timed_steps = time.time(), 0  # tokens/s over the steps since the last evaluation
    for step in bar:
        if (step % cfg.eval_interval == 0 or step == cfg.max_steps) and (step > start_step or step == 0):
            losses = evaluate(model, val_batch, cfg, eval_exits, device, autocast)
            row = {"step": step, "val_loss": {str(e): v for e, v in losses.items()},
                   "val_ppl": {str(e): math.exp(min(v, 50)) for e, v in losses.items()}}
            if cfg.skip_speedup:
                row["val_loss_plan"] = evaluate(model, val_batch, cfg, [L], device, autocast, plan=True)[L]
            if master:
                tqdm.write(f"step {step}: validation\n{format_exit_table(losses)}" + (
                    f"\nskipping layers {model.cfg.skip_layers}: val loss {row['val_loss_plan']:.4f}"
                    if cfg.skip_speedup else ""))
                log_metrics(metrics_path, row)
            if step > start_step:
                check_finite_val_loss(losses, step, cfg)  # the most specific cause first: NaN, then
                full = finite_weights(model, step, cfg, rank)  # a NaN weight, then a collapse
                check_collapse(losses, last, best, limit, step, cfg)
                save_checkpoint(model, optimizer, step, cfg, tokenizer_file, rank, losses[last], full)
                if master:
                    metrics_path = publish_metrics(metrics_path)
            if math.isfinite(losses[last]):
                best = min(best, losses[last])
            t0, timed_steps = time.time(), 0
        if step == cfg.max_steps:
            break
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        exits = exit_weights(L, step, cfg.max_steps, cfg.e_scale, cfg.early_exit_curriculum, cfg.exit_period)
        rates = dropout_rates(L, step, cfg.max_steps, cfg.p_max, cfg.dropout_scale, cfg.dropout_curriculum)
        # a step's loss is the mean over the target tokens of all its micro steps and ranks: micro step m on
        # this rank weighs its mean loss by share = (its target tokens) / (the step's), instruction rows having
        # different numbers of response tokens; gradients are averaged over ranks, hence x world
        batches = [train_batch(step, micro) for micro in range(cfg.grad_accum)]
        counts = [int((y != IGNORE).sum()) for _, y in batches]
        step_tokens = max(sum_over_ranks([sum(counts)])[0], 1)
        exit_sums = {e: 0.0 for e in exits}
        for micro, (x, y) in enumerate(batches):
            share = counts[micro] / step_tokens
            skip_mask = None
            if cfg.p_max > 0:  # the same seed on every rank: the same local sample positions drop
                skip_mask = layer_dropout_mask(rates, x.shape[0], batch_seed(cfg.seed + 1, step, micro))
                check_same_on_all_ranks(skip_mask)
            if cfg.skip_speedup:  # prompt through every layer, response through the plan's layers
                skip_mask = response_skip_mask(y, model.cfg.skip_layers, L)
            if dist.is_initialized():  # reduce-scatter gradients only after the last micro step
                model.set_requires_gradient_sync(micro == cfg.grad_accum - 1)
            with autocast:
                loss, exit_losses = model(x.to(device), y.to(device), exits=exits, skip_mask=skip_mask)
            (loss * (share * world)).backward()
            for e in exits:  # device tensors: one host sync per step, not one per exit and micro step
                exit_sums[e] = exit_sums[e] + exit_losses[e].double() * share
        exit_means = dict(zip(exit_sums, sum_over_ranks(torch.stack(list(exit_sums.values())).tolist())))
        if not all(math.isfinite(v) for v in exit_means.values()):
            raise ValueError(f"training loss is {exit_means[L]} at step {step}; stopping: {kept(cfg)}")
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timed_steps += 1
        tok_s = tokens_per_step * timed_steps / (time.time() - t0)
        mfu = flops_per_token * tok_s / world / peak if peak else None
        if master:
            bar.set_postfix(loss=f"{exit_means[L]:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}",
                            **({"mfu": f"{mfu:.1%}"} if mfu else {}))
            if step % cfg.log_interval == 0:
                log_metrics(metrics_path, {"step": step, "train_loss": {str(e): v for e, v in exit_means.items()},
                                           "lr": lr, "tokens_per_s": tok_s, "mfu": mfu})
    if dist.is_initialized():
        dist.destroy_process_group()


def start_metrics(path, start_step):
    """The file a run starting at start_step logs its rows to (JSON, one per line; train.py's each have a "step"). A
    resumed run logs to `path` (metrics.jsonl), keeping what its checkpoint's run logged up to it (the training rows
    before its step and the evaluation at it; it logs the later ones again, the same, since it resumes exactly; a
    line cut short by a kill is dropped). A run from scratch logs to a new path + ".next", which replaces `path`
    when the run's first checkpoint replaces the earlier run's (publish_metrics): until then the earlier
    checkpoint keeps its rows. Written under a temporary name and renamed."""
    kept = []
    if start_step and os.path.exists(path):
        for line in open(path):
            try:
                row = json.loads(line)
                if row["step"] < start_step or (row["step"] == start_step and "train_loss" not in row):
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue
    target = path if start_step else path + ".next"
    atomic_write(target, lambda tmp: open(tmp, "w").writelines(kept))
    return target


def publish_metrics(path):
    """After a checkpoint is saved: a run's new metrics file (start_metrics' ".next") becomes metrics.jsonl
    -> the path to log to from now on."""
    if path.endswith(".next"):
        os.replace(path, path[:-len(".next")])
        path = path[:-len(".next")]
    return path


def log_metrics(path, row):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    run_main(main)
