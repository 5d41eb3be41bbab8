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


def write_tokenizer(path, specials, bos=None):
    """A word-level tokenizer.json: `specials` (e.g. ["<s>", "<pad>", "</s>", "<unk>"]) first, then WORDS; with
    `bos`, its post-processor puts that token first (as OPT's tokenizer.json puts </s> first)."""
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    if bos is not None:
        tok.post_processor = tokenizers.processors.TemplateProcessing(single=f"{bos} $A",
                                                                      special_tokens=[(bos, vocab[bos])])
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


def converted_checkpoint(family, specials, ids, d):
    """A tiny transformers OPT or Bloom (4 layers) with special-token ids `ids` and a word-level tokenizer.json
    holding `specials` first, converted to ours."""
    from checkpoints_convert import from_hf
    transformers = pytest.importorskip("transformers")
    ids = dict(zip(("bos_token_id", "eos_token_id", "pad_token_id"), ids))
    vocab = write_tokenizer(d / "tokenizer.json", specials, bos=specials[ids["bos_token_id"]])
    if family == "opt":
        hf_cfg = transformers.OPTConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=4, ffn_dim=64,
                                        num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=32, **ids)
    else:
        hf_cfg = transformers.BloomConfig(vocab_size=vocab, hidden_size=32, n_layer=4, n_head=4, **ids)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(hf_cfg).save_pretrained(d)
    from_hf(str(d), str(d / "ours"))
    return str(d / "ours"), ids["bos_token_id"], ids["eos_token_id"]


@pytest.mark.parametrize("family, specials, ids", [
    ("opt", ["<s>", "<pad>", "</s>", "<unk>"], (2, 2, 1)),   # OPT's own: bos = eos = </s> = 2, pad = 1
    # Bloom's own ids (bos 1, eos 2) are also the Llama defaults; this one keeps them elsewhere to tell them apart
    ("bloom", ["<pad>", "</s>", "<unk>", "<s>"], (3, 1, 0)),
])
def test_every_entry_point_encodes_with_the_checkpoints_special_ids(family, specials, ids, tmp_path, monkeypatch):
    import distill
    import dynamic
    import evaluate
    ckpt, bos, eos = converted_checkpoint(family, specials, ids, tmp_path)
    data = write_records(tmp_path / "data", [2, 5, 3, 7])
    batches = []
    make_batch = train.make_batch
    monkeypatch.setattr(train, "make_batch", lambda *a: batches.append(make_batch(*a)) or batches[-1])
    common = [f"--data_dir={data}", "--micro_batch=2", "--block_size=64"]
    entry_points = [
        (train.main, ["--dataset=instruct", f"--init_from={ckpt}", f"--out_dir={tmp_path / 'ft'}", "--max_steps=1",
                      "--eval_batches=1", "--device=cpu"]),
        (dynamic.main, [f"--init_from={ckpt}", f"--out_dir={tmp_path / 'dyn'}", "--max_steps=1", "--eval_batches=1"]),
        (distill.main, ["--dataset=instruct", f"--init_from={ckpt}", f"--out_dir={tmp_path / 'dist'}",
                        "--steps_per_layer=1", "--eval_batches=1"]),
        (evaluate.main, [f"--ckpt={ckpt}", "--eval_batches=1"]),
    ]
    for main, args in entry_points:
        batches.clear()
        monkeypatch.setattr(sys, "argv", ["x.py", *common, *args])
        main()
        assert batches, main.__module__
        for x, y in batches:
            assert x[:, 0].tolist() == [bos] * len(x), (main.__module__, x[:, 0])
            last_target = [row[row != IGNORE][-1].item() for row in y]
            assert last_target == [eos] * len(y), (main.__module__, last_target)
