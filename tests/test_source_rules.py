"""Source rules a linter does not catch. `import torch.x` inside a function binds `torch` as a local of the whole
function, so any earlier or later `torch.` there raises UnboundLocalError on the paths that skip the import (it hid
behind CPU-only CI once: every CUDA GraphBackend failed)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(path for folder in ("specdec", "drafters", "kernels", "train", "evals")
                 for path in (ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: str(path.relative_to(ROOT)))
def test_no_function_rebinds_a_module_global_by_a_dotted_import(path):
    tree = ast.parse(path.read_text())
    global_names = {alias.asname or alias.name.split(".")[0] for node in tree.body
                    if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
    for function in ast.walk(tree):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    bound = alias.asname or alias.name.split(".")[0]
                    assert not (alias.asname is None and "." in alias.name and bound in global_names), (
                        f"{path.name}:{node.lineno}: `import {alias.name}` in {function.name}() rebinds the global "
                        f"`{bound}` as a local; write `from {alias.name.rsplit('.', 1)[0]} import "
                        f"{alias.name.rsplit('.', 1)[1]}`")


def test_run_from_the_checkout_root_import_kernels_is_the_installed_package_not_this_folder():
    """`python -c` / `python -m` from the root put it first on sys.path; transformers (>= 5.2x) imports the PyPI
    `kernels` and names from it, so the folder hands over to that package (or stays an empty package without it)."""
    import importlib.machinery
    import subprocess
    import sys

    others = [path for path in sys.path if path and Path(path).resolve() != ROOT]
    installed = importlib.machinery.PathFinder.find_spec("kernels", others)
    code = "import kernels, specdec.kernels.tree_attention as t; print(kernels.__file__); print(t.__file__)"
    lines = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    expected = ROOT / "kernels" / "__init__.py" if installed is None else Path(installed.origin)
    assert Path(lines[0]).resolve() == expected.resolve()
    assert Path(lines[1]).name == "tree_attention.py"  # specdec.kernels is this folder, under its package name
