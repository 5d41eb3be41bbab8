"""README's quick start runs on a fresh copy of the repository, command by command."""
import os
import re
import shlex
import shutil
import subprocess
import sys

from conftest import ROOT

# Appended to each quick-start command, keyed by its script: tiny settings that keep the commands'
# meaning (the same config, model, prompt and flags) at test size. A script not named here fails.
OVERRIDES = {
    "data/prepare.py": [],  # the whole stdlib corpus, as written: about 10-20 s on 2 cores
    "train.py": ["--max_steps=2", "--eval_interval=2", "--eval_batches=1", "--micro_batch=2",
                 "--block_size=64"],
    "sample.py": ["--max_new_tokens", "8"],
}


def quick_start_commands(readme):
    """The commands of the ```bash blocks under README's '## Quick start' heading: continuation
    lines joined, comment lines (what a command prints) left out."""
    section = re.search(r"^## Quick start\n(.*?)(?=^## |\Z)", readme, re.M | re.S)
    assert section, "README.md has no '## Quick start' section"
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section.group(1), re.S):
        text = re.sub(r"\s*\\\n\s*", " ", block)
        commands += [l.strip() for l in text.splitlines() if l.strip() and not l.startswith("#")]
    return commands


def tracked_copy(dest):
    """The repository's tracked files, as they are in the working tree, copied into dest: what a
    fresh clone of the current tree holds, without outputs or data built here."""
    ls = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    for name in ls.stdout.decode().split("\0"):
        src = os.path.join(ROOT, name)
        if name and os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dest, name)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, name))


def test_quick_start_commands_run_on_a_fresh_copy(tmp_path):
    """Each quick-start command, with its script's tiny settings appended, exits 0 in a copy of the
    tracked files, in README's order (prepare builds data/stdlib, train writes out/, sample reads
    it)."""
    commands = quick_start_commands(open(os.path.join(ROOT, "README.md")).read())
    scripts = [shlex.split(c)[1] for c in commands]
    assert {"data/prepare.py", "train.py", "sample.py"} <= set(scripts), commands
    tracked_copy(tmp_path)
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == "python3", f"not `python3 SCRIPT ...`: {command}"
        assert argv[1] in OVERRIDES, f"no test settings for {argv[1]} in OVERRIDES: {command}"
        proc = subprocess.run([sys.executable, *argv[1:], *OVERRIDES[argv[1]]], cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"


def test_quick_start_parsing_joins_continuations_and_drops_printed_lines():
    readme = ("## Install\n\n```bash\npython3 -m pip install x\n```\n\n## Quick start\n\nSay:\n\n"
              "```bash\npython3 a.py --x 1 \\\n    --y 2\n# what it prints\n```\n\n"
              "```text\nnot a command\n```\n\n## Next\n\n```bash\npython3 b.py\n```\n")
    assert quick_start_commands(readme) == ["python3 a.py --x 1 --y 2"]
