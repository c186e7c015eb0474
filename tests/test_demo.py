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
