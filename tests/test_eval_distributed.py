"""2-rank (gloo, CPU) evaluation equals 1-rank evaluation, for both suites, with an odd number of examples so
that one rank gets a padding duplicate.  One torchrun launch runs the CLI entry (``palu_eval.run.main``) for both
suites."""

import json
import math
import subprocess
import sys

import pytest

from palu_ds.data.synthetic import corpus_texts, write_muse, write_tofu
from palu_ds.localrun import cpu_env, free_port
from palu_ds.tiny import make_tiny_model
from palu_eval import run

DRIVER = """
import sys
from palu_ds.dist import init_from_env
from palu_eval import run
import torch.distributed as dist
init_from_env()  # once: main() leaves a group it did not create alone
common = ["--model", {model!r}, "--max-new-tokens", "8", "--batch-size", "2", "--no-forget-quality"]
run.main(common + ["--suite", "tofu", "--split", "forget10", "--data", {tofu!r}, "--out", {out!r} + "/tofu"])
run.main(common + ["--suite", "muse", "--split", "news", "--data", {muse!r}, "--out", {out!r} + "/muse"])
dist.destroy_process_group()
import os
left = [t for t in os.listdir("/proc/self/task") if "gloo" in open(f"/proc/self/task/{{t}}/comm").read()]
assert not left, "gloo threads outlived the process group"  # palu_ds.dist.import_dynamo_first
"""


def _assert_same(a, b, path=""):
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-8), (path, a, b)
    else:
        assert a == b, (path, a, b)


@pytest.mark.distributed
@pytest.mark.timeout(200)
def test_two_ranks_equal_one_rank(tmp_path):
    make_tiny_model(tmp_path / "model", corpus_texts())
    tofu, muse = write_tofu(tmp_path / "tofu", n=5), write_muse(tmp_path / "muse", n=3)
    args = dict(model=str(tmp_path / "model"), tofu=str(tofu), muse=str(muse))
    # 1 rank, in this process
    common = ["--model", args["model"], "--max-new-tokens", "8", "--batch-size", "2", "--no-forget-quality"]
    run.main(common + ["--suite", "tofu", "--split", "forget10", "--data", args["tofu"], "--out", str(tmp_path / "one/tofu")])
    run.main(common + ["--suite", "muse", "--split", "news", "--data", args["muse"], "--out", str(tmp_path / "one/muse")])
    # 2 ranks, gloo
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(out=str(tmp_path / "two"), **args))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(driver)],
                          env=cpu_env(CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for suite in ("tofu", "muse"):
        one = json.loads((tmp_path / "one" / suite / "results.json").read_text())
        two = json.loads((tmp_path / "two" / suite / "results.json").read_text())
        assert two["meta"]["world_size"] == 2 and one["meta"]["world_size"] == 1
        _assert_same(one["examples"], two["examples"])
        _assert_same(one["summary"], two["summary"])
    assert len(one["examples"]["privleak_forget"]) == 3
