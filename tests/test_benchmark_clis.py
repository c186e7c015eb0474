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


def test_vs_open_unlearning_names_each_sides_allocator(tmp_path):
    """benchmarks/vs_open_unlearning.py: a side started with PALU_DS_MALLOC=system (open-unlearning as its users run
    it) runs on glibc; palu_ds's side on what palu_ds.localrun preloads; the table names both beside the peak RSS."""
    from benchmarks.vs_open_unlearning import table, timed
    from palu_ds.localrun import jemalloc

    probe = [sys.executable, "-c", "print('libjemalloc' in open('/proc/self/maps').read())"]
    rc, rss, malloc = timed(probe, 1, str(tmp_path / "ou.log"), PALU_DS_MALLOC="system")
    assert rc == 0 and rss > 0 and malloc == "glibc" and "False" in (tmp_path / "ou.log").read_text()
    rc, _, malloc = timed(probe, 1, str(tmp_path / "ours.log"))
    have = jemalloc() is not None
    assert rc == 0 and malloc == ("jemalloc" if have else "glibc")
    assert str(have) in (tmp_path / "ours.log").read_text()
    side = {"exit": 0, "tokens_per_s": 100.0, "s_per_step": 1.0, "steps": 4}
    row = {"round": 0, "workload": "smol", "nproc": 1, "method": "grad_diff", "peer": "GradDiff",
           "palu_ds": {**side, "peak_rss_mib": 3000.0, "malloc": "jemalloc"},
           "open_unlearning": {**side, "peak_rss_mib": 3500.0, "malloc": "glibc"}}
    assert "| 2.93 GiB (jemalloc) | 3.42 GiB (glibc) | -0.49 GiB | 1 |" in table([row])
