"""Every bad input is one line, and faults never cost a good checkpoint.

Entry points run in-process (sys.argv patched, main() through configurator.run_main): each case asserts a
non-zero exit, one line naming the problem, no traceback, and no file added, changed or lost in the output
directory. The fault tests inject a kill at every step of a save, a NaN run, a full disk (RLIMIT_FSIZE in a
child process), a second run on one out_dir and a kill inside data/prepare.py; each leaves a directory that
verifies and resumes bitwise-exactly.
"""
import contextlib
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, call_main
import checkpoints_convert
import distill
import dynamic
import evaluate
import savedir
import sample
import train
from data import prepare
from model import PRESETS, Transformer

TINY = ["--model=test-tiny", "--block_size=32", "--micro_batch=4", "--eval_batches=1", "--warmup_steps=1",
        "--eval_interval=2"]


class Killed(BaseException):
    """A kill -9 at this point: nothing after it runs (no except clause catches it)."""


def run(main, *argv):
    """(exit code, the error line or '', stderr) of main() run as `script argv...` (conftest.call_main)."""
    code, message, _, stderr = call_main(main, ["script", *map(str, argv)])
    return code, message, stderr


def assert_one_line(result, *words):
    code, message, stderr = result
    assert code != 0, stderr[-2000:]
    assert message.startswith("error: ") and "\n" not in message, message
    assert "Traceback" not in stderr, stderr
    for w in words:
        assert w in message, message


def snapshot(d):
    """{relative path: sha256} of every file under d (the lock file's content is the holder's pid, not data)."""
    if not os.path.isdir(d):
        return None
    out = {}
    for dirpath, _, names in os.walk(d):
        for n in names:
            path = os.path.join(dirpath, n)
            out[os.path.relpath(path, d)] = "" if n == savedir.LOCK else hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def train_args(data, out, *extra):
    return [*TINY, f"--data_dir={data}", f"--out_dir={out}", *extra]


# ---- shared inputs: a small prepared corpus, a trained checkpoint, a plain (manifest-less) checkpoint ----

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    prepare.prepare([os.path.join(ROOT, f) for f in ("model.py", "train.py", "generate.py")], str(d / "tokens"),
                    vocab_size=600)
    inst = d / "instruct"
    inst.mkdir()
    rec = {"instruction": "Add two numbers.", "input": "", "output": "return a + b\n"}
    for split in ("train", "val"):
        (inst / f"{split}.jsonl").write_text("\n".join(json.dumps(rec) for _ in range(4)) + "\n")
    # a token data set whose tokenizer has the same size (600) but was trained on other files
    prepare.prepare([os.path.join(ROOT, f) for f in ("sample.py", "evaluate.py", "checkpoints_convert.py")],
                    str(d / "other"), vocab_size=600)
    return str(d / "tokens"), str(inst), str(d / "other")


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """test-tiny trained 2 steps (checkpoint at step 2), and the same run resumed to step 3."""
    base = tmp_path_factory.mktemp("trained")
    step2, step3 = str(base / "step2"), str(base / "step3")
    assert run(train.main, *train_args(data[0], step2, "--max_steps=2"))[0] == 0
    shutil.copytree(step2, step3)
    assert run(train.main, *train_args(data[0], step3, "--max_steps=3", "--init_from=resume"))[0] == 0
    return step2, step3


@pytest.fixture(scope="module")
def plain(data, tmp_path_factory):
    """A checkpoint as save_pretrained writes it (no manifest), with the data's tokenizer."""
    d = tmp_path_factory.mktemp("plain")
    torch.manual_seed(0)
    Transformer(replace(PRESETS["test-tiny"], vocab_size=600)).save_pretrained(str(d))
    shutil.copy(os.path.join(data[0], "tokenizer.model"), d)
    return str(d)


# ---- the table: (name, entry point, how to build the input, argv, words the line must hold) ----
# `make(tmp, data, trained, plain)` returns (argv, the directory that must not change)

def bad_train_value(*flags):  # a short run, should a value be accepted
    return lambda tmp, data, trained, plain: (train_args(data[0], tmp / "out", "--max_steps=2", *flags), tmp / "out")


def config_file(text):
    def make(tmp, data, trained, plain):
        (tmp / "cfg.py").write_text(text)
        return [str(tmp / "cfg.py"), *train_args(data[0], tmp / "out", "--max_steps=2")], tmp / "out"
    return make


def data_copy(edit):
    """train.py on a copy of the token data with edit(dir) applied (its manifest removed: a hand-made set)."""
    def make(tmp, data, trained, plain):
        d = tmp / "data"
        shutil.copytree(data[0], d)
        os.remove(d / savedir.MANIFEST)
        edit(d)
        return train_args(d, tmp / "out", "--max_steps=2"), tmp / "out"
    return make


def tokens(d, split, ids, dtype="uint16"):
    np.array(ids, dtype=dtype).tofile(d / f"{split}.bin")


def prepared(args):
    def make(tmp, data, trained, plain):
        return [*[a(tmp) if callable(a) else a for a in args], "--out", tmp / "out"], tmp / "out"
    return make


def nul_files(tmp):
    (tmp / "nul").mkdir(exist_ok=True)
    for n in ("a.py", "b.py"):
        (tmp / "nul" / n).write_bytes(b"\0" * 1000)
    return tmp / "nul"


def records(lines, *flags):
    """train.py --dataset=instruct on a train.jsonl of `lines` (bytes or records)."""
    def make(tmp, data, trained, plain):
        d = tmp / "inst"
        shutil.copytree(data[1], d)
        body = b"\n".join(l if isinstance(l, bytes) else json.dumps(l).encode() for l in lines)
        (d / "train.jsonl").write_bytes(body + b"\n")
        return train_args(d, tmp / "out", "--max_steps=2", "--dataset=instruct",
                          f"--tokenizer={data[0]}/tokenizer.model", *flags), tmp / "out"
    return make


GOOD = {"instruction": "Add.", "input": "", "output": "return a + b\n"}


def checkpoint_copy(edit):
    """sample.py on a copy of the plain checkpoint with edit(dir) applied."""
    def make(tmp, data, trained, plain):
        d = tmp / "ckpt"
        shutil.copytree(plain, d)
        edit(d)
        return [f"--out_dir={d}", "--max_new_tokens=2"], d
    return make


def edit_config(**changes):
    def edit(d):
        cfg = json.load(open(d / "config.json"))
        cfg.update(changes)
        (d / "config.json").write_text(json.dumps(cfg))
    return edit


def edit_tensor(name, change):
    def edit(d):
        state = load_file(d / "model.safetensors")
        state[name] = change(state[name])
        save_file(state, d / "model.safetensors")
    return edit


def resumed(edit, *flags):
    """train.py --init_from=resume on a copy of the step-2 checkpoint with edit(dir) applied."""
    def make(tmp, data, trained, plain):
        d = tmp / "run"
        shutil.copytree(trained[0], d)
        edit(d)
        return train_args(data[0], d, "--max_steps=3", "--init_from=resume", *flags), d
    return make


def write(rel, data, offset=None):
    def edit(d):
        if offset is None:
            (d / rel).write_bytes(data)
        else:
            with open(d / rel, "r+b") as f:
                f.seek(offset)
                f.write(data)
    return edit


def truncate(rel, size):
    return lambda d: os.truncate(d / rel, size)


def hf_config(**changes):
    def make(tmp, data, trained, plain):
        d = tmp / "hf"
        d.mkdir()
        hf = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64,
              "max_position_embeddings": 64, "rms_norm_eps": 1e-5}
        hf.update(changes)
        (d / "config.json").write_text(json.dumps({k: v for k, v in hf.items() if v is not None}))
        return ["--from_hf", d, "--out", tmp / "out"], tmp / "out"
    return make


def changed_data(tmp, data, trained, plain):
    """A prepared data set (with its manifest) whose val.bin was rewritten afterwards."""
    shutil.copytree(data[0], tmp / "d")
    tokens(tmp / "d", "val", [5] * 500)
    return train_args(tmp / "d", tmp / "out", "--max_steps=2"), tmp / "out"


def changed_checkpoint(tmp, data, trained, plain):
    """A checkpoint train.py saved (with its manifest), 64 bytes of its weights overwritten afterwards."""
    shutil.copytree(trained[0], tmp / "c")
    write("model.safetensors", b"\0" * 64, 4096)(tmp / "c")
    return [f"--out_dir={tmp / 'c'}"], tmp / "c"


def copy_of(which, to="ck"):
    """A copy of one of the shared inputs (e.g. `lambda trained: trained[0]`) in tmp/to."""
    def make_copy(tmp, data, trained, plain):
        shutil.copytree(which(data, trained, plain), tmp / to)
        return tmp / to
    return make_copy


def into(main_args, target):
    """argv from main_args(tmp, data, trained, plain, target dir) and the target, which must not change."""
    def make(tmp, data, trained, plain):
        d = target(tmp, data, trained, plain)
        return main_args(tmp, data, trained, plain, d), d
    return make


CHECKPOINT = copy_of(lambda data, trained, plain: trained[0])
TOKEN_DATA = copy_of(lambda data, trained, plain: data[0])
SOURCES = [os.path.join(ROOT, f) for f in ("model.py", "train.py")]


def a_file(tmp, *_):
    (tmp / "file").write_text("not a directory")
    return tmp / "file"


def a_directory(tmp, *_):
    (tmp / "dir").mkdir()
    return tmp / "dir"


def fresh_checkout_layerskip(tmp, *_):
    """README's LayerSkip fine-tune before its converted TinyLlama exists."""
    if os.path.exists(os.path.join(ROOT, "ckpt", "tinyllama")):
        pytest.skip("this checkout holds ckpt/tinyllama")
    return ["config/layerskip.py", f"--out_dir={tmp / 'out'}"], tmp / "out"


def distilled(*flags):
    return lambda tmp, data, trained, plain: (
        [f"--init_from={plain}", f"--data_dir={data[0]}", f"--out_dir={tmp / 'out'}", "--max_steps=2",
         "--block_size=32", "--eval_batches=1", *flags], tmp / "out")


CASES = [
    # train.py: every TrainConfig value where it enters
    ("max_steps 0", train.main, bad_train_value("--max_steps=0"), ["max_steps=0", ">= 1"]),
    ("max_steps -5", train.main, bad_train_value("--max_steps=-5"), ["max_steps=-5"]),
    ("micro_batch -1", train.main, bad_train_value("--micro_batch=-1"), ["micro_batch=-1"]),
    ("block_size 0", train.main, bad_train_value("--block_size=0"), ["block_size=0"]),
    ("grad_accum 0", train.main, bad_train_value("--grad_accum=0"), ["grad_accum=0"]),
    ("eval_interval 0", train.main, bad_train_value("--eval_interval=0"), ["eval_interval=0"]),
    ("exit_period 0", train.main, bad_train_value("--exit_period=0", "--early_exit_curriculum=rotational"), ["exit_period=0"]),
    ("p_max 1.5", train.main, bad_train_value("--p_max=1.5"), ["p_max=1.5", "[0, 1)"]),
    ("warmup_steps -10", train.main, bad_train_value("--warmup_steps=-10"), ["warmup_steps=-10", ">= 0"]),
    ("eval_batches 0", train.main, bad_train_value("--eval_batches=0"), ["eval_batches=0"]),
    ("log_interval 0", train.main, bad_train_value("--log_interval=0"), ["log_interval=0"]),
    ("lr_decay_steps 0", train.main, bad_train_value("--lr_decay_steps=0"), ["lr_decay_steps=0"]),
    ("lr negative", train.main, bad_train_value("--lr=-1"), ["lr=-1"]),
    ("beta2 1", train.main, bad_train_value("--beta2=1.0"), ["beta2=1.0"]),
    ("grad_clip negative", train.main, bad_train_value("--grad_clip=-1"), ["grad_clip"]),
    ("weight_decay negative", train.main, bad_train_value("--weight_decay=-0.1"), ["weight_decay"]),
    ("epochs 0", train.main, bad_train_value("--epochs=0"), ["epochs=0", "> 0"]),
    ("skip_speedup 0.5", train.main, bad_train_value("--skip_speedup=0.5"), ["skip_speedup=0.5"]),
    ("dataset unknown", train.main, bad_train_value("--dataset=csv"), ["dataset='csv'", "tokens"]),
    ("model unknown", train.main, bad_train_value("--model=gpt5"), ["model='gpt5'", "test-tiny"]),
    ("dropout_scale", train.main, bad_train_value("--dropout_scale=cubic"), ["dropout_scale"]),
    ("dropout_curriculum", train.main, bad_train_value("--dropout_curriculum=x"), ["dropout_curriculum"]),
    ("early_exit_curriculum", train.main, bad_train_value("--early_exit_curriculum=x"), ["early_exit_curriculum"]),
    ("n_head 0", train.main, bad_train_value("--n_head=0"), ["n_head=0"]),
    ("n_head 3 does not divide", train.main, bad_train_value("--n_head=3"), ["n_embd (64)", "n_head (3)"]),
    ("n_layer 0", train.main, bad_train_value("--n_layer=0"), ["n_layer=0"]),
    ("device tpu", train.main, bad_train_value("--device=tpu"), ["device='tpu'"]),
    ("eval_exits out of range", train.main, bad_train_value("--eval_exits=9"), ["eval_exits", "[1, 4]"]),
    ("unknown key", train.main, bad_train_value("--max_step=3"), ["max_step"]),
    ("wrong type", train.main, bad_train_value("--max_steps=three"), ["max_steps", "int"]),
    ("config file syntax error", train.main, config_file("max_steps = 3\nmax_steps = = 3\n"), ["cfg.py, line 2", "syntax"]),
    ("config file undefined name", train.main, config_file("max_steps = steps\n"), ["cfg.py, line 1", "NameError"]),
    ("config file bad value", train.main, config_file("p_max = 2.0\n"), ["p_max=2.0"]),
    ("config file infinite lr", train.main, config_file("lr = float('inf')\n"), ["lr=inf", ">= 0"]),
    ("config file missing", train.main, lambda tmp, *_: (["nope.py"], tmp / "out"), ["nope.py", "not found"]),
    # train.py: token data
    ("meta.json garbage", train.main, data_copy(write("meta.json", b"{vocab")), ["meta.json", "not valid JSON"]),
    ("meta.json a list", train.main, data_copy(write("meta.json", b"[]")), ["meta.json", "vocab_size"]),
    ("meta.json dtype", train.main, data_copy(write("meta.json", b'{"vocab_size": 600, "dtype": "int8"}')), ["dtype"]),
    ("train.bin empty", train.main, data_copy(write("train.bin", b"")), ["train.bin", "0 tokens"]),
    ("train.bin odd length", train.main, data_copy(write("train.bin", b"\1\0" * 100 + b"\1")), ["train.bin", "201 bytes"]),
    ("train.bin shorter than a window", train.main, data_copy(lambda d: tokens(d, "train", [1] * 20)), ["train.bin", "20 tokens", "33"]),
    ("ids beyond the vocabulary", train.main, data_copy(lambda d: tokens(d, "train", [60000] * 100)), ["60000", "vocab_size 600"]),
    ("val.bin missing", train.main, data_copy(lambda d: os.remove(d / "val.bin")), ["val.bin"]),
    ("data set changed after prepare", train.main, changed_data, ["val.bin", "checksum"]),
    ("data dir missing", train.main, lambda tmp, data, *_: (train_args(tmp / "none", tmp / "out"), tmp / "out"), ["none"]),
    # data/prepare.py
    ("prepare: files of NUL bytes", prepare.main, prepared([nul_files]), ["2 files of UTF-8 text", "found 0"]),
    ("prepare: vocab_size 10", prepare.main, prepared([os.path.join(ROOT, "model.py"), os.path.join(ROOT, "train.py"),
                                                       "--vocab_size=10"]), ["vocab_size 10", "smaller"]),
    ("prepare: vocab_size too large", prepare.main, prepared([os.path.join(ROOT, "model.py"), os.path.join(ROOT, "train.py"),
                                                              "--vocab_size=100000"]), ["vocab_size 100000", "too high"]),
    ("prepare: val_percent 100", prepare.main, prepared([os.path.join(ROOT, "model.py"), "--val_percent=100"]), ["val_percent 100"]),
    ("prepare: no such path", prepare.main, prepared([lambda tmp: tmp / "none"]), ["none"]),
    # instruction data (train.py --dataset=instruct; distill.py and dynamic.py load it the same way)
    ("record: instruction an int", train.main, records([GOOD, {"instruction": 3, "output": "x"}]), ["train.jsonl", "record 1"]),
    ("record: output a list", train.main, records([{"instruction": "a", "output": ["x"]}]), ["record 0", "'output'"]),
    ("record: input a number", train.main, records([{"instruction": "a", "input": 1, "output": "x"}]), ["record 0", "'input'"]),
    ("record: empty instruction", train.main, records([GOOD, GOOD, {"instruction": "  ", "output": "x"}]), ["record 2", "empty instruction"]),
    ("record: bad encoding", train.main, records([GOOD, b'{"instruction": "caf\xe9", "output": "x"}']), ["line 2", "not UTF-8"]),
    ("record: bad JSON", train.main, records([GOOD, b'{"instruction": ']), ["line 2", "not valid JSON"]),
    ("record: not an object", train.main, records([GOOD, [1, 2]]), ["record 1"]),
    ("block shorter than every prompt", train.main, records([GOOD], "--block_size=8"),
     ["every prompt", "record 0", "block_size is 8"]),
    ("distill: block shorter than every prompt", distill.main,
     lambda tmp, data, trained, plain: ([f"--init_from={plain}", f"--data_dir={data[1]}", "--dataset=instruct",
                                         "--block_size=8", f"--out_dir={tmp / 'out'}"], tmp / "out"),
     ["every prompt", "block_size is 8"]),
    ("distill: kl_weight negative", distill.main, distilled("--kl_weight=-1"), ["kl_weight=-1"]),
    ("distill: steps_per_layer 0", distill.main, distilled("--steps_per_layer=0"), ["steps_per_layer=0"]),
    ("dynamic: budget 0", dynamic.main, distilled("--budget=0"), ["budget=0"]),
    ("dynamic: tau 0", dynamic.main, distilled("--tau=0"), ["tau=0"]),
    # checkpoints (sample.py loads through Transformer.from_pretrained)
    ("weights: int64 tok_emb", sample.main, checkpoint_copy(edit_tensor("tok_emb.weight", lambda t: t.long())),
     ["tok_emb.weight", "int64"]),
    ("weights: NaN in norm.weight", sample.main, checkpoint_copy(edit_tensor("norm.weight", lambda t: t * float("nan"))),
     ["norm.weight", "NaN"]),
    ("weights: inf in a layer", sample.main, checkpoint_copy(edit_tensor("layers.1.mlp.w_down.weight", lambda t: t / 0)),
     ["layers.1.mlp.w_down.weight"]),
    ("config: n_layer a string", sample.main, checkpoint_copy(edit_config(n_layer="4")), ["config.json", "n_layer", "int"]),
    ("config: a list", sample.main, checkpoint_copy(write("config.json", b"[]")), ["config.json", "JSON object"]),
    ("config: n_head 0", sample.main, checkpoint_copy(edit_config(n_head=0)), ["config.json", "n_head=0"]),
    ("config: n_kv_head 3", sample.main, checkpoint_copy(edit_config(n_kv_head=3)), ["n_kv_head (3)"]),
    ("config: norm_eps 0", sample.main, checkpoint_copy(edit_config(norm_eps=0)), ["norm_eps=0"]),
    ("config: unknown key", sample.main, checkpoint_copy(edit_config(n_layers=4)), ["n_layers"]),
    ("config: not JSON", sample.main, checkpoint_copy(write("config.json", b"{")), ["config.json", "not valid JSON"]),
    ("config: mlp unknown", sample.main, checkpoint_copy(edit_config(mlp="tanh")), ["mlp='tanh'"]),
    ("weights: truncated safetensors", sample.main, checkpoint_copy(truncate("model.safetensors", 100)), ["model.safetensors"]),
    ("tokenizer truncated", sample.main, checkpoint_copy(truncate("tokenizer.model", 3000)), ["tokenizer.model", "not a valid"]),
    ("saved checkpoint changed", sample.main, changed_checkpoint, ["model.safetensors", "checksum"]),
    # resume: the state must be the saved one and fit the model's config
    ("resume: config.json edited to 2 layers", train.main, resumed(edit_config(n_layer=2)), ["config.json", "checksum"]),
    ("resume: zeros inside a shard", train.main, resumed(write("train_state/__0_0.distcp", b"\0" * 4096, 8192)),
     ["__0_0.distcp", "checksum"]),
    ("resume: garbage step.json", train.main, resumed(write("train_state/step.json", b"garbage")), ["step.json"]),
    ("resume: truncated shard", train.main, resumed(truncate("train_state/__0_0.distcp", 1000)), ["__0_0.distcp"]),
    ("resume: garbage .metadata", train.main, resumed(write("train_state/.metadata", b"garbage")), [".metadata"]),
    ("resume: manifest garbage", train.main, resumed(write(savedir.MANIFEST, b"{")), ["manifest.json", "damaged"]),
    ("resume: no checkpoint", train.main, lambda tmp, data, *_: (train_args(data[0], tmp / "out", "--init_from=resume"),
                                                                 tmp / "out"), ["cannot resume"]),
    ("resume: bad TrainConfig value", train.main, resumed(lambda d: None, "--grad_accum=0"), ["grad_accum=0"]),
    ("resume: another tokenizer of the same size", train.main,
     lambda tmp, data, trained, plain: resumed(lambda d: None)(tmp, data[2:], trained, plain),
     ["tokenizer", "is not the one", "trained with"]),
    # a save replaces only a unit of its own kind, never the run's input (savedir.check_target)
    ("prepare: --out holds a checkpoint", prepare.main,
     into(lambda tmp, d, t, p, ck: [*SOURCES, "--vocab_size=512", "--out", ck], CHECKPOINT), ["holds a checkpoint"]),
    ("prepare: --out is a source", prepare.main,
     into(lambda tmp, d, t, p, src: [src, "--out", src], TOKEN_DATA), ["is this run's source"]),
    ("train: out_dir is the data_dir", train.main,
     into(lambda tmp, d, t, p, dd: [f"--init_from={p}", *train_args(dd, dd, "--max_steps=2")], TOKEN_DATA),
     ["is this run's data_dir"]),
    ("train: out_dir holds a data set", train.main,
     into(lambda tmp, d, t, p, dd: train_args(d[0], dd, "--max_steps=2"), TOKEN_DATA), ["holds a token data set"]),
    ("train: out_dir is init_from", train.main,
     into(lambda tmp, d, t, p, ck: [f"--init_from={ck}", *train_args(d[0], ck, "--max_steps=2")], CHECKPOINT),
     ["is this run's init_from"]),
    ("train: out_dir holds files of no unit", train.main,
     into(lambda tmp, d, t, p, x: train_args(d[0], x, "--max_steps=2"), copy_of(lambda d, t, p: p)),
     ["holds files that no saved unit owns", "config.json"]),
    ("train: out_dir is a file", train.main,
     into(lambda tmp, d, t, p, f: train_args(d[0], f, "--max_steps=2"), a_file), ["is a file, not a directory"]),
    ("distill: the student over its teacher", distill.main,
     into(lambda tmp, d, t, p, ck: [f"--init_from={ck}", f"--data_dir={d[0]}", f"--out_dir={ck}", "--max_steps=2",
                                    "--block_size=32"], CHECKPOINT), ["is this run's init_from"]),
    ("distill: out_dir holds a checkpoint", distill.main,
     into(lambda tmp, d, t, p, ck: [f"--init_from={p}", f"--data_dir={d[0]}", f"--out_dir={ck}", "--block_size=32"],
          CHECKPOINT), ["holds a checkpoint"]),
    ("dynamic: out_dir holds a checkpoint", dynamic.main,
     into(lambda tmp, d, t, p, ck: [f"--init_from={p}", f"--data_dir={d[1]}", f"--out_dir={ck}", "--block_size=32",
                                    f"--tokenizer={d[0]}/tokenizer.model"], CHECKPOINT), ["holds a checkpoint"]),
    ("train: config/layerskip.py without the converted checkpoint", train.main,
     fresh_checkout_layerskip,
     ["ckpt/tinyllama", "python checkpoints_convert.py --from_hf", "--out ckpt/tinyllama"]),
    # a file where a directory is expected (configurator.run_main: every OSError is one line naming the path)
    ("sample: --prompt=FILE:<a directory>", sample.main,
     into(lambda tmp, d, t, p, dd: [f"--out_dir={p}", f"--prompt=FILE:{dd}", "--max_new_tokens=2"], a_directory),
     ["Is a directory", "dir"]),
    # evaluate.py: every value where it enters
    ("evaluate: timeout 0", evaluate.main, lambda tmp, *_: (["--task=code", "--data=x.jsonl", "--timeout=0"], tmp),
     ["timeout=0", "> 0"]),
    ("evaluate: limit -1", evaluate.main, lambda tmp, *_: (["--task=code", "--data=x.jsonl", "--limit=-1"], tmp),
     ["limit=-1", ">= 0"]),
    ("evaluate: num_samples 0", evaluate.main, lambda tmp, *_: (["--num_samples=0"], tmp), ["num_samples=0"]),
    ("evaluate: top_k 0", evaluate.main, lambda tmp, *_: (["--top_k=0"], tmp), ["top_k=0"]),
    ("evaluate: temperature -1", evaluate.main, lambda tmp, *_: (["--temperature=-1"], tmp), ["temperature=-1"]),
    ("evaluate: workers -2", evaluate.main, lambda tmp, *_: (["--workers=-2"], tmp), ["workers=-2"]),
    ("prepare: vocab_size 0", prepare.main, prepared([*SOURCES, "--vocab_size=0"]), ["--vocab_size 0", ">= 1"]),
    ("distill: max_val_loss 0", distill.main, distilled("--max_val_loss=0"), ["max_val_loss=0", "> 0"]),
    # checkpoints_convert.py
    ("convert: bos_token_id -5", checkpoints_convert.main, hf_config(bos_token_id=-5), ["bos_id=-5", "[0, 63]"]),
    ("convert: eos_token_id beyond the vocabulary", checkpoints_convert.main, hf_config(eos_token_id=64), ["eos_id=64"]),
    ("convert: linear rope scaling without a factor", checkpoints_convert.main,
     hf_config(rope_scaling={"rope_type": "linear"}), ["rope_scaling", "'linear'", "factor"]),
    ("convert: llama3 rope scaling without its frequencies", checkpoints_convert.main,
     hf_config(rope_scaling={"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 32}),
     ["low_freq_factor", "high_freq_factor"]),
    ("convert: block_size 0", checkpoints_convert.main,
     lambda tmp, *a: ([*hf_config()(tmp, *a)[0], "--block_size=0"], tmp / "out"), ["--block_size 0"]),
    ("convert: no num_hidden_layers", checkpoints_convert.main, hf_config(num_hidden_layers=None), ["num_hidden_layers"]),
    ("convert: num_attention_heads 0", checkpoints_convert.main, hf_config(num_attention_heads=0), ["num_attention_heads=0"]),
    ("convert: hidden_size a string", checkpoints_convert.main, hf_config(hidden_size="32"), ["hidden_size='32'"]),
    ("convert: unknown model_type", checkpoints_convert.main, hf_config(model_type="mamba"), ["mamba"]),
    ("convert: no weights", checkpoints_convert.main, hf_config(), ["hf"]),
]


@pytest.mark.parametrize("name, main, make, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(name, main, make, words, tmp_path, data, trained, plain):
    argv, out = make(tmp_path, data, trained, plain)
    before = snapshot(out)
    assert_one_line(run(main, *argv), *words)
    assert snapshot(out) == before


def test_the_table_is_large():
    assert len(CASES) >= 60


def test_mixed_float_dtypes_are_cast(plain, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(plain, d)
    edit_tensor("layers.0.attn.wo.weight", lambda t: t.half())(d)
    model = Transformer.from_pretrained(str(d))
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_cuda_without_cuda_is_one_line(data, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert_one_line(run(train.main, *train_args(data[0], tmp_path / "out", "--device=cuda")), "device='cuda'")
    assert not (tmp_path / "out").exists()


# ---- faults ----

def weights(d):
    return load_file(os.path.join(d, "model.safetensors"))


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def save_calls(monkeypatch, kill_at):
    """Count os.replace / savedir.write_manifest calls; raise Killed at call number kill_at."""
    calls = []
    real_replace, real_manifest = os.replace, savedir.write_manifest

    def counted(real):
        def call(*args, **kwargs):
            calls.append(real.__name__)
            if len(calls) - 1 == kill_at:
                raise Killed
            return real(*args, **kwargs)
        return call
    monkeypatch.setattr(os, "replace", counted(real_replace))
    monkeypatch.setattr(savedir, "write_manifest", counted(real_manifest))
    return calls


def test_a_kill_at_every_step_of_a_save_leaves_a_checkpoint_that_resumes_bitwise(data, trained, tmp_path, monkeypatch):
    step2, step3 = trained
    resume = ["--max_steps=3", "--init_from=resume"]
    calls = save_calls(monkeypatch, kill_at=-1)  # a dry run counts the steps of one save
    d = tmp_path / "dry"
    shutil.copytree(step2, d)
    assert run(train.main, *train_args(data[0], d, *resume))[0] == 0
    monkeypatch.undo()
    n_steps = len(calls)
    assert n_steps >= 8, calls
    for k in range(n_steps):
        d = tmp_path / f"kill{k}"
        shutil.copytree(step2, d)
        save_calls(monkeypatch, kill_at=k)
        with pytest.raises(Killed):
            run(train.main, *train_args(data[0], d, *resume))
        monkeypatch.undo()
        # the next run settles the directory: it verifies as step 2 or step 3, and resumes to step 3 exactly
        assert run(train.main, *train_args(data[0], d, *resume))[0] == 0, k
        assert savedir.verify(str(d))["step"] == 3
        assert_same_weights(d, step3)
        assert not os.path.exists(d / savedir.NEXT)


@pytest.fixture(scope="module")
def good_run(data, tmp_path_factory):
    """test-tiny trained 20 steps at lr 1e-2: a checkpoint whose validation loss is well below ln 600."""
    d = str(tmp_path_factory.mktemp("good") / "run")
    assert run(train.main, *train_args(data[0], d, "--max_steps=20", "--eval_interval=20", "--lr=1e-2"))[0] == 0
    rows = [json.loads(l) for l in open(os.path.join(d, "metrics.jsonl"))]
    assert [r["val_loss"]["4"] for r in rows if "val_loss" in r][-1] < 0.9 * np.log(600)
    return d


def test_a_collapsed_run_stops_before_saving_and_keeps_the_good_checkpoint(data, good_run, tmp_path):
    """The good run at step 20 resumed with lr 1e30: the first evaluation after it (step 21) is past max_val_loss
    (0.99 ln 600) or NaN; the run stops before saving, names the step-20 checkpoint, and that one is unchanged."""
    d = tmp_path / "run"
    shutil.copytree(good_run, d)
    before = {k: v for k, v in snapshot(d).items() if not k.startswith("metrics")}
    result = run(train.main, *train_args(data[0], d, "--max_steps=40", "--init_from=resume", "--lr=1e30",
                                         "--eval_interval=1"))
    assert_one_line(result, "at step 21", "stopping without saving", "the checkpoint of step 20", "kept as it was")
    assert "past max_val_loss 6.3330" in result[1] or "nan" in result[1], result[1]
    assert {k: v for k, v in snapshot(d).items() if not k.startswith("metrics")} == before


def test_the_collapse_threshold_is_a_config_value(data, good_run, tmp_path):
    """The same collapse under max_val_loss 100, which its loss (about ln 600) stays below: step 21 is saved."""
    d = tmp_path / "run"
    shutil.copytree(good_run, d)
    result = run(train.main, *train_args(data[0], d, "--max_steps=21", "--init_from=resume", "--lr=1e30",
                                         "--eval_interval=1", "--max_val_loss=100"))
    assert result[0] == 0, result[1]
    assert 0.99 * np.log(600) < savedir.verify(str(d))["val_loss"] < 100


@pytest.mark.parametrize("poisoned, words", [
    ("norm.weight", ["validation loss at exit 1 is nan at step 3"]),           # every exit's loss is NaN
    ("layers.3.mlp.w_down.weight", ["weight layers.3.mlp.w_down.weight"]),  # exit 1's loss stays finite
])
def test_nan_weights_are_caught_before_anything_is_saved(poisoned, words, data, trained, tmp_path, monkeypatch):
    """An optimizer step that leaves NaN in one weight: the run stops before the next save, says that step 2's
    checkpoint is kept, and that checkpoint is byte for byte the same and resumes exactly."""
    real_step = torch.optim.AdamW.step

    def poisoning_step(self, *args, **kwargs):
        real_step(self, *args, **kwargs)
        with torch.no_grad():
            dict(model_params)[poisoned].fill_(float("nan"))
    model_params = []
    real_make = train.make_optimizer

    def make_optimizer(model, *args, **kwargs):  # remembers the model's parameters by name
        model_params.extend(model.named_parameters())
        return real_make(model, *args, **kwargs)
    monkeypatch.setattr(train, "make_optimizer", make_optimizer)
    monkeypatch.setattr(torch.optim.AdamW, "step", poisoning_step)
    d = tmp_path / "run"
    shutil.copytree(trained[0], d)
    before = {k: v for k, v in snapshot(d).items() if k != "metrics.jsonl"}
    result = run(train.main, *train_args(data[0], d, "--max_steps=3", "--init_from=resume", "--eval_exits=1"))
    assert_one_line(result, *words, "the checkpoint of step 2", "kept as it was")
    assert {k: v for k, v in snapshot(d).items() if k != "metrics.jsonl"} == before
    monkeypatch.undo()
    assert run(train.main, *train_args(data[0], d, "--max_steps=3", "--init_from=resume"))[0] == 0
    assert_same_weights(d, trained[1])


def test_a_full_disk_is_one_line_and_keeps_the_old_state(data, trained, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(trained[0], d)
    before = {k: v for k, v in snapshot(d).items() if k != "metrics.jsonl"}
    limit = 400_000  # bytes per file: metrics lines fit, the 1 MB weights do not

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    proc = subprocess.run([sys.executable, "train.py", *train_args(data[0], d, "--max_steps=3", "--init_from=resume")],
                          cwd=ROOT, capture_output=True, text=True, preexec_fn=small_files, timeout=300)
    lines = [l for l in proc.stderr.replace("\r", "\n").splitlines() if l.startswith("error")]
    assert proc.returncode != 0 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "cannot save the checkpoint of step 3" in lines[0] and "step 2" in lines[0] and "kept" in lines[0], lines[0]
    assert {k: v for k, v in snapshot(d).items() if k != "metrics.jsonl"} == before
    assert run(train.main, *train_args(data[0], d, "--max_steps=3", "--init_from=resume"))[0] == 0
    assert_same_weights(d, trained[1])


@contextlib.contextmanager
def locked_by_another_process(d):
    """d's lock (savedir.lock) held by another process for the block; yields that process."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, '.'); import savedir; "
                               f"f = savedir.lock({str(d)!r}); print('locked', flush=True); time.sleep(60)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def test_a_second_run_on_the_same_out_dir_is_refused(data, trained, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(trained[0], d)
    with locked_by_another_process(d) as holder:
        before = snapshot(d)
        assert_one_line(run(train.main, *train_args(data[0], d, "--max_steps=3", "--init_from=resume")),
                        "in use", f"pid {holder.pid}")
        assert snapshot(d) == before
    assert run(train.main, *train_args(data[0], d, "--max_steps=3", "--init_from=resume"))[0] == 0  # free again
    assert_same_weights(d, trained[1])


def test_a_kill_inside_prepare_leaves_the_old_or_the_new_data_set(data, tmp_path, monkeypatch):
    old, new = str(tmp_path / "old"), str(tmp_path / "new")
    shutil.copytree(data[0], old)
    sources = [os.path.join(ROOT, f) for f in ("model.py", "sample.py")]
    calls = save_calls(monkeypatch, kill_at=-1)
    prepare.prepare(sources, new, vocab_size=500)
    monkeypatch.undo()
    old_manifest, new_manifest = savedir.verify(old), savedir.verify(new)
    for k in range(len(calls)):
        d = str(tmp_path / f"kill{k}")
        shutil.copytree(old, d)
        save_calls(monkeypatch, kill_at=k)
        with pytest.raises(Killed):
            prepare.prepare(sources, d, vocab_size=500)
        monkeypatch.undo()
        got = savedir.verify(d)  # a reader settles it: the old set or the new one, whole
        assert got["files"] in (old_manifest["files"], new_manifest["files"]), k
        assert sorted(os.listdir(d)) == sorted(os.listdir(old)), k


def test_a_save_removes_the_old_units_files_the_new_one_lacks(tmp_path):
    """A unit saved without a file the previous one had (an instruction checkpoint's prompt template, then a
    plain run into the same out_dir) must not leave that file behind as if it belonged to the new unit."""
    d = str(tmp_path / "unit")
    for files in ({"model.safetensors": "old", "prompt_template.json": "{}"}, {"model.safetensors": "new"}):
        nxt = savedir.start_next(d)
        for name, text in files.items():
            (tmp_path / "unit" / ".next" / name).write_text(text)
        savedir.write_manifest(nxt, step=len(files))
        savedir.commit(d)
    assert sorted(os.listdir(d)) == ["manifest.json", "model.safetensors"]
    savedir.verify(d)


def test_a_save_never_replaces_a_unit_of_another_kind(tmp_path):
    """savedir.commit itself refuses to move a data set over a checkpoint (should a writer skip check_target):
    nothing moved, nothing deleted."""
    d = str(tmp_path / "unit")
    for kind, files in ((savedir.CHECKPOINT, {"model.safetensors": "w", "config.json": "{}"}),
                        (savedir.TOKEN_DATA, {"train.bin": "t", "meta.json": "{}"})):
        nxt = savedir.start_next(d)
        for name, text in files.items():
            (tmp_path / "unit" / ".next" / name).write_text(text)
        savedir.write_manifest(nxt, kind=kind)
        if kind == savedir.TOKEN_DATA:
            before = snapshot(d)
            with pytest.raises(ValueError, match="holds a checkpoint"):
                savedir.commit(d)
            assert snapshot(d) == before
        else:
            savedir.commit(d)
    assert savedir.verify(d)["kind"] == savedir.CHECKPOINT


# ---- distill.py and dynamic.py save like train.py ----

def student_args(data, plain, out, *flags):
    return [f"--init_from={plain}", f"--data_dir={data[0]}", f"--out_dir={out}", "--block_size=32", "--micro_batch=4",
            "--eval_batches=1", "--steps_per_layer=1", *flags]


def controller_args(data, plain, out, *flags):
    """dynamic.py on the instruction rows (prompts of 100 tokens) with a test-tiny backbone of context 256."""
    backbone = os.path.join(os.path.dirname(out), "backbone")
    if not os.path.exists(backbone):
        torch.manual_seed(0)
        Transformer(replace(PRESETS["test-tiny"], vocab_size=600, block_size=256)).save_pretrained(backbone)
    return [f"--init_from={backbone}", f"--data_dir={data[1]}", f"--tokenizer={data[0]}/tokenizer.model",
            f"--out_dir={out}", "--block_size=128", "--micro_batch=2", "--eval_batches=1", "--max_steps=2", *flags]


@pytest.mark.parametrize("main, args, old, new", [
    (distill.main, student_args, ["--seed=1"], ["--seed=2"]),
    (dynamic.main, controller_args, ["--per_sequence=true"], ["--per_sequence=false"]),
], ids=["distill", "dynamic"])
def test_a_kill_at_every_step_of_a_distill_or_dynamic_save_leaves_one_whole_unit(main, args, old, new, data, plain,
                                                                                 tmp_path, monkeypatch):
    """Killed at each file step of saving a new student (or backbone and controllers) over an old one, the directory
    verifies as the old unit or the new one, whole, and loads (controllers included)."""
    saved = {}
    for name, flags in (("old", old), ("new", new)):
        d = tmp_path / name
        if name == "new":
            shutil.copytree(tmp_path / "old", d)
            calls = save_calls(monkeypatch, kill_at=-1)  # a dry run counts the steps of one save
        result = run(main, *args(data, plain, d, *flags))
        assert result[0] == 0, result[1]
        monkeypatch.undo()
        saved[name] = savedir.verify(str(d))["files"]
    assert saved["old"] != saved["new"] and len(calls) >= 6, calls
    for k in range(len(calls)):
        d = tmp_path / f"kill{k}"
        shutil.copytree(tmp_path / "old", d)
        save_calls(monkeypatch, kill_at=k)
        with pytest.raises(Killed):
            run(main, *args(data, plain, d, *new))
        monkeypatch.undo()
        got = savedir.verify(str(d))["files"]  # a reader settles it
        assert got in (saved["old"], saved["new"]), k
        model = Transformer.from_pretrained(str(d))
        if main is dynamic.main:
            per_sequence = dynamic.load_controllers(str(d), model).per_sequence
            assert per_sequence == (got == saved["old"]), k


def test_a_diverged_student_is_not_saved_over_a_good_one(data, plain, tmp_path):
    d = tmp_path / "student"
    assert run(distill.main, *student_args(data, plain, d))[0] == 0
    before = {k: v for k, v in snapshot(d).items() if not k.startswith("metrics")}
    result = run(distill.main, *student_args(data, plain, d, "--lr=1e30"))
    assert_one_line(result, "stopping without saving", f"the student in {d} is kept as it was")
    assert {k: v for k, v in snapshot(d).items() if not k.startswith("metrics")} == before


def test_distill_into_the_out_dir_of_a_running_train_is_refused(data, plain, tmp_path):
    d = tmp_path / "run"
    with locked_by_another_process(d) as holder:
        before = snapshot(d)
        assert_one_line(run(distill.main, *student_args(data, plain, d)), "in use", f"pid {holder.pid}")
        assert snapshot(d) == before


def test_a_tied_checkpoint_resumed_trains_like_one_run_and_stays_tied(data, tmp_path):
    """A tied test-tiny as --init_from, 3 steps, then resumed to 6 in the same process: weights equal those of a
    straight 6-step run (1e-6). Untied after to_empty, the resumed model would not fit its train_state."""
    tied = tmp_path / "tied"
    torch.manual_seed(0)
    Transformer(replace(PRESETS["test-tiny"], vocab_size=600, tie_embeddings=True)).save_pretrained(str(tied))
    shutil.copy(os.path.join(data[0], "tokenizer.model"), tied)
    args = ["--eval_interval=3", "--lr_decay_steps=6", f"--init_from={tied}"]
    assert run(train.main, *train_args(data[0], tmp_path / "straight", "--max_steps=6", *args))[0] == 0
    assert run(train.main, *train_args(data[0], tmp_path / "halves", "--max_steps=3", *args))[0] == 0
    result = run(train.main, *train_args(data[0], tmp_path / "halves", "--max_steps=6", "--eval_interval=3",
                                         "--lr_decay_steps=6", "--init_from=resume"))
    assert result[0] == 0, result[1]
    straight, halves = weights(tmp_path / "straight"), weights(tmp_path / "halves")
    assert "lm_head.weight" not in halves and straight.keys() == halves.keys()
    assert all(torch.allclose(straight[k], halves[k], atol=1e-6, rtol=0) for k in straight)
