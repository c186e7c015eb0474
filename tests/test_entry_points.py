"""``python -m palu_ds.train`` / ``.finetune`` / ``.precompute``: module entry points of the installed package (no
checkout), and how they get the in-training evaluator without the library importing evaluation/ (an entry-point
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


def _setup_entry_points() -> dict:
    tree = ast.parse(open(os.path.join(ROOT, "setup.py"), encoding="utf-8").read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    return ast.literal_eval(next(k.value for k in call.keywords if k.arg == "entry_points"))


def _installed(monkeypatch, specs: list[str]):
    """The evaluator plugins as an installed distribution would declare them (``name=module:attr``)."""
    eps = importlib.metadata.EntryPoints(
        importlib.metadata.EntryPoint(*s.split("="), group=EVALUATORS) for s in specs)
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: eps.select(group=group))


def test_the_evaluator_comes_from_the_registered_plugin(monkeypatch):
    from evaluation import trainer_evaluator

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
