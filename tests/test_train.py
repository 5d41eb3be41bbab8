"""End to end on the default corpus: train, resume after SIGKILL, sample, and bad inputs."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, TINY, assert_one_line_error, run_entry, run_script
from model import PRESETS, Transformer


def val_rows(out_dir):
    return [r for r in map(json.loads, open(os.path.join(out_dir, "metrics.jsonl"))) if "val_loss" in r]


def logged_rows(out_dir):
    """metrics.jsonl's rows without the timings (tokens/s, MFU), which no two runs share."""
    rows = map(json.loads, open(os.path.join(out_dir, "metrics.jsonl")))
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu")} for r in rows]


def val_curve(out_dir, exit_layer):
    return [(r["step"], r["val_loss"][str(exit_layer)]) for r in val_rows(out_dir)]


def test_training_lowers_validation_loss(trained):
    curve = val_curve(trained, 4)
    (_, first), (_, last) = curve[0], curve[-1]
    assert [s for s, _ in curve] == [0, 100, 200, 300, 400]
    assert last < 0.6 * first, curve
    for e in (1, 2, 3, 4):  # every exit layer is evaluated, loss and perplexity
        assert len(val_curve(trained, e)) == 5
    last = val_rows(trained)[-1]
    assert abs(last["val_ppl"]["2"] - math.exp(last["val_loss"]["2"])) < 1e-6 * last["val_ppl"]["2"]
    assert sorted(os.listdir(trained)) == ["config.json", "manifest.json", "metrics.jsonl", "model.safetensors",
                                           "run.lock", "tokenizer.model", "train_state"]


def test_early_exit_loss_lowers_the_middle_exit_loss(trained, layerskip_trained):
    """LayerSkip against the same run without it, compared at step 100 (where `trained` also evaluates); measured
    on 2026-11-30 (exits 1, 2, 4): 5.505 / 5.320 / 5.298 with LayerSkip, 5.903 / 5.613 / 5.333 without."""
    plain = {e: dict(val_curve(trained, e))[100] for e in (1, 2, 3, 4)}
    layerskip = {e: dict(val_curve(layerskip_trained, e))[100] for e in (1, 2, 3, 4)}
    assert layerskip[2] < plain[2] - 0.15, (plain, layerskip)   # the middle exit is clearly better
    assert layerskip[1] < plain[1] - 0.25, (plain, layerskip)
    assert layerskip[4] < plain[4] + 0.2, (plain, layerskip)    # at little cost to the last layer


def test_sample_full_depth_and_exit_layer(trained):
    for extra in ([], ["--exit_layer", "2"], ["--skip_layers=1,2", "--temperature=0"]):
        proc = run_entry("sample.py", f"--out_dir={trained}", "--prompt=def ", "--max_new_tokens=20", *extra)
        assert proc.returncode == 0, proc.stderr
        headers = [l for l in proc.stdout.splitlines() if l.startswith("---------- ")]
        assert len(headers) == 1 and "def " in proc.stdout, proc.stdout


@pytest.mark.parametrize("args, words", [
    (["--exit_layer", "5"], ["exit_layer", "[1, 4]"]),
    (["--exit_layer", "0"], ["exit_layer"]),
    (["--prompt="], ["prompt is empty"]),
    (["--skip_layers=9"], ["skip_layers"]),
    (["--max_new_tokens=500"], ["context"]),
])
def test_sample_bad_inputs(trained, args, words):
    assert_one_line_error(run_entry("sample.py", f"--out_dir={trained}", *args), *words)


def test_sample_missing_checkpoint(tmp_path):
    assert_one_line_error(run_script("sample.py", f"--out_dir={tmp_path / 'none'}"), "none")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_entry("sample.py", f"--out_dir={tmp_path / 'empty'}"), "config.json")


def test_tokenizer_larger_than_the_vocabulary_is_one_line(tmp_path, stdlib_data):
    """A checkpoint, or a data set to fine-tune it on, whose tokenizer gives ids the embedding has no rows for."""
    ckpt = tmp_path / "ckpt"
    Transformer(PRESETS["test-tiny"]).save_pretrained(str(ckpt))                # a vocabulary of 256
    shutil.copy(os.path.join(stdlib_data, "tokenizer.model"), ckpt)             # 4096 tokens
    assert_one_line_error(run_entry("sample.py", f"--out_dir={ckpt}"), "4096 tokens", "vocabulary of 256")
    out = tmp_path / "out"
    assert_one_line_error(run_entry("train.py", f"--init_from={ckpt}", f"--data_dir={stdlib_data}",
                                    f"--out_dir={out}", "--block_size=64"), "4096 tokens", "vocabulary of 256")
    assert not out.exists()


def test_train_bad_data_dir_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    assert_one_line_error(run_entry("train.py", f"--data_dir={tmp_path / 'nodata'}", f"--out_dir={out}"),
                          "nodata")
    assert not out.exists()


def test_resume_without_state_is_one_line(tmp_path, stdlib_data):
    assert_one_line_error(run_entry("train.py", *TINY, f"--data_dir={stdlib_data}",
                                    f"--out_dir={tmp_path}", "--init_from=resume"), "resume")


def test_resume_from_a_final_step_off_the_eval_grid(tmp_path, stdlib_data):
    """A run that ended at max_steps between evaluations resumes with a larger max_steps (a regression:
    the tokens/s clock was only started at evaluation steps)."""
    common = [*TINY, f"--data_dir={stdlib_data}", f"--out_dir={tmp_path}", "--eval_interval=4"]
    assert run_entry("train.py", *common, "--max_steps=5").returncode == 0
    proc = run_entry("train.py", *common, "--max_steps=7", "--init_from=resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert saved_step(str(tmp_path)) == 7
    assert [r["step"] for r in logged_rows(tmp_path) if "val_loss" in r] == [0, 4, 5, 7]
    # a new run from scratch in the same out_dir logs its own rows only (they were appended to the old run's)
    assert run_entry("train.py", *common, "--max_steps=2").returncode == 0
    assert [(r["step"], "val_loss" in r) for r in logged_rows(tmp_path)] == [(0, True), (0, False), (1, False),
                                                                            (2, True)]
    assert not os.path.exists(tmp_path / "metrics.jsonl.next")  # it became metrics.jsonl with the first checkpoint


def test_metrics_of_an_earlier_run_stay_until_a_new_run_saves_its_first_checkpoint(tmp_path):
    """A run from scratch in an out_dir that holds an earlier run logs to a new file, which replaces metrics.jsonl
    only with its first checkpoint (killed before it, the earlier checkpoint and its rows stay together); a resumed
    run keeps the rows up to its checkpoint's step, and drops a line a kill cut short."""
    from train import log_metrics, publish_metrics, start_metrics
    path = str(tmp_path / "metrics.jsonl")
    old = [{"step": 0, "val_loss": {"1": 9.0}}, {"step": 0, "train_loss": {"1": 9.0}},
           {"step": 1, "train_loss": {"1": 8.0}}, {"step": 2, "val_loss": {"1": 7.0}}, {"step": 2, "train_loss": {"1": 7.0}}]
    for row in old:
        log_metrics(path, row)
    with open(path, "a") as f:
        f.write('{"step": 3, "train_lo')  # cut short by a kill
    before = open(path).read()
    new = start_metrics(path, 0)
    log_metrics(new, {"step": 0, "val_loss": {"1": 5.0}})
    assert new != path and open(path).read() == before
    assert publish_metrics(new) == path and logged_rows(tmp_path) == [{"step": 0, "val_loss": {"1": 5.0}}]
    assert publish_metrics(path) == path
    for row in old[1:]:
        log_metrics(path, row)
    with open(path, "a") as f:
        f.write('{"step": 3, "train_lo')
    assert start_metrics(path, 2) == path
    assert logged_rows(tmp_path) == [{"step": 0, "val_loss": {"1": 5.0}}, *old[1:4]]  # the training row at 2 goes


def saved_step(out_dir):
    path = os.path.join(out_dir, "train_state", "step.json")
    return json.load(open(path))["step"] if os.path.exists(path) else -1


def test_resume_after_sigkill_is_bitwise_exact(stdlib_data, tmp_path):
    common = [*TINY, f"--data_dir={stdlib_data}", "--max_steps=24", "--eval_interval=4", "--grad_accum=2",
              "--p_max=0.3", "--early_exit_curriculum=rotational", "--exit_period=2"]  # LayerSkip on
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    assert run_script("train.py", *common, f"--out_dir={straight}").returncode == 0

    proc = subprocess.Popen([sys.executable, "train.py", *common, f"--out_dir={killed}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while saved_step(killed) < 8 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step_at_kill = saved_step(killed)
    assert 8 <= step_at_kill < 24, "the run must be killed part way"
    assert not [f for f in os.listdir(killed) if ".tmp" in f and f != "train_state.tmp"]

    proc = run_script("train.py", *common, f"--out_dir={killed}", "--init_from=resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = load_file(os.path.join(straight, "model.safetensors")), load_file(os.path.join(killed, "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), f"weights differ after resuming from step {step_at_kill}"
    assert val_curve(straight, 4)[-1] == val_curve(killed, 4)[-1]
    # metrics.jsonl reads as if never killed: the rows logged after the last checkpoint are not there twice
    assert logged_rows(killed) == logged_rows(straight)
