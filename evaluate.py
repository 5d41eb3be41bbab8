"""
Validation loss vs fraction of layers run, for one trained model and the skipping methods built on it:

    python evaluate.py --ckpt out-layerskip --unified out-unified --dynamic out-dynamic --distill out-distill

Task benchmarks (--task code or summarize, see run_tasks and tasks.py): quality, tokens/s, time per token
and acceptance of every way to decode with fewer layers, on the same prompts:

    python evaluate.py --task code --data humaneval --ckpt out-layerskip     # or --data stdlib, or a JSONL file
    python evaluate.py --task summarize --data stdlib --ckpt out-layerskip
    python evaluate.py --task code --data humaneval --completions samples.jsonl   # score completions, no model

On instruction data (loss on response tokens). Every method is a skip mask on the response tokens
(prompts run every layer), except early exit, which runs layers [0, E). The fraction is the mean
share of the L layers that response tokens run. Rows: full depth; early exit; the unified 2x and 3x
plans applied to --ckpt as it is; LayerSkip-style dropout at inference (depth-rising rates, per
sequence: what a dropout-trained model learned to survive); and, when given, a checkpoint fine-tuned
for its unified plan (train.py --skip_speedup), learned controllers (dynamic.py), and a
skip-distilled student (distill.py) against --ckpt with the same layers skipped.
"""
import csv
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

import tasks
from configurator import configure, run_main
from dynamic import controlled_forward, load_controllers, sequence_plan
from generate import first_end, generate
from layerskip import dropout_rates, layer_dropout_mask
from model import Transformer, layer_mask
from rules import above, at_least, check_values
from savedir import atomic_write
from speculate import generate_speculative
from tokenizer import load_tokenizer
from train import DEVICE_RULE, TrainConfig, load_data
from unified import IGNORE, response_skip_mask, response_tokens, skipped_layers


@dataclass
class EvalConfig:
    ckpt: str = "out-layerskip"      # the model every method runs on
    data_dir: str = "data/stdlib_instruct"  # task lm: the validation data
    unified: str = ""                # a checkpoint trained with --skip_speedup (its plan is in its config)
    dynamic: str = ""                # backbone + controllers from dynamic.py
    distill: str = ""                # a student from distill.py (its distilled layers from metrics.jsonl)
    eval_batches: int = 20           # task lm: validation batches
    micro_batch: int = 8             # task lm: rows per batch
    block_size: int = 256            # task lm: tokens per row
    seed: int = 1337                 # batches and sampling
    exit_layers: tuple = ()          # task lm: exits for loss and agreement, e.g. 10,15,20 (default L/4, L/2, 3L/4)
    # task benchmarks
    task: str = "lm"                 # lm (validation loss per method), code or summarize
    data: str = ""                   # code: humaneval, stdlib or a HumanEval JSONL(.gz); summarize: stdlib or a JSONL
    completions: str = ""            # score this JSONL of {task_id, completion} instead of generating
    limit: int = 0                   # the first `limit` tasks only (0: all)
    num_samples: int = 1             # completions per task; pass@k for k <= num_samples (needs temperature > 0)
    temperature: float = 0.0         # 0: greedy
    top_k: int | None = None         # sample from the k most likely tokens (None: all)
    max_new_tokens: int = 0          # 0: 128 for code, 48 for summarize
    exit_layer: int = 0              # the early exit and the draft depth (0: half the layers)
    num_speculations: int = 4        # d: tokens drafted per self-speculation round
    settings: str = ""               # task code/summarize: comma list of setting-name prefixes to run (default all)
    workers: int = 0                 # programs run at once (0: the number of cores)
    timeout: float = 3.0             # seconds per program
    results: str = ""                # writes RESULTS.csv and RESULTS.png (default: {task}_{data name})
    device: str = "auto"             # auto: cuda if available, else cpu


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
def exit_eval(model, val_batch, batches, exit_layers):
    """{exit layer E: (mean loss, agreement)} on response tokens over `batches` validation batches: the
    cross-entropy of the exit's logits (model.head after layer E - 1) per response token, and the share of
    response tokens whose greedy (argmax) token at E equals full depth's, teacher-forced. One pass through
    the layers per batch; the head runs on response positions only ([N, V], not [B, T, V])."""
    L, exits = model.n_layer, sorted(set(exit_layers) | {model.n_layer})
    loss, agree, count = dict.fromkeys(exits, 0.0), dict.fromkeys(exits, 0), 0
    for i in range(batches):
        x, y = val_batch(i)
        response = response_tokens(y) & (y != IGNORE)
        h, start, argmax = model.embed(x), 0, {}
        for E in exits:
            h, start = model.run_layers(h, start, E), E
            logits = model.head(h[response])  # [N, V]
            logits = logits.float() if logits.element_size() < 4 else logits  # bf16 weights: fp32 loss
            loss[E] += F.cross_entropy(logits, y[response], reduction="sum").item()
            argmax[E] = logits.argmax(-1)
        for E in exits:
            agree[E] += int((argmax[E] == argmax[L]).sum())
        count += int(response.sum())
    if not count:
        raise ValueError("the validation batches hold no response tokens")
    return {E: (loss[E] / count, agree[E] / count) for E in exits}, count


def load(path, device="cpu"):
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint directory {path!r}")
    return Transformer.from_pretrained(path, device=device)


def trained_plan(ckpt, model):
    """The layers a checkpoint was trained to skip: the plan in its config (train.py --skip_speedup), else the
    layers distill.py distilled (the last row of its metrics.jsonl); [] for neither."""
    if model.cfg.skip_layers:
        return sorted(model.cfg.skip_layers)
    path = os.path.join(ckpt, "metrics.jsonl")
    rows = [line for line in open(path) if '"skipped"' in line] if os.path.isfile(path) else []
    try:
        return sorted(json.loads(rows[-1])["skipped"]) if rows else []
    except (ValueError, KeyError):
        raise ValueError(f"{path}: its last distillation row is not complete JSON: {rows[-1][:80]!r}") from None


@dataclass
class Setting:
    """One way to decode: what generate() (num_speculations 0) or generate_speculative() receives."""
    name: str
    exit_layer: int | None = None          # early exit, or the draft depth with num_speculations > 0
    skip_layers: list = field(default_factory=list)   # layers generated tokens skip (no speculation)
    num_speculations: int = 0
    options: dict = field(default_factory=dict)       # further keywords of generate_speculative
    choose_plan: Callable | None = None    # prompt [1, T] -> skip mask [1, L], instead of skip_layers (timed)


def decode_settings(model, exit_layer, d, plan=(), controllers=None):
    """Full depth, early exit, the checkpoint's trained skip plan (trained_plan), the plan per-sequence controllers
    choose from each prompt (dynamic.py), self-speculation: static (E, d), with a confidence threshold (cap 2d),
    and with the exit layer and cap chosen while generating (exit layer auto). Per-token controllers decide per
    token and layer, which decoding does not support: they get no setting."""
    E = exit_layer or model.n_layer // 2
    model.check_exit_layer(E)
    settings = [Setting("full depth"), Setting(f"exit layer {E}", exit_layer=E)]
    if plan:
        settings.append(Setting(f"skip plan {list(plan)}", skip_layers=list(plan)))
    if controllers is not None and controllers.per_sequence:
        settings.append(Setting("learned controllers, per sequence",
                                choose_plan=lambda idx: sequence_plan(model, controllers, idx)))
    if E < model.n_layer:
        settings += [Setting(f"self-speculation E={E} d={d}", exit_layer=E, num_speculations=d),
                     Setting(f"self-speculation E={E} threshold 0.5 cap {2 * d}", exit_layer=E,
                             num_speculations=2 * d, options={"draft_threshold": 0.5}),
                     Setting(f"self-speculation exit layer auto cap {2 * d}", exit_layer="auto", num_speculations=2 * d)]
    return settings


def decode(model, idx, max_new_tokens, setting, sampling):
    """idx [1, T] -> (generated ids [max_new_tokens]: up to and with the first eos, then eos padding, drafted,
    accepted)."""
    if setting.num_speculations:
        out, stats = generate_speculative(model, idx, max_new_tokens, setting.exit_layer, setting.num_speculations,
                                          **sampling, **setting.options)
        return out[0, idx.shape[1]:], stats["drafted"], stats["accepted"]
    plan = setting.choose_plan(idx) if setting.choose_plan else layer_mask(setting.skip_layers, model.n_layer)
    out = generate(model, idx, max_new_tokens, exit_layer=setting.exit_layer, **sampling, skip_mask=plan.to(idx.device))
    return out[0, idx.shape[1]:], 0, 0


def complete(model, tok, task_list, setting, cfg, device):
    """Generate cfg.num_samples completions per task, one sequence at a time, under one setting ->
    ({task_id: [text, ...]}, seconds spent decoding, tokens generated, drafted, accepted). Prompts keep their
    last block_size - max_new_tokens - 1 tokens; the first task is decoded once untimed (warm-up)."""
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    # a row ends at any end id; ids the tokenizer lacks (a padded vocabulary's rows) are never generated
    sampling = dict(temperature=cfg.temperature, top_k=cfg.top_k, generator=generator, n_tokens=tok.vocab_size())
    keep = model.cfg.block_size - cfg.max_new_tokens - 1
    prompts = [torch.tensor([tok.prefix + tok.encode(t["prompt"])[-keep:]], device=device) for t in task_list]
    decode(model, prompts[0], cfg.max_new_tokens, setting, dict(temperature=0.0, n_tokens=tok.vocab_size()))
    samples, seconds, tokens, drafted, accepted = {}, 0.0, 0, 0, 0
    for task, idx in tqdm(list(zip(task_list, prompts)), desc=setting.name, leave=False):
        for _ in range(cfg.num_samples):
            t0 = time.perf_counter()
            ids, n_drafted, n_accepted = decode(model, idx, cfg.max_new_tokens, setting, sampling)
            seconds += time.perf_counter() - t0
            ids = ids.tolist()
            end = first_end(ids, model.cfg.eos_ids)  # any end id ends the completion
            ended = end is not None
            n_generated = end + 1 if ended else len(ids)  # the end id is generated too
            text = completion_text(tok, idx[0].tolist(), ids[:n_generated - ended])
            samples.setdefault(task["task_id"], []).append(text)
            tokens, drafted, accepted = tokens + n_generated, drafted + n_drafted, accepted + n_accepted
    return samples, seconds, tokens, drafted, accepted


def completion_text(tok, prompt, ids):
    """The text of generated `ids`: decoded with their prompt and the prompt's text cut off, as sample.py does
    (a sentencepiece tokenizer drops the space prefix of a text's first piece: decoded alone, a body's
    first indentation would lose a space)."""
    return tok.decode(prompt + ids)[len(tok.decode(prompt)):]


def score(cfg, task_list, samples):
    """Quality of completions: {"pass@k": ...} for code, {"rouge1", "rouge2", "rougeL"} for summarize."""
    if cfg.task == "summarize":
        return tasks.score_summaries(task_list, samples)
    n = sum(len(v) for v in samples.values())
    with tqdm(total=n, desc="running programs", leave=False) as bar:
        return tasks.score_code(task_list, samples, cfg.workers or None, bar.update, timeout=cfg.timeout)[0]


def report(rows, path, quality):
    """Print the table, write path.csv and path.png (quality against tokens/s)."""
    metrics = list(rows[0]["quality"])
    header = ["setting", *metrics, "tokens/s", "ms/token", "acceptance"]
    table = [[r["setting"], *(f"{r['quality'][m]:.4f}" for m in metrics),
              f"{r['tokens_per_s']:.1f}" if r["tokens_per_s"] else "-",
              f"{r['ms_per_token']:.2f}" if r["ms_per_token"] else "-",
              f"{r['acceptance']:.3f}" if r["acceptance"] is not None else "-"] for r in rows]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for line in table:
        print("| " + " | ".join(line) + " |")

    def write_csv(tmp):
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows([header] + table)
    atomic_write(path + ".csv", write_csv)
    timed = [r for r in rows if r["tokens_per_s"]]
    if not timed:
        return print(f"table in {path}.csv")
    plt = tasks.require("matplotlib.pyplot", "matplotlib", "the plot")
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in timed:
        ax.scatter(r["tokens_per_s"], r["quality"][quality])
        ax.annotate(r["setting"], (r["tokens_per_s"], r["quality"][quality]), fontsize=7)
    ax.set_xlabel("tokens/s")
    ax.set_ylabel(quality)
    ax.set_title(os.path.basename(path), fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path + ".png", lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    print(f"table in {path}.csv, {quality} against tokens/s in {path}.png")


def run_tasks(cfg):
    """--task code|summarize: every decode setting on the same tasks, or --completions scored alone."""
    if cfg.task not in ("code", "summarize"):
        raise ValueError(f"task must be lm, code or summarize, got {cfg.task!r}")
    if not cfg.data:
        raise ValueError(f"--task {cfg.task} needs --data (" + ("humaneval, stdlib" if cfg.task == "code" else "stdlib")
                         + " or a JSONL file)")
    if cfg.num_samples < 1 or (cfg.num_samples > 1 and cfg.temperature <= 0):
        raise ValueError("num_samples must be 1, or more with temperature > 0 (greedy samples are all alike)")
    quality = "pass@1" if cfg.task == "code" else "rouge2"
    if cfg.task == "summarize":
        tasks.require("rouge_score", "rouge-score", "--task summarize")
    if not cfg.completions:
        tasks.require("matplotlib", "matplotlib", "the plot")
    task_list = tasks.code_tasks(cfg.data, cfg.workers or None) if cfg.task == "code" else tasks.summary_tasks(cfg.data)
    task_list = task_list[:cfg.limit] if cfg.limit else task_list
    path = cfg.results or f"{cfg.task}_{os.path.basename(cfg.data).split('.')[0]}"
    if cfg.completions:
        samples = {}
        for r in tasks.check_fields(tasks.read_jsonl(cfg.completions), cfg.completions, ("task_id", "completion")):
            samples.setdefault(r["task_id"], []).append(r["completion"])
        row = dict(setting=f"completions in {cfg.completions}", quality=score(cfg, task_list, samples),
                   tokens_per_s=None, ms_per_token=None, acceptance=None)
        return report([row], path, quality)
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model = load(cfg.ckpt, device)
    tok = load_tokenizer(cfg.ckpt, model.cfg.bos_id, model.cfg.eos_id)
    model.check_vocabulary(tok.vocab_size(), f"the tokenizer in {cfg.ckpt!r}")
    cfg.max_new_tokens = cfg.max_new_tokens or (128 if cfg.task == "code" else 48)
    if not 1 <= cfg.max_new_tokens < model.cfg.block_size - 1:
        raise ValueError(f"max_new_tokens must lie in [1, {model.cfg.block_size - 2}] (the model's context is "
                         f"{model.cfg.block_size}), got {cfg.max_new_tokens}")
    print(f"{cfg.ckpt}: {model.n_layer} layers; {len(task_list)} {cfg.task} tasks from {cfg.data}, "
          f"{cfg.num_samples} sample(s) of {cfg.max_new_tokens} tokens each, temperature {cfg.temperature}")
    has_controllers = os.path.isfile(os.path.join(cfg.ckpt, "controllers.json"))
    controllers = load_controllers(cfg.ckpt, model) if has_controllers else None
    plan = trained_plan(cfg.ckpt, model)
    settings = decode_settings(model, cfg.exit_layer, cfg.num_speculations, plan, controllers)
    if cfg.settings:
        wanted = [w.strip() for w in cfg.settings.split(",")]
        settings = [s for s in settings if any(s.name.startswith(w) for w in wanted)]
        if not settings:
            raise ValueError(f"settings {cfg.settings!r} names none of this model's decode settings (names start "
                             f"with: full depth, exit layer, skip plan, learned controllers, self-speculation)")
    rows = []
    for setting in settings:
        samples, seconds, tokens, drafted, accepted = complete(model, tok, task_list, setting, cfg, device)
        rows.append(dict(setting=setting.name, quality=score(cfg, task_list, samples),
                         tokens_per_s=tokens / seconds, ms_per_token=seconds / tokens * 1e3,
                         acceptance=accepted / max(drafted, 1) if setting.num_speculations else None))
    report(rows, path, quality)


EVAL_RULES = {**{k: at_least(1) for k in ("eval_batches", "micro_batch", "block_size", "num_samples",
                                          "top_k")},
              **{k: at_least(0) for k in ("limit", "temperature", "max_new_tokens", "exit_layer",
                                          "num_speculations", "workers")},
              "timeout": above(0), "device": DEVICE_RULE}


def main():
    cfg = check_values(configure(EvalConfig()), EVAL_RULES)
    if cfg.task != "lm":
        return run_tasks(cfg)
    data_cfg = TrainConfig(dataset="instruct", data_dir=cfg.data_dir, init_from=cfg.ckpt,
                           micro_batch=cfg.micro_batch, block_size=cfg.block_size, seed=cfg.seed)
    _, val_batch, _, _, _ = load_data(data_cfg)
    n = cfg.eval_batches
    model = load(cfg.ckpt)
    L = model.n_layer
    exits = list(cfg.exit_layers) or [L // 4, L // 2, 3 * L // 4]
    if not all(isinstance(E, int) and 1 <= E <= L for E in exits):
        raise ValueError(f"exit_layers must be integers in [1, {L}], got {exits}")
    by_exit, n_tokens = exit_eval(model, val_batch, n, exits)
    rows = [("full depth", 1.0, by_exit[L][0])]
    rows += [(f"early exit at layer {E}", E / L, by_exit[E][0]) for E in exits if E < L]
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
        done = trained_plan(cfg.distill, student)
        if not done:
            raise ValueError(f"--distill {cfg.distill!r} has no distilled layers (no distill.py rows in metrics.jsonl)")
        for name, m in ((f"skip-distilled, skipping {sorted(done)}", student), (f"--ckpt, skipping {sorted(done)}", model)):
            loss, run = masked_eval(m, val_batch, n, lambda i, y, r: response_skip_mask(y, done, L))
            rows.append((name, run, loss))
    print(f"{cfg.ckpt}: {L} layers; {n} validation batches of {cfg.micro_batch} x {cfg.block_size} from {cfg.data_dir}")
    print("| method | layers run | val loss | perplexity |\n|---|---|---|---|")
    for name, run, loss in sorted(rows, key=lambda r: -r[1]):
        print(f"| {name} | {run:.1%} | {loss:.4f} | {math.exp(loss):.2f} |")
    print(f"\nexits on {n_tokens} response tokens (teacher-forced):\n"
          "| exit layer | val loss | greedy token agrees with full depth |\n|---|---|---|")
    for E, (loss, agreement) in sorted(by_exit.items()):
        print(f"| {E} | {loss:.4f} | {agreement:.1%} |")


if __name__ == "__main__":
    run_main(main)
