import os
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def run_script(*args, timeout=600):
    """Run one of the repo's scripts as a user would; return the CompletedProcess."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc, *words):
    """A bad input exits non-zero with one line on stderr that names the problem, no traceback."""
    assert proc.returncode != 0, proc.stdout
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture(scope="session")
def stdlib_data(tmp_path_factory):
    """The default corpus (stdlib source), prepared once per test session."""
    out = tmp_path_factory.mktemp("stdlib")
    proc = run_script("data/prepare.py", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return str(out)


@pytest.fixture(scope="session")
def stdlib_path():
    return sysconfig.get_paths()["stdlib"]
