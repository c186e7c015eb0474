"""The layering of README.md ("Layers, each importing only from those below it"): the library (palu_ds) imports
nothing from palu_eval or benchmarks, and no file puts a folder on sys.path (palu_ds and palu_eval are installed
with ``pip install -e``; benchmarks run from the checkout as ``python -m benchmarks.<name>``)."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _py_files(*folders):
    for folder in folders:
        for d, _, names in os.walk(os.path.join(ROOT, folder)):
            yield from (os.path.join(d, n) for n in sorted(names) if n.endswith(".py"))


def _imported(path):
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


def test_the_library_never_imports_palu_eval_or_benchmarks():
    upward = [(os.path.relpath(p, ROOT), m) for p in _py_files("palu_ds") for m in _imported(p)
              if m.split(".")[0] in ("palu_eval", "benchmarks")]
    assert not upward, f"palu_ds imports from a layer above it: {upward}"


def test_no_sys_path_insert():
    found = [os.path.relpath(p, ROOT) for p in _py_files("palu_ds", "palu_eval", "benchmarks", "launch", "scripts",
                                                         "tests")
             if "sys.path.insert" in open(p, encoding="utf-8").read() and not p.endswith("test_layers.py")]
    assert not found, f"sys.path.insert in {found}: import through the installed package instead"
