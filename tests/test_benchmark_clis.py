"""Every benchmark script parses its arguments: ``--help`` exits 0 (a merge that drops an import fails here, not on
the quiet box an hour into a measurement)."""
import pkgutil
import runpy
import sys

import pytest

import benchmarks

MODULES = sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__)
                 if m.name not in ("__init__", "output", "ou_driver"))


def test_the_scripts_are_found():
    assert {"real_model_throughput", "vs_open_unlearning", "tofu"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_help_exits_zero(name, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [name, "--help"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_module(f"benchmarks.{name}", run_name="__main__", alter_sys=True)
    assert exc.value.code == 0
    assert "usage:" in capsys.readouterr().out
