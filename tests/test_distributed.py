"""torchrun with 2 gloo processes on CPU: FSDP2 equals one process, layer dropout agrees across ranks, resume is exact."""
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
import savedir
from model import PRESETS, Transformer

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def torchrun(nproc, *args, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "train.py", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def descendants(pid):
    """Process ids of pid's children, grandchildren, ... (Linux /proc)."""
    try:
        children = open(f"/proc/{pid}/task/{pid}/children").read().split()
    except OSError:
        return []
    return [p for c in children for p in [int(c)] + descendants(int(c))]


def wait_until_unlocked(out_dir, timeout=60):
    """Wait until no process holds out_dir's run lock (savedir.lock), i.e. every process of a killed run is gone."""
    deadline = time.time() + timeout
    while True:
        try:
            savedir.lock(str(out_dir)).close()
            return
        except ValueError:
            assert time.time() < deadline, f"{out_dir} is still locked {timeout} s after its run was killed"
            time.sleep(0.1)


def train_losses(out_dir):
    rows = [json.loads(l) for l in open(os.path.join(out_dir, "metrics.jsonl"))]
    return [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r]


@pytest.fixture(scope="module")
def init_ckpt(stdlib_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("init")
    torch.manual_seed(0)
    Transformer(replace(PRESETS["test-tiny"], vocab_size=4096, block_size=64)).save_pretrained(d)
    (d / "tokenizer.model").write_bytes(open(os.path.join(stdlib_data, "tokenizer.model"), "rb").read())
    return str(d)


def common(stdlib_data, init, steps=10):
    return [f"--data_dir={stdlib_data}", f"--init_from={init}", "--block_size=64", f"--max_steps={steps}",
            f"--eval_interval={steps}", "--eval_batches=2", "--warmup_steps=2", "--grad_accum=2"]


def test_two_processes_equal_one_with_twice_the_batch(stdlib_data, init_ckpt, tmp_path):
    args = common(stdlib_data, init_ckpt) + ["--early_exit_curriculum=rotational", "--exit_period=2"]
    two = torchrun(2, *args, "--micro_batch=4", f"--out_dir={tmp_path / 'two'}")
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "train.py", *args, "--micro_batch=8", f"--out_dir={tmp_path / 'one'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = train_losses(tmp_path / "two"), train_losses(tmp_path / "one")
    assert len(a) == len(b) == 10
    for (sa, la), (sb, lb) in zip(a, b):
        assert sa == sb and la.keys() == lb.keys() and len(la) >= 2  # several exits in the loss
        assert all(abs(la[k] - lb[k]) <= 1e-5 for k in la), (sa, la, lb)


def test_heavy_layer_dropout_finishes_and_reruns_bitwise(stdlib_data, init_ckpt, tmp_path):
    # train.py all-gathers every step's dropout mask and stops if ranks disagree
    args = common(stdlib_data, init_ckpt) + ["--p_max=0.9", "--dropout_scale=uniform", "--micro_batch=4"]
    runs = []
    for name in ("a", "b"):
        proc = torchrun(2, *args, f"--out_dir={tmp_path / name}", timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(train_losses(tmp_path / name))
    assert runs[0] == runs[1] and len(runs[0]) == 10


def saved_step(out_dir):
    path = os.path.join(out_dir, "train_state", "step.json")
    return json.load(open(path))["step"] if os.path.exists(path) else -1


def test_resume_after_sigkill_on_two_and_on_one_process(stdlib_data, init_ckpt, tmp_path):
    args = common(stdlib_data, init_ckpt, steps=24) + ["--eval_interval=4", "--micro_batch=4", "--p_max=0.3",
                                                      "--early_exit_curriculum=rotational"]
    straight = tmp_path / "straight"
    assert torchrun(2, *args, f"--out_dir={straight}").returncode == 0
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "train.py", *args, f"--out_dir={killed}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while saved_step(killed) < 8 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    for pid in [proc.pid] + descendants(proc.pid):  # torchrun and its workers (which run in sessions of their own)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    wait_until_unlocked(killed)  # every process of the killed run is gone
    step_at_kill = saved_step(killed)
    assert 8 <= step_at_kill < 24, "the run must be killed part way"
    snapshot = tmp_path / "snapshot"
    subprocess.run(["cp", "-r", str(killed), str(snapshot)], check=True)

    resumed = torchrun(2, *args, f"--out_dir={killed}", "--init_from=resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = load_file(straight / "model.safetensors"), load_file(killed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), f"2 processes: weights differ after resuming at {step_at_kill}"

    # the same sharded state resumed by a single process (resharded on load); the data and dropout
    # decisions are the same, only the order of floating-point reductions differs
    one = subprocess.run([sys.executable, "train.py", *args, "--micro_batch=8", f"--out_dir={snapshot}",
                          "--init_from=resume", "--p_max=0"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    assert train_losses(snapshot)[-1][0] == 23
