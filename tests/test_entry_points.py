"""``python -m palu_ds.train`` / ``.finetune`` / ``.precompute``: module entry points of the installed package (no
checkout), and how they get the in-training evaluator without the library importing palu_eval/ (an entry-point
plugin that setup.py registers). A 2-rank run through ``torchrun -m palu_ds.train`` is in tests/test_engine_e2e.py."""
import ast
import importlib.metadata
import os
import subprocess
import sys

import pytest

from palu_ds.config import ConfigError, load_config
from palu_ds.run import EVALUATORS, plugin_evaluator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ["model.path=m", "data.forget.source=f", "method.name=sft", "reference.mode=none"]


@pytest.mark.parametrize("module", ["palu_ds.train", "palu_ds.finetune", "palu_ds.precompute"])
def test_module_entry_point_runs_from_any_folder(module, tmp_path):
    """Run from a folder that is not the checkout: only the package is on the path."""
    p = subprocess.run([sys.executable, "-m", module, "--help"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert "--deepspeed" in p.stdout and "overrides" in p.stdout


def test_module_entry_point_refuses_a_bad_config_before_loading(tmp_path):
    p = subprocess.run([sys.executable, "-m", "palu_ds.train", "--deepspeed", "nope.json", *BASE,
                        "log.report_to=[mlflow]"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "config error: each item of log.report_to must be wandb" in p.stderr, p.stderr


def _setup_call() -> ast.Call:
    tree = ast.parse(open(os.path.join(ROOT, "setup.py"), encoding="utf-8").read())
    return next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")


def _setup_entry_points() -> dict:
    return ast.literal_eval(next(k.value for k in _setup_call().keywords if k.arg == "entry_points"))


def _setup_packages() -> list[str]:
    """The packages setup.py installs: its ``find_packages(include=[...])`` run on the checkout."""
    from setuptools import find_packages

    call = next(k.value for k in _setup_call().keywords if k.arg == "packages")
    include = ast.literal_eval(next(k.value for k in call.keywords if k.arg == "include"))
    return find_packages(where=ROOT, include=include)


def test_setup_installs_no_generic_top_level_package():
    """A user's own ``evaluation`` or ``benchmarks`` module must not be shadowed by ours (nor ours by theirs): the
    installed top-level packages are palu_ds and palu_eval, and every entry point's module is in them and imports."""
    packages = _setup_packages()
    top = {p.split(".")[0] for p in packages}
    assert top == {"palu_ds", "palu_eval"}, packages
    assert "palu_ds.reference" in packages and "palu_eval" in packages  # subpackages found too
    for group, specs in _setup_entry_points().items():
        for spec in specs:
            module, _, attr = spec.split("=")[1].strip().partition(":")
            assert module.split(".")[0] in top, f"{group} {spec}: module outside the installed packages"
            assert callable(getattr(importlib.import_module(module), attr.split(".")[0])), spec


def test_the_installed_entry_points_are_setup_pys():
    """The installed palu_ds distribution declares setup.py's evaluator plugin, and it loads: a stale install (e.g.
    made before ``evaluation`` became ``palu_eval``) would make ``python -m palu_ds.train`` with eval fail."""
    declared = sorted(s.replace(" ", "") for s in _setup_entry_points()[EVALUATORS])
    installed = sorted(f"{ep.name}={ep.value}" for ep in importlib.metadata.distribution("palu_ds").entry_points
                       if ep.group == EVALUATORS)
    assert installed == declared, (f"the installed palu_ds declares {installed}, setup.py {declared}: reinstall "
                                   "it (pip install -e . in the checkout)")
    from palu_eval import trainer_evaluator

    assert importlib.metadata.entry_points(group=EVALUATORS)["default"].load() is trainer_evaluator


def _installed(monkeypatch, specs: list[str]):
    """The evaluator plugins as an installed distribution would declare them (``name=module:attr``)."""
    eps = importlib.metadata.EntryPoints(
        importlib.metadata.EntryPoint(*s.split("="), group=EVALUATORS) for s in specs)
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: eps.select(group=group))


def test_the_evaluator_comes_from_the_registered_plugin(monkeypatch):
    from palu_eval import trainer_evaluator

    specs = _setup_entry_points()[EVALUATORS]
    _installed(monkeypatch, specs)
    assert importlib.metadata.entry_points(group=EVALUATORS)["default"].load() is trainer_evaluator
    cfg = load_config(None, BASE + ["eval.every=2", "eval.splits=[forget]"])
    evaluator = plugin_evaluator(cfg)
    assert callable(evaluator) and evaluator.__qualname__.startswith("trainer_evaluator")
    assert plugin_evaluator(load_config(None, BASE)) is None  # eval.every=0: none needed, none loaded


def test_no_evaluator_installed_is_a_config_error(monkeypatch):
    _installed(monkeypatch, [])
    assert plugin_evaluator(load_config(None, BASE)) is None
    with pytest.raises(ConfigError, match="eval.every / eval.epochs need an evaluator.*palu_ds.evaluators"):
        plugin_evaluator(load_config(None, BASE + ["eval.every=2"]))
