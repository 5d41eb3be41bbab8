"""
Instruction data in Alpaca format (JSON list or JSONL of {"instruction", "input", "output"}).

    python data/instruct.py          # builds data/stdlib_instruct/{train,val}.jsonl from the stdlib

The default set needs no download: every stdlib function with a docstring becomes a record whose
instruction is its signature and docstring and whose output is its body. Split by file, like the
token corpus. For training, each record is [bos] + prompt + output + [eos] (bos where the tokenizer
adds one: tokenizer.py), truncated to the block; prompt and padding positions get target -100 so only
the response is in the loss. One record per row, right-padded: with causal attention the padding
never reaches a real token.
"""
import argparse
import ast
import functools
import json
import os
import sys
import sysconfig
import textwrap

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.prepare import HERE, is_val, list_files, read_texts  # noqa: E402
import savedir  # noqa: E402
from savedir import atomic_write  # noqa: E402

IGNORE = -100
PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
          "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
PROMPT_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")


TEMPLATE_FILE = "prompt_template.json"  # beside a fine-tuned checkpoint's weights: how it was asked
TEMPLATE = {"prompt": PROMPT, "prompt_with_input": PROMPT_WITH_INPUT}


def format_prompt(record, template=TEMPLATE):
    """An Alpaca record {"instruction", "input" (optional)} -> the prompt text the model is fine-tuned on."""
    text = template["prompt_with_input"] if record.get("input") else template["prompt"]
    return text.format(instruction=record["instruction"], input=record.get("input", ""))


def save_template(out_dir):
    """Write the prompt template next to a checkpoint fine-tuned on instruction data, for sample.py --instruction."""
    atomic_write(os.path.join(out_dir, TEMPLATE_FILE), lambda p: open(p, "w").write(json.dumps(TEMPLATE, indent=2)))


def load_template(ckpt_dir):
    """The prompt template a checkpoint was fine-tuned with (save_template)."""
    path = os.path.join(ckpt_dir, TEMPLATE_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{ckpt_dir!r} has no {TEMPLATE_FILE}: only a checkpoint fine-tuned on instruction data "
                         "(train.py --dataset=instruct) knows how to be asked")
    template = json.load(open(path, encoding="utf-8"))
    if not isinstance(template, dict) or not all(isinstance(template.get(k), str) for k in TEMPLATE):
        raise ValueError(f"{path} must hold the strings {', '.join(TEMPLATE)}")
    return template


# ---- building the stdlib set ----

def documented_functions(source):
    """The function nodes of one Python source file (at any depth) that have a docstring and a body after it."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    return [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and ast.get_docstring(node) is not None and len(node.body) > 1]


def function_records(source):
    """Alpaca records for the documented functions of one Python source file."""
    lines = source.splitlines(keepends=True)
    records = []
    for node in documented_functions(source):
        doc_node = node.body[0]
        header = textwrap.dedent("".join(lines[node.lineno - 1:doc_node.end_lineno]))
        output = textwrap.dedent("".join(lines[doc_node.end_lineno:node.end_lineno]))
        if output.strip() and len(output) < 1500:
            records.append({"instruction": f"Complete this Python function.\n\n{header.rstrip()}",
                            "input": "", "output": output.rstrip() + "\n"})
    return records


def build_stdlib(out_dir, val_percent=5):
    savedir.check_target(out_dir, savedir.INSTRUCT_DATA)
    texts, _ = read_texts(list_files([sysconfig.get_paths()["stdlib"]], (".py",)))
    splits = {"train": [], "val": []}
    for rel, text in texts:
        splits["val" if is_val(rel, val_percent) else "train"].extend(function_records(text))

    def write(nxt):
        for split, records in splits.items():
            with open(os.path.join(nxt, f"{split}.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
    with savedir.claim(out_dir, savedir.INSTRUCT_DATA):  # written as a whole, like data/prepare.py's token sets
        savedir.save(out_dir, savedir.INSTRUCT_DATA, write)
    return {k: len(v) for k, v in splits.items()}


# ---- loading and batching ----

def load_records(path):
    """Records from a .json list or a .jsonl file, each checked for the Alpaca fields: one line naming the
    file and record for bad UTF-8, bad JSON, a field of the wrong type or an empty instruction."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"instruction data {path!r} not found")
    raw = open(path, "rb").read()
    if path.endswith(".json"):
        records = [_parse(path, raw, "the file")]
        if not isinstance(records[0], list):
            raise ValueError(f"{path}: must hold a JSON list of records")
        records = records[0]
    else:
        records = [_parse(path, line, f"line {i + 1}") for i, line in enumerate(raw.split(b"\n")) if line.strip()]
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not isinstance(r.get("instruction"), str) or not isinstance(r.get("output"), str) \
                or not isinstance(r.get("input", ""), str):
            raise ValueError(f"{path}: record {i} needs string fields 'instruction' and 'output' (and 'input', if any)")
        if not r["instruction"].strip():
            raise ValueError(f"{path}: record {i} has an empty instruction")
    return records


def _parse(path, data, where):
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: {where} is not UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: {where} is not valid JSON ({e})") from None


def encode_records(tok, records, block_size, source="records"):
    """[(ids, n_prompt)]: ids = tok.encode_prompt(prompt) + output + [eos], at most block_size + 1 tokens.
    Records whose prompt fills the block are dropped; ValueError if that drops every record."""
    examples, shortest = [], None
    for i, r in enumerate(records):
        prompt = tok.encode_prompt(format_prompt(r))  # bos first where the tokenizer adds one
        ids = (prompt + tok.encode(r["output"]) + [tok.eos_id()])[:block_size + 1]
        if len(prompt) < len(ids):  # some response is left to learn from
            examples.append((ids, len(prompt)))
        if shortest is None or len(prompt) < shortest[1]:
            shortest = (i, len(prompt))
    if records and not examples:
        raise ValueError(f"{source}: every prompt fills the block: the shortest (record {shortest[0]}) has "
                         f"{shortest[1]} tokens with bos, block_size is {block_size}; raise block_size")
    return examples


def make_batch(examples, indices, block_size, pad_id=0):
    """x, y [B, block_size]: y is x shifted by one, -100 on prompt and padding positions."""
    x = torch.full((len(indices), block_size), pad_id, dtype=torch.long)
    y = torch.full((len(indices), block_size), IGNORE, dtype=torch.long)
    for row, i in enumerate(indices):
        ids, n_prompt = examples[i]
        t = torch.tensor(ids)
        x[row, :len(ids) - 1] = t[:-1]
        y[row, n_prompt - 1:len(ids) - 1] = t[n_prompt:]  # predict response tokens (and eos) only
    return x, y


@functools.lru_cache(maxsize=2)
def _permutation(n_examples, seed, epoch):
    return torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()


def epoch_indices(n_examples, start, count, seed):
    """Example indices for global sample positions [start, start+count): a new permutation each epoch."""
    return [_permutation(n_examples, seed, k // n_examples)[k % n_examples] for k in range(start, start + count)]


def main():
    parser = argparse.ArgumentParser(description="Build the stdlib instruction set (Alpaca format).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default=os.path.join(HERE, "stdlib_instruct"), help="output directory")
    args = parser.parse_args()
    counts = build_stdlib(args.out)
    print(f"{args.out}: {counts['train']} train and {counts['val']} val records")


if __name__ == "__main__":
    from configurator import run_main
    run_main(main)
