"""
Generate from a trained model:  python sample.py [--out_dir out] [--prompt "def "] [--exit_layer 12]

--exit_layer E decodes with the first E layers and the shared exit. --skip_layers 3,5,7 skips those
layers (0-based) for generated tokens; without it, a plan stored in the checkpoint's config applies
(--skip_layers none turns it off). --speculative drafts with [0, E) and verifies with the rest;
--draft_skip_layers 3,5,7 (or auto: chosen from the prompts) drafts with every layer but those instead,
for models not trained with LayerSkip; --exit_layer auto chooses E and d every round from the acceptance and
costs measured while generating (d = 0, a full-depth step, where drafting does not pay); --draft_threshold p
stops a round's drafting when the draft's top probability falls below p (--num_speculations is then the cap).
--prompts FILE (a JSON list of strings, or of {"instruction", "input"} records) decodes several prompts as one
batch. --instruction "..." [--input "..."] asks a fine-tuned checkpoint in the prompt template it was trained with.
--chat "message" [--system "..."] asks in the checkpoint's chat template (as transformers' apply_chat_template
renders it, generation prompt added) and prints the reply, which ends at the template's end token; --chat
repeated is a batch of conversations. Prompts are encoded by the checkpoint's tokenizer rules (tokenizer.py):
bos only where the tokenizer adds one, special tokens written in the text as their ids.
A row ends at eos or another of the checkpoint's end ids, or after the token that completes a --stop string
(repeatable; the text is cut before it).
One prompt is printed as it is generated. temperature 0 is greedy; top_k 0 is off.
--sweep times self-speculation over a grid of (exit_layer, num_speculations), one prompt at a time,
prints a table, writes it as CSV and names the fastest setting. --compile runs decode steps as
torch.compile'd graphs, on CUDA recorded as CUDA graphs (prompts of one length).
"""
import csv
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field

import torch

from configurator import configure, run_main
from data.instruct import format_prompt, load_template
from generate import check_sampling, first_end, generate, pad_prompts
from model import Transformer, layer_mask
from savedir import atomic_write
from speculate import generate_speculative
from tokenizer import load_tokenizer


@dataclass
class SampleConfig:
    out_dir: str = "out"             # the checkpoint directory
    prompt: str | None = None        # None: start from the bos token; "FILE:path" reads a file
    prompts: str | None = None       # a JSON file holding a list of prompt strings (or instruction records), one batch
    instruction: str | None = None   # asked in the checkpoint's instruction template (prompt_template.json)
    input: str = ""                  # the instruction's input, if any
    chat: list[str] = field(default_factory=list)  # --chat MESSAGE, repeatable (a batch): the user's message
    system: str | None = None        # the system message of --chat conversations
    stop: list[str] = field(default_factory=list)  # --stop S, repeatable: a row ends where its text contains S;
                                                   # \n, \t and \\ in S are escapes
    num_samples: int = 1             # samples per prompt
    max_new_tokens: int = 200        # tokens generated per sample
    temperature: float = 0.8         # 0: greedy
    top_k: int | None = 200          # sample from the k most likely tokens (None: all)
    top_p: float | None = None       # nucleus sampling (None: off)
    exit_layer: int | str | None = None  # with --speculative also "auto": E and d chosen while generating
    speculative: bool = False        # self-speculative decoding: draft with [0, exit_layer), verify with the rest
    num_speculations: int = 3        # d: the most tokens drafted per round
    draft_threshold: float | None = None  # a row stops drafting for the round when its draft's top probability < this
    draft_skip_layers: str = ""      # draft with every layer but these ("3,5,7"; "auto": chosen from the prompts)
    skip_layers: str = ""            # comma-separated 0-based layers to skip while generating; "none": no plan
    sweep: bool = False              # time self-speculation over sweep_exit_layers x sweep_num_speculations
    sweep_exit_layers: str = ""      # default: up to 6 depths spread over [1, L)
    sweep_num_speculations: str = "1,2,4,6,8"  # the values of d the sweep times
    sweep_csv: str = "sweep.csv"     # where the sweep writes its table
    compile: bool = False            # decode steps as torch.compile'd graphs: 2-4x faster steps (the first call compiles)
    seed: int = 1337                 # sampling
    device: str = "auto"             # auto: cuda if available, else cpu


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
    """The prompt texts of this run: --instruction, --prompts FILE, or --prompt (FILE:path reads one), or [None] for
    bos only. Instructions are put in the template the checkpoint was fine-tuned with."""
    if cfg.instruction is not None and (cfg.prompt is not None or cfg.prompts is not None):
        raise ValueError("--instruction replaces --prompt and --prompts: give one of them")
    if cfg.input and cfg.instruction is None:
        raise ValueError("--input goes with --instruction")
    if cfg.instruction is not None:
        if not cfg.instruction:
            raise ValueError("the instruction is empty")
        return [format_prompt({"instruction": cfg.instruction, "input": cfg.input}, load_template(cfg.out_dir))]
    if cfg.prompts is not None:
        try:
            prompts = json.load(open(cfg.prompts, encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"prompts file {cfg.prompts!r}: {e}") from None
        if not isinstance(prompts, list) or not prompts or not all(
                isinstance(p, str) and p or isinstance(p, dict) and isinstance(p.get("instruction"), str) and p["instruction"]
                for p in prompts):
            raise ValueError(f"prompts file {cfg.prompts!r} must hold a JSON list of non-empty strings or "
                             "{\"instruction\", \"input\"} records")
        if any(isinstance(p, dict) for p in prompts):
            template = load_template(cfg.out_dir)
            prompts = [format_prompt(p, template) if isinstance(p, dict) else p for p in prompts]
        return prompts
    prompt = cfg.prompt
    if prompt is not None and prompt.startswith("FILE:"):
        prompt = open(prompt[5:], encoding="utf-8").read()
    if prompt == "":
        raise ValueError("the prompt is empty; leave --prompt out to start from the bos token")
    return [prompt]


def chat_messages(cfg):
    """--chat / --system -> one conversation ([{"role", "content"}]) per --chat message, or None."""
    if cfg.system is not None and not cfg.chat:
        raise ValueError("--system goes with --chat")
    if not cfg.chat:
        return None
    if cfg.prompt is not None or cfg.prompts is not None or cfg.instruction is not None:
        raise ValueError("--chat replaces --prompt, --prompts and --instruction: give one of them")
    if not all(isinstance(m, str) and m for m in cfg.chat):
        raise ValueError("--chat needs a non-empty message")
    system = [{"role": "system", "content": cfg.system}] if cfg.system is not None else []
    return [system + [{"role": "user", "content": m}] for m in cfg.chat]


def prompt_ids(cfg, tok, model):
    """The prompt ids of this run, encoded by the tokenizer's rules: a chat template (whose end token then ends
    a row too), or texts with the tokenizer's own prefix (bos where it adds one); no prompt: bos alone."""
    chats = chat_messages(cfg)
    if chats is not None:
        end = tok.chat_end_id()
        if end is not None and end not in model.cfg.eos_ids:
            model.cfg.end_ids = [*(model.cfg.end_ids or []), end]
        return [tok.chat_prompt(c) for c in chats]
    return [tok.encode_prompt(t) if t else (tok.prefix or [tok.bos_id()]) for t in read_prompts(cfg)]


def stop_strings(specs):
    """--stop values -> the strings, with the escapes \\n, \\t and \\\\ a shell does not make ("\\ndef" -> newline + def)."""
    if not all(isinstance(s, str) and s for s in specs):
        raise ValueError(f"--stop needs a non-empty string, got {specs!r}")
    escapes = {"n": "\n", "t": "\t", "\\": "\\"}
    return [re.sub(r"\\([nt\\])", lambda m: escapes[m.group(1)], s) for s in specs]


class Completions:
    """The text each row generates after its prompt, and generate()'s `stop` test: a row ends at the token after
    which its text contains a stop string, and its text is cut before that string. With stream=True (one row) the
    text is printed as it grows: decoded with the prompt each time (so sentencepiece byte-fallback pieces join into
    characters), holding back an incomplete character (U+FFFD) and anything that may begin a stop string."""

    def __init__(self, tok, prompts, end_ids, stops, stream=False):
        self.tok, self.prompts, self.stops, self.stream = tok, prompts, stops, stream
        self.end_ids = {end_ids} if isinstance(end_ids, int) else set(end_ids)  # an id or a list
        self.prompt_texts = [tok.decode(p) for p in prompts]
        self.ids = [[] for _ in prompts]  # generated ids so far, per row
        self.printed = 0                  # characters of row 0 printed so far

    def text(self, b, ids):
        """Row b's generated ids (up to its first end id) -> (their text, cut before a stop string; whether it
        was)."""
        ids = ids[:first_end(ids, self.end_ids)]
        text = self.tok.decode(self.prompts[b] + ids)[len(self.prompt_texts[b]):]
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=None)
        return (text, False) if cut is None else (text[:cut], True)

    def __call__(self, b, new):
        """Row b accepted the ids `new` -> how many of them it keeps if it ends at a stop string, else None."""
        kept = None
        if self.text(b, self.ids[b] + new)[1]:
            kept = next(m for m in range(1, len(new) + 1) if self.text(b, self.ids[b] + new[:m])[1])
        self.ids[b] += new[:kept]
        if self.stream and b == 0:
            self.print_new(kept is not None)
        return kept

    def print_new(self, final):
        text, _ = self.text(0, self.ids[0])
        if not final:  # hold back an incomplete character and a possible start of a stop string
            text = text.rstrip("\ufffd")
            text = text[:len(text) - max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])),
                                         default=0)]
        print(text[self.printed:], end="", flush=True)
        self.printed = max(self.printed, len(text))


def sweep(cfg, model, prompts, sampling):
    """Time plain decoding and self-speculation for every (E, d), averaged over prompts run one at a time."""
    L = model.n_layer
    spread = sorted({max(1, round(i * L / 6)) for i in range(1, 6)} | {1})
    exits = parse_layers(cfg.sweep_exit_layers, "sweep_exit_layers", 1, L - 1) if cfg.sweep_exit_layers else spread
    ds = parse_layers(cfg.sweep_num_speculations, "sweep_num_speculations", 1, cfg.max_new_tokens)
    n = cfg.max_new_tokens
    sampling = dict(sampling, stop_at_eos=False)  # every setting timed over n tokens

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
    check_sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p)
    if cfg.speculative and cfg.skip_layers:
        raise ValueError("--skip_layers is a plan for plain decoding; a speculative draft skips --draft_skip_layers")
    if isinstance(cfg.exit_layer, str) and not (cfg.exit_layer == "auto" and cfg.speculative):
        raise ValueError(f"exit_layer must be an integer (or auto, with --speculative), got {cfg.exit_layer!r}")
    stops = stop_strings(cfg.stop)
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if not os.path.isdir(cfg.out_dir):
        raise FileNotFoundError(f"no checkpoint directory {cfg.out_dir!r}: train one first (python train.py)")
    model = Transformer.from_pretrained(cfg.out_dir, device=device)
    if cfg.exit_layer not in (None, "auto"):
        model.check_exit_layer(cfg.exit_layer)
    skip_mask = parse_skip_layers(cfg.skip_layers, model.n_layer)
    tok = load_tokenizer(cfg.out_dir, model.cfg.bos_id, model.cfg.eos_id)
    model.check_vocabulary(tok.vocab_size(), f"the tokenizer in {cfg.out_dir!r}")
    ids = [p for p in prompt_ids(cfg, tok, model) for _ in range(cfg.num_samples)]
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    sampling = dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, generator=generator,
                    compile=cfg.compile, n_tokens=tok.vocab_size())
    if cfg.sweep:
        return sweep(cfg, model, [torch.tensor([p], device=device) for p in ids], sampling)
    idx, lens = pad_prompts(ids)
    idx = idx.to(device)
    if cfg.speculative:  # generate_speculative checks the draft and its values itself
        plan = cfg.draft_skip_layers
        if plan and plan != "auto":
            plan = parse_layers(plan, "draft_skip_layers", 0, model.n_layer - 1)
        draft = f"exit layer {cfg.exit_layer}" if cfg.exit_layer is not None else f"skipping layers {plan}"
        header = f"self-speculative: draft {draft}, d={cfg.num_speculations}"
        header += f", threshold {cfg.draft_threshold}" if cfg.draft_threshold is not None else ""
    else:
        plan = model.cfg.skip_layers if skip_mask is None else skip_mask.nonzero()[:, 0].tolist()
        header = f"exit layer {cfg.exit_layer}" if cfg.exit_layer else f"all {model.n_layer} layers"
        header += f", skipping layers {plan}" if plan else ""
    stream = len(ids) == 1 and cfg.max_new_tokens > 0
    completions = Completions(tok, ids, model.cfg.eos_ids, stops, stream)
    if stream:
        print(f"---------- {header}")
        print("" if cfg.chat else completions.prompt_texts[0], end="", flush=True)
    t0 = time.perf_counter()
    stop = completions if stops or stream else None
    if cfg.speculative:
        out, stats = generate_speculative(model, idx, cfg.max_new_tokens, cfg.exit_layer, cfg.num_speculations,
                                          draft_skip_layers=plan or None, draft_threshold=cfg.draft_threshold,
                                          prompt_lens=lens, stop=stop, **sampling)
        if "exit_layers" in stats:
            header += f", exit layers used (rounds; 0: full-depth steps) {stats['exit_layers']}"
        elif plan == "auto":
            header += f" {stats['draft_skip_layers']}"
        header += f", acceptance {stats['acceptance_rate']:.1%}"
    else:
        out = generate(model, idx, cfg.max_new_tokens, prompt_lens=lens, exit_layer=cfg.exit_layer,
                       skip_mask=skip_mask, stop=stop, **sampling)
    dt = time.perf_counter() - t0
    generated = [row[n:n + cfg.max_new_tokens] for row, n in zip(out.tolist(), lens.tolist())]
    ends = [first_end(g, model.cfg.eos_ids) for g in generated]
    lengths = [len(g) if end is None else end + 1 for g, end in zip(generated, ends)]
    for b, g in enumerate(generated):
        text, _ = completions.text(b, g)
        if stream:
            print(text[completions.printed:])
        else:
            print(f"---------- {header}")
            print(("" if cfg.chat else completions.prompt_texts[b]) + text)
    print(f"---------- {sum(lengths)} tokens in {dt:.2f} s: {dt / max(max(lengths), 1) * 1e3:.1f} ms/step, "
          f"{sum(lengths) / dt:.1f} tokens/s" + (f", {header}" if stream else ""), file=sys.stderr)


if __name__ == "__main__":
    run_main(main)
