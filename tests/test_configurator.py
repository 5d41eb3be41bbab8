import importlib
import inspect
from dataclasses import dataclass, fields, is_dataclass

import pytest

from configurator import configure
from conftest import assert_one_line_error, run_entry


@dataclass
class Cfg:
    name: str = "a"
    steps: int = 10
    lr: float = 1e-3
    flag: bool = False
    exit_layer: int | None = None


def test_both_override_forms_and_types():
    cfg = configure(Cfg(), ["--steps=5", "--lr", "2", "--flag", "true", "--exit_layer", "12", "--name=b c"])
    assert cfg == Cfg(name="b c", steps=5, lr=2.0, flag=True, exit_layer=12)
    assert isinstance(cfg.lr, float)
    assert configure(Cfg(), ["--name=1,2"]).name == "1,2"
    assert configure(Cfg(), ["--flag", "--steps", "3"]) == Cfg(flag=True, steps=3)  # a bare bool flag
    assert configure(Cfg(), ["--flag"]).flag is True  # text that looks like a tuple, for a string key


def test_config_file_then_override(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("steps = 7\nname = 'file'\n")
    assert configure(Cfg(), [str(f), "--steps=9"]) == Cfg(name="file", steps=9)


@pytest.mark.parametrize("argv, words", [
    (["--nope=1"], ["nope"]),
    (["--steps=abc"], ["steps", "int"]),
    (["--steps=1.5"], ["steps"]),
    (["--exit_layer=x"], ["exit_layer"]),
    (["--steps"], ["steps", "value"]),
    (["missing.py"], ["missing.py"]),
])
def test_bad_overrides_raise(argv, words):
    with pytest.raises(ValueError) as e:
        configure(Cfg(), argv)
    assert all(w in str(e.value) for w in words)


def test_unknown_key_in_file(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("stpes = 7\n")
    with pytest.raises(ValueError, match="stpes"):
        configure(Cfg(), [str(f)])


@pytest.mark.parametrize("args, words", [
    (["train.py", "--no_such_key=1"], ["no_such_key"]),
    (["train.py", "--max_steps=ten"], ["max_steps"]),
    (["train.py", "config/does_not_exist.py"], ["does_not_exist.py"]),
    (["sample.py", "--exit_layer", "twelve"], ["exit_layer"]),
])
def test_scripts_reject_bad_config_in_one_line(args, words):
    assert_one_line_error(run_entry(*args), *words)


def declared_comment(cls, name):
    """The comment on the line declaring `name` in the first class of cls's MRO whose line has one."""
    for k in filter(is_dataclass, cls.__mro__):
        for line in inspect.getsource(k).splitlines():
            if line.startswith(f"    {name}:") and "  # " in line:
                return line.split("  # ", 1)[1].strip()
    return None


@pytest.mark.parametrize("script, config", [("train.py", "TrainConfig"), ("sample.py", "SampleConfig"),
                                            ("evaluate.py", "EvalConfig"), ("distill.py", "DistillConfig"),
                                            ("dynamic.py", "DynamicConfig")])
def test_help_lists_every_key_with_its_default_and_comment(script, config):
    """--help exits 0 and prints, per key, --key=default and the comment on its line in the dataclass."""
    cls = getattr(importlib.import_module(script.removesuffix(".py")), config)
    proc = run_entry(script, "--help")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    lines = {l.split("=")[0].strip(): l for l in proc.stdout.splitlines() if l.startswith("  --")}
    assert len(lines) == len(fields(cls))
    for f in fields(cls):
        comment = declared_comment(cls, f.name)
        assert comment, f"{config}.{f.name} has no comment"
        assert lines[f"--{f.name}"] == f"  --{f.name}={getattr(cls(), f.name)!r}  # {comment}"


@pytest.mark.parametrize("script", ["data/prepare.py", "data/instruct.py"])
def test_help_of_the_data_scripts(script):
    proc = run_entry(script, "--help")
    assert proc.returncode == 0 and "--out" in proc.stdout and "default" in proc.stdout
