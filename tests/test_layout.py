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


def test_the_model_does_not_import_the_command_line():
    """model.py takes its value rules from rules.py, which the command line (configurator.py) shares."""
    tree = ast.parse(open(os.path.join(ROOT, "model.py")).read())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "rules" in imported and "configurator" not in imported


def test_license():
    text = open(os.path.join(ROOT, "LICENSE")).read()
    assert text.startswith("MIT License") and "Copyright (c) 2026 the nanoskip authors" in text
