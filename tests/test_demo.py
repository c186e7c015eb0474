"""The README's main command, `make demo` (= launch/demo.py), end to end -- twice into the same folder, as a user
who runs it again does, with a reference cache left there by another run in between (as a demo of an earlier
version, with other PALU settings, leaves one): the demo rebuilds what it needs instead of failing on it."""
import json
import os
import subprocess
import sys

import pytest

from tests.e2e import ROOT, cpu_env, free_port


@pytest.mark.slow
def test_demo_runs_end_to_end_and_again(tmp_path):
    out = tmp_path / "demo"
    for attempt in (1, 2):
        p = subprocess.run([sys.executable, "launch/demo.py", "--tiny", "--out", str(out), "--port", str(free_port())],
                           cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, f"run {attempt} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        manifest = out / "palu" / "reference_cache" / "manifest.json"
        m = json.loads(manifest.read_text())
        m["key"]["k"] = 64  # a cache made by another run's settings
        manifest.write_text(json.dumps(m))
    summary = json.loads(p.stdout[p.stdout.rindex("\n{"):])
    assert set(summary["stage_seconds"]) >= {"PALU unlearning (2 ranks)", "precompute reference (2 ranks)"}
    assert os.path.getsize(out / "eval" / "report.png") > 0
    metrics = {name: json.loads((out / "eval" / name / "summary.json").read_text())["metrics"]
               for name in ("target", "palu")}
    assert metrics["palu"]["forget/prob"] < metrics["target"]["forget/prob"]  # it forgot something
    assert 0.0 <= metrics["palu"]["forget_quality"] <= 1.0
    # every saved model has its model card: the fine-tuned targets (sft) and the unlearned model
    from huggingface_hub import ModelCard

    for name, kind, method in (("target", "fine-tuning", "sft"), ("retain", "fine-tuning", "sft"),
                               ("palu", "unlearning", "palu")):
        card = ModelCard.load(out / name / "model" / "README.md")
        assert {kind, method} <= set(card.data.tags) and "| world size | 2 |" in card.text, (name, card.data.tags)


@pytest.mark.slow
def test_demo_stops_at_a_failed_stage_naming_its_log(tmp_path):
    """A stage that fails (here: a DeepSpeed config that does not exist) ends the demo with exit 1 and an error that
    names the stage and the folder of its log -- no traceback, no later stage run."""
    out = tmp_path / "demo"
    p = subprocess.run([sys.executable, "launch/demo.py", "--tiny", "--out", str(out), "--port", str(free_port()),
                        "--ds", str(tmp_path / "missing_ds.json")], cwd=ROOT, env=cpu_env(), capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    assert f"error: fine-tune target model (2 ranks) failed: see {out / 'logs'}" in p.stderr
    assert "Traceback" not in p.stderr.split("error:")[-1]
    assert (out / "logs" / "fine-tune_target_model_(2_ranks).log").exists()
    assert not (out / "logs" / "fine-tune_retain_model_(2_ranks).log").exists()  # nothing ran after it
