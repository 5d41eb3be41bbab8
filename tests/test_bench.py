import subprocess
import sys

import torch
import transformers

import bench
from benchmarks import common, decode
from conftest import ROOT


def test_bench_prints_machine_versions_commit_and_command_first(monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(decode, "bench_decode", lambda steps, ckpt: ran.append((steps, ckpt)))
    monkeypatch.setattr(sys, "argv", ["bench.py", "--mode", "decode", "--steps", "1"])
    bench.main()
    lines = capsys.readouterr().out.splitlines()
    assert ran == [(1, None)]
    head = "\n".join(lines[:4])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    assert lines[0].startswith("machine: ") and common.cpu_name() in lines[0]
    assert f"torch ISA {torch.backends.cpu.get_cpu_capability()}" in lines[0]
    assert f"torch {torch.__version__}" in head and f"transformers {transformers.__version__}" in head
    assert commit and f"commit: {commit}" in head
    assert lines[3] == "command: python bench.py --mode decode --steps 1"
