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
    monkeypatch.delitem(sys.modules, f"benchmarks.{name}", raising=False)  # imported by another script: run afresh
    with pytest.raises(SystemExit) as exc:
        runpy.run_module(f"benchmarks.{name}", run_name="__main__", alter_sys=True)
    assert exc.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_vs_open_unlearning_names_each_sides_allocator(tmp_path, monkeypatch):
    """benchmarks/vs_open_unlearning.py: open-unlearning's side (PALU_DS_MALLOC=system, as its users run it) runs on
    glibc even when palu_ds's asks for jemalloc; each run names its allocator, and the table shows both."""
    from benchmarks.vs_open_unlearning import table, timed
    from palu_ds.localrun import jemalloc

    probe = [sys.executable, "-c", "print('libjemalloc' in open('/proc/self/maps').read())"]
    if jemalloc() is not None:
        monkeypatch.setenv("PALU_DS_MALLOC", "jemalloc")
        rc, _, malloc = timed(probe, 1, str(tmp_path / "ours.log"))
        assert rc == 0 and malloc == "jemalloc" and "True" in (tmp_path / "ours.log").read_text()
    rc, rss, malloc = timed(probe, 1, str(tmp_path / "ou.log"), PALU_DS_MALLOC="system")
    assert rc == 0 and rss > 0 and malloc == "glibc" and "False" in (tmp_path / "ou.log").read_text()
    side = {"exit": 0, "tokens_per_s": 100.0, "s_per_step": 1.0, "steps": 4}
    row = {"round": 0, "workload": "smol", "nproc": 1, "method": "grad_diff", "peer": "GradDiff",
           "palu_ds": {**side, "peak_rss_mib": 3000.0, "malloc": "jemalloc"},
           "open_unlearning": {**side, "peak_rss_mib": 3500.0, "malloc": "glibc"}}
    assert "| 2.93 GiB (jemalloc) | 3.42 GiB (glibc) | -0.49 GiB | 1 |" in table([row])


def test_malloc_ab_table_is_medians_and_per_round_ratios():
    from benchmarks.malloc_ab import table

    def run(tps, rss):
        return {"exit": 0, "tokens_per_s": tps, "peak_rss_mib": rss}
    rounds = [{"glibc": run(100, 4000), "jemalloc": run(90, 3600)},
              {"glibc": run(120, 4100), "jemalloc": run(120, 3690)},
              {"glibc": run(150, 4000), "jemalloc": {"exit": 1}}]  # a failed round: left out
    t = table(rounds)
    assert "| glibc | 110 (100-120) | 4050 (4000-4100) |" in t and "| jemalloc | 105 (90-120) | 3645 (3600-3690) |" in t
    assert "| jemalloc / glibc, median of 2 rounds | 0.950x | 0.900x |" in t
    assert table([rounds[2]]) == "every round failed (see the logs)"


def test_real_model_throughput_rounded_start_control(tmp_path, monkeypatch):
    """benchmarks/real_model_throughput.py ``--rounded-start``: the control's start is the model with its float weights
    rounded to bf16 (stored as fp32, other files copied, made once); bf16's curve and the control's are each compared
    with the fp32 run's, never with each other; without fp32 the option is refused."""
    import torch
    from safetensors.torch import load_file, save_file

    from benchmarks.real_model_throughput import loss_agreement, parse_args, rounded_start

    model = tmp_path / "model"
    model.mkdir()
    w = {"w": torch.tensor([1.0 + 2 ** -10, 3.0, -0.1], dtype=torch.float32), "ids": torch.tensor([1, 2])}
    save_file(w, str(model / "model.safetensors"))
    (model / "config.json").write_text("{}")
    start = rounded_start(str(model), str(tmp_path / "rounded"))
    got = load_file(f"{start}/model.safetensors")
    assert got["w"].dtype == torch.float32 and torch.equal(got["w"], w["w"].to(torch.bfloat16).float())
    assert not torch.equal(got["w"], w["w"]) and torch.equal(got["ids"], w["ids"])
    assert (tmp_path / "rounded" / "config.json").exists() and not (tmp_path / "rounded.tmp").exists()
    (model / "model.safetensors").unlink()  # made once: a second call reads nothing from the model
    assert rounded_start(str(model), str(tmp_path / "rounded")) == start

    base = {"name": "palu", "ranks": 1}
    runs = [{**base, "precision": "fp32", "loss": [10.0, 5.0]}, {**base, "precision": "bf16", "loss": [10.0, 5.5]},
            {**base, "precision": "fp32", "start": "start rounded to bf16", "loss": [10.1, 5.0]}]
    lines = loss_agreement(runs)
    assert len(lines) == 2 and "fp32 (start rounded to bf16) objective vs fp32" in lines[1]
    assert runs[1]["loss_vs_fp32"] == {"max_rel": pytest.approx(0.1), "final_rel": pytest.approx(0.1), "steps": 2}
    assert runs[2]["loss_vs_fp32"]["max_rel"] == pytest.approx(0.01) and "loss_vs_fp32" not in runs[0]

    monkeypatch.setattr(sys, "argv", ["real_model_throughput", "--precisions", "bf16", "--rounded-start"])
    with pytest.raises(SystemExit) as exc:
        parse_args()
    assert exc.value.code == 2
