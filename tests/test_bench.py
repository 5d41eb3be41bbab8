import subprocess
import sys

import pytest
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


def test_speculation_costs_are_timed_in_turns_each_keeping_its_shortest_call(monkeypatch):
    """The ideal's step costs and each setting beside full depth are timed in turns (so that a drift of the
    machine's speed moves both alike), each keeping its shortest call and that call's result."""
    from benchmarks import speculation
    now, calls = [0.0], []

    def call(name, durations):
        def fn():
            calls.append(name)
            now[0] += durations.pop(0)
            return name + str(len(calls))
        return fn

    monkeypatch.setattr(speculation.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(speculation, "WARM_UP", True)
    best, results = speculation.seconds_in_turns(
        {"full": call("full", [9.0, 3.0, 2.0, 4.0]), "draft": call("draft", [9.0, 1.0, 5.0, 0.5])}, repeats=3)
    assert calls == ["full", "draft"] * 4  # a warm-up call of each, then in turns
    assert best == {"full": 2.0, "draft": 0.5} and results == {"full": "full5", "draft": "draft8"}
    assert speculation.paired_seconds(call("a", [1.0, 2.0]), call("b", [1.0, 0.5]), repeats=1)[1:] == (0.5, "b12")


def test_bench_refuses_fewer_than_one_timed_call(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench.py", "--mode", "speculation", "--repeats", "0"])
    with pytest.raises(SystemExit) as e:
        bench.main()
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == "bench.py: error: --repeats must be at least 1, got 0"


def test_bandwidth_report_computes_its_ratios_from_the_timings(monkeypatch, capsys):
    """bench.py --mode bandwidth's table at test size, on a fake clock: each row's fraction of the limit is the
    limit's seconds over the row's, its ratio to transformers is transformers' seconds over the row's."""
    from benchmarks import bandwidth
    seconds = iter([0.8, 0.2, 0.4])  # transformers, nanoskip eager, the packed layout

    def fake_best_time(fn, repeats):
        return next(seconds), fn()
    monkeypatch.setattr(bandwidth, "best_time", fake_best_time)
    monkeypatch.setattr(common, "TINY", True)
    cfg = common.tiny_config()
    hf, ours = decode.converted_pair(cfg, cfg.n_layer)
    prompt = torch.randint(cfg.vocab_size, (1, bandwidth.PROMPT_LEN), generator=torch.Generator().manual_seed(0))
    n, bytes_per_second = 4, 1e9
    bandwidth.report("tiny", hf, ours, prompt, n, bytes_per_second, 1, compile_too=False)
    out = capsys.readouterr().out
    limit = bandwidth.step_bytes(ours, bandwidth.PROMPT_LEN + n // 2) / bytes_per_second
    assert f"limit {limit * 1e3:.2f} ms/token" in out
    for name, t in (("transformers generate", 0.8), ("nanoskip eager", 0.2), ("nanoskip eager, packed", 0.4)):
        line = next(line for line in out.splitlines() if line.strip().startswith(name))
        assert f"{t / n * 1e3:7.2f} ms/token" in line
        assert f"{limit * n / t:6.1%} of the bandwidth limit" in line and f"{0.8 / t:5.2f}x transformers" in line
        assert "MiB resident before" in line
    assert "identical to transformers' tokens: True" in out
