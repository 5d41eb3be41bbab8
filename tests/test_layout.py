"""The repository's layout: nothing in it hides a package that its dependencies import."""
import ast
import importlib.metadata
import os
import re
import subprocess
import sys

from packaging.markers import default_environment
from packaging.requirements import Requirement

from conftest import ROOT


def requirement_names(path):
    """The distribution names a requirements file asks for (following -r)."""
    names = []
    for line in open(os.path.join(ROOT, path)):
        line = line.split("#")[0].strip()
        if line.startswith("-r"):
            names += requirement_names(line[2:].strip())
        elif line:
            names.append(Requirement(line).name)
    return names


def dependency_tree(names):
    """Every installed distribution the named ones need, transitively (extras' requirements left out)."""
    seen, todo, env = {}, list(names), dict(default_environment(), extra="")
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        try:
            seen[name] = dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        for spec in dist.requires or ():
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate(env):
                todo.append(req.name)
    return seen


def test_no_top_level_module_shadows_a_package_the_dependencies_import():
    """A top-level module or package of the repository named like one a dependency imports shadows it when a
    program runs from the repository root (`kernels/` hid Hugging Face's `kernels`, which transformers >= 5.25
    imports). Checked against the top-level names of every distribution the requirements files pull in."""
    ours = {name.removesuffix(".py") for name in os.listdir(ROOT)
            if name.endswith(".py") or os.path.isfile(os.path.join(ROOT, name, "__init__.py"))}
    tree = dependency_tree(requirement_names("requirements-test.txt"))
    theirs = {top: dist for top, dists in importlib.metadata.packages_distributions().items()
              for dist in dists if re.sub(r"[-_.]+", "-", dist).lower() in tree}
    assert "torch" in theirs and "transformers" in theirs  # the walk found the tree
    clashes = {name: theirs[name] for name in ours & theirs.keys()}
    assert not clashes, f"top-level names that shadow a dependency's package: {clashes}"


def test_transformers_imports_from_the_repository_root():
    proc = subprocess.run([sys.executable, "-c", "import transformers.models.llama.modeling_llama"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def repository_text_files():
    """(path relative to ROOT, text) of every tracked .py, .md and .sh file."""
    ls = subprocess.run(["git", "ls-files", "-z", "*.py", "*.md", "*.sh"], cwd=ROOT,
                        capture_output=True, check=True)
    names = ls.stdout.decode().split("\0")
    return [(n, open(os.path.join(ROOT, n), encoding="utf-8").read()) for n in names
            if n and os.path.isfile(os.path.join(ROOT, n))]


def heading_anchors(path):
    """The anchors GitHub gives a markdown file's headings: lower case, punctuation but - and _
    dropped, spaces as -."""
    headings = re.findall(r"^#+ (.*)$", open(path, encoding="utf-8").read(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def broken_citations(name, text):
    """Paths a file cites that the repository does not hold: every `*.md` it names (from the root or
    its own folder) and every relative link of a markdown file, with the heading anchor it names."""
    here = os.path.dirname(os.path.join(ROOT, name))
    broken = []
    for cited in set(re.findall(r"(?<![\w./-])((?:[\w-]+/)*[\w-]+\.md)\b", text)):
        if not any(os.path.exists(os.path.join(base, cited)) for base in (ROOT, here)):
            broken.append(cited)
    if name.endswith(".md"):
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            full = os.path.normpath(os.path.join(here, path)) if path else os.path.join(ROOT, name)
            if not os.path.exists(full):
                broken.append(target)
            elif anchor and full.endswith(".md") and anchor not in heading_anchors(full):
                broken.append(target)
    return sorted(f"{name}: {c}" for c in set(broken))


def test_no_file_cites_a_path_the_repository_does_not_hold():
    """Docstrings, comments and docs cite docs/equations.md, BENCHMARKS.md and the reports by path;
    each cited markdown file and each relative link (and its heading anchor) exists."""
    files = repository_text_files()
    assert any(n == "README.md" for n, _ in files)  # the listing found the repository
    broken = [b for name, text in files for b in broken_citations(name, text)]
    assert not broken, "citations of paths the repository does not hold:\n" + "\n".join(broken)


def test_citation_check_finds_a_missing_file_and_a_missing_anchor():
    missing = "REFERENCE" + ".md"  # spelled in two parts, so that this file does not cite it
    text = f"see {missing} section 2 and [x](docs/equations.md#no-such-heading), [y](BENCHMARKS.md)"
    assert broken_citations("README.md", text) == [f"README.md: {missing}",
                                                   "README.md: docs/equations.md#no-such-heading"]


def test_the_model_does_not_import_the_command_line():
    """model.py takes its value rules from rules.py, which the command line (configurator.py) shares."""
    tree = ast.parse(open(os.path.join(ROOT, "model.py")).read())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "rules" in imported and "configurator" not in imported


def test_license():
    text = open(os.path.join(ROOT, "LICENSE")).read()
    assert text.startswith("MIT License") and "Copyright (c) 2026 the nanoskip authors" in text
