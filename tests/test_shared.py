"""The shared layer's small helpers: atomic writes (palu_ds.atomic) and the CPU environment / launcher command
(palu_ds.localrun)."""
import json
import os
import sys

import pytest

from palu_ds.atomic import atomic_path, write_json, write_jsonl, write_text
from palu_ds.localrun import CPU_ENV, cpu_env, free_port, launcher_cmd, setdefaults


def test_a_failed_write_leaves_the_target_as_it_was(tmp_path):
    target = tmp_path / "sub" / "out.json"
    write_json(target, {"a": 1})  # the folder is created
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            with open(tmp, "w") as f:
                f.write('{"a": ')  # half-written
            raise RuntimeError("crash")
    assert json.loads(target.read_text()) == {"a": 1}
    write_text(target, "x")  # a stale temporary does not stop the next write
    assert target.read_text() == "x" and not os.path.exists(str(target) + ".tmp")


def test_a_folder_is_replaced_whole(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.bin").write_text("old")
    with atomic_path(out) as tmp:
        os.makedirs(tmp)
        with open(os.path.join(tmp, "new.bin"), "w") as f:
            f.write("new")
    assert sorted(os.listdir(out)) == ["new.bin"]


def test_jsonl_and_a_per_process_suffix(tmp_path):
    p = write_jsonl(tmp_path / "r.jsonl", [{"q": "é"}, [1]], ensure_ascii=False)
    assert open(p, encoding="utf-8").read() == '{"q": "é"}\n[1]\n'
    write_json(tmp_path / "c.json", {"k": 2}, indent=None, suffix=f".{os.getpid()}.tmp")
    assert (tmp_path / "c.json").read_text() == '{"k": 2}'


def test_cpu_env_for_a_child_process(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    env = cpu_env(OMP_NUM_THREADS="2")
    assert "RANK" not in env and env["DS_ACCELERATOR"] == "cpu" and env["OMP_NUM_THREADS"] == "2"
    assert env["TORCH_EXTENSIONS_DIR"]
    assert os.environ["RANK"] == "1"  # this process is left alone


def test_setdefaults_fills_only_what_is_unset():
    env = {"OMP_NUM_THREADS": "4"}
    setdefaults(env)
    assert env["OMP_NUM_THREADS"] == "4" and env["GLOO_SOCKET_IFNAME"] == CPU_ENV["GLOO_SOCKET_IFNAME"]


def test_launcher_command():
    assert launcher_cmd("launch/train.py", ["a=1"], 1) == [sys.executable, "launch/train.py", "a=1"]
    cmd = launcher_cmd("launch/train.py", ["a=1"], 2, 29999)
    assert cmd == [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "29999",
                   "launch/train.py", "a=1"]
    assert launcher_cmd("palu_eval/run.py", ["a=1"], 2, 29999, torchrun=True) == [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29999",
        "palu_eval/run.py", "a=1"]
    assert launcher_cmd("palu_eval/run.py", ["a=1"], 1, torchrun=True) == [sys.executable, "palu_eval/run.py", "a=1"]
    assert 0 < free_port() < 65536
