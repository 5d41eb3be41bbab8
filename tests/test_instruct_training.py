"""Instruction fine-tuning: the loss of a step does not depend on how its rows are split over micro steps
and processes, and rows are encoded with the checkpoint's own special-token ids at every entry point."""
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

import train
from conftest import ROOT
from data.instruct import IGNORE
from model import PRESETS, Transformer

tokenizers = pytest.importorskip("tokenizers")

WORDS = [f"w{i}" for i in range(40)]


def write_tokenizer(path, specials):
    """A word-level tokenizer.json: `specials` (e.g. ["<s>", "<pad>", "</s>", "<unk>"]) first, then WORDS."""
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(path))
    return len(vocab)


def write_records(data_dir, response_lengths):
    """Alpaca records whose responses have the given numbers of words; the val split gets the same records."""
    os.makedirs(data_dir, exist_ok=True)
    records = [{"instruction": f"w{i} w{i + 1}", "input": "", "output": " ".join(WORDS[i:i + n])}
               for i, n in enumerate(response_lengths)]
    for split in ("train", "val"):
        with open(os.path.join(data_dir, f"{split}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    return str(data_dir)


@pytest.fixture(scope="module")
def tiny_instruct(tmp_path_factory):
    """A test-tiny checkpoint with a tokenizer.json, and 4 records with responses of 1, 3, 9 and 24 words."""
    d = tmp_path_factory.mktemp("instruct")
    vocab = write_tokenizer(d / "tokenizer.json", ["<unk>", "<s>", "</s>"])
    torch.manual_seed(0)
    Transformer(replace(PRESETS["test-tiny"], vocab_size=vocab)).save_pretrained(d / "init")
    os.replace(d / "tokenizer.json", d / "init" / "tokenizer.json")
    return str(d / "init"), write_records(d / "data", [1, 3, 9, 24])


def train_args(init, data_dir, out_dir, micro_batch, grad_accum):
    return ["--dataset=instruct", f"--init_from={init}", f"--data_dir={data_dir}", f"--out_dir={out_dir}",
            f"--micro_batch={micro_batch}", f"--grad_accum={grad_accum}", "--block_size=64", "--max_steps=1",
            "--eval_batches=1", "--warmup_steps=1", "--lr=1e-3", "--early_exit_curriculum=none", "--device=cpu"]


def run_train(monkeypatch, args):
    monkeypatch.setattr(sys, "argv", ["train.py", *args])
    train.main()


def step_result(out_dir):
    """(weights after the step, the logged training loss at every exit)."""
    rows = [json.loads(l) for l in open(os.path.join(out_dir, "metrics.jsonl"))]
    return load_file(os.path.join(out_dir, "model.safetensors")), next(r["train_loss"] for r in rows if "train_loss" in r)


def assert_same_step(a, b, tol=1e-5):
    (wa, la), (wb, lb) = a, b
    assert la.keys() == lb.keys() and len(la) >= 3  # several exits in the loss and the log
    assert max(abs(la[e] - lb[e]) for e in la) <= 1e-6, (la, lb)
    diff = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert diff <= tol, f"weights differ by {diff}"


def test_micro_steps_and_ranks_do_not_change_the_step(tiny_instruct, tmp_path, monkeypatch):
    """One step on 4 records with different response lengths: 4 x 1, 2 x 2, 1 x 4 (micro batch x grad_accum)
    and 2 gloo processes x 1 x 2 all take the mean over the step's 37 response tokens (+ 4 eos). Adam's first
    step moves a weight by lr x g / (|g| + 1e-8): where |g| is near 1e-8, fp32 rounding of the sums in another
    order shows as up to 4e-3 x lr, hence lr 1e-3 for a 1e-5 tolerance (a split that changes the gradient's
    direction moves weights by up to 2 x lr)."""
    init, data = tiny_instruct
    results = {}
    for micro_batch, grad_accum in ((4, 1), (2, 2), (1, 4)):
        out = tmp_path / f"{micro_batch}x{grad_accum}"
        run_train(monkeypatch, train_args(init, data, out, micro_batch, grad_accum))
        results[micro_batch, grad_accum] = step_result(out)
    assert_same_step(results[2, 2], results[4, 1])
    assert_same_step(results[1, 4], results[4, 1])

    out = tmp_path / "two_processes"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "train.py",
           *train_args(init, data, out, 1, 2)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_step(step_result(out), results[4, 1])
