"""Cluster launch paths, for real on this machine.

Unit (fast): SLURM's compressed node lists -> hosts -> DeepSpeed hostfile (palu_ds.cluster, checked against
``scontrol show hostnames`` when installed); the sbatch scripts' allocation handling and launch commands for 1 CPU
node and 4 GPU nodes with every launcher, with a stub ``scontrol`` (slurm/common.sh).

Slow (real processes, 2 ranks, gloo, the tiny model). ``make test`` (CI) runs the reduced form:
- ``mpirun -np 2 python launch/train.py`` (OpenMPI, ranks from OMPI_COMM_WORLD_*): also the uninterrupted reference;
- a private single-host SLURM from Debian's packages (munge, slurmctld, slurmd on loopback, 2 CPUs;
  tests/cluster_helpers.py, installed with apt-get when missing, daemons stopped by PID at the end):
  ``sbatch --wait slurm/train.sbatch`` with 2 tasks, ``scontrol requeue`` mid-run; the job resumes from its
  checkpoint and succeeds with both ranks, the model and TensorBoard logs, and the steps and weights of the
  uninterrupted run;
- rank 1 SIGKILLed mid-run under the deepspeed launcher: non-zero exit within 60 s, no rank left.
``make test-cluster`` (PALU_CLUSTER_FULL=1) adds: the time-limit path (``scancel --signal=USR1 --batch``, what
``--signal=B:USR1@300`` does: the script checkpoints and requeues itself) before the requeue, for the deepspeed
launcher and for srun; uninterrupted jobs through deepspeed, torchrun (one per node via srun) and mpirun inside
SLURM; precompute.sbatch and eval.sbatch; a killed rank under mpirun and inside a SLURM job.
"""
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from e2e import ROOT, cpu_env, free_port, state
from palu_ds.localrun import launcher_cmd
from palu_ds import cluster

# ---------------------------------------------------------------------------------------------------------- unit

EXPANSIONS = {
    "node[01-04,07]": ["node01", "node02", "node03", "node04", "node07"],
    "a[1-2]b": ["a1b", "a2b"],
    "rack[1-2]-n[08-10],x": ["rack1-n08", "rack1-n09", "rack1-n10", "rack2-n08", "rack2-n09", "rack2-n10", "x"],
    "n[0-10]": [f"n{i}" for i in range(11)],
    "n[001-3]": ["n001", "n002", "n003"],
    "n[8-10]": ["n8", "n9", "n10"],
    "gpu[9-11],login[01-02]": ["gpu9", "gpu10", "gpu11", "login01", "login02"],
    "a,b.cluster.org,c": ["a", "b.cluster.org", "c"],
    "n[5,1-2]": ["n5", "n1", "n2"],
    "solo": ["solo"],
    "n[7]": ["n7"],
}


@pytest.mark.parametrize("spec", list(EXPANSIONS))
def test_expand_nodelist(spec):
    assert cluster.expand_nodelist(spec) == EXPANSIONS[spec]


@pytest.mark.parametrize("bad", ["n[1-2", "n1-2]", "n[2-1]", "n[a-b]", "n[[1-2]]", "n[1-]"])
def test_expand_nodelist_rejects_malformed_lists(bad):
    with pytest.raises(cluster.HostlistError):
        cluster.expand_nodelist(bad)


@pytest.mark.slow  # may apt-get install SLURM
def test_expansion_matches_scontrol():
    """The same lists through SLURM's own parser (``scontrol show hostnames`` needs only a config file).
    ``a[1-2]b`` (text after the brackets) is left out: SLURM 22.05 rejects it, newer SLURMs and we accept it."""
    from cluster_helpers import ensure_installed

    why = ensure_installed()
    if why:
        pytest.skip(f"no SLURM: {why}")
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        conf = os.path.join(d, "slurm.conf")
        with open(conf, "w") as f:
            f.write("ClusterName=x\nSlurmctldHost=localhost\nNodeName=localhost CPUs=1\nPartitionName=p Nodes=ALL\n")
        for spec, hosts in EXPANSIONS.items():
            if spec == "a[1-2]b":
                continue
            p = subprocess.run(["scontrol", "show", "hostnames", spec], env=dict(os.environ, SLURM_CONF=conf),
                               capture_output=True, text=True, timeout=30)
            assert p.returncode == 0, p.stderr
            assert p.stdout.split() == hosts, spec


def test_tasks_per_node():
    assert cluster.expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert cluster.expand_tasks_per_node("8") == [8]
    with pytest.raises(cluster.HostlistError):
        cluster.expand_tasks_per_node("2(3)")


def test_hostfile(tmp_path):
    hosts = cluster.expand_nodelist("node[01-04,07]")
    path = cluster.write_hostfile(str(tmp_path / "hostfile"), hosts, 8)
    assert open(path).read() == "".join(f"node0{i} slots=8\n" for i in (1, 2, 3, 4, 7))
    assert cluster.hostfile_text(["a", "b"], [2, 1]) == "a slots=2\nb slots=1\n"
    for hosts, slots in ((["a", "a"], 1), (["a"], 0), ([], 1), (["a", "b"], [1])):
        with pytest.raises(ValueError):
            cluster.hostfile_text(hosts, slots)


def test_slurm_layout():
    gpu = {"SLURM_JOB_NODELIST": "gpu[01-04,07]", "SLURM_GPUS_ON_NODE": "8", "SLURM_TASKS_PER_NODE": "8(x5)",
           "SLURM_JOB_ID": "123456"}
    lay = cluster.slurm_layout(gpu)
    assert lay == {"hosts": ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07"], "slots": [8] * 5, "master_addr": "gpu01",
                   "master_port": 20000 + 123456 % 20000}
    cpu = {"SLURM_JOB_NODELIST": "c[1-3]", "SLURM_TASKS_PER_NODE": "2(x2),1", "SLURM_JOB_ID": "7"}
    assert cluster.slurm_layout(cpu)["slots"] == [2, 2, 1]
    assert cluster.slurm_layout({**cpu, "PALU_SLOTS_PER_NODE": "4", "PALU_MASTER_ADDR": "10.0.0.1",
                                 "PALU_MASTER_PORT": "29500"}) == {
        "hosts": ["c1", "c2", "c3"], "slots": [4, 4, 4], "master_addr": "10.0.0.1", "master_port": 29500}
    with pytest.raises(RuntimeError, match="not inside a SLURM allocation"):
        cluster.slurm_layout({})


def test_cluster_cli(tmp_path, capsys):
    assert cluster.main(["expand", "n[1-2],m"]) == 0
    assert capsys.readouterr().out.split() == ["n1", "n2", "m"]
    os.environ.pop("PALU_SLOTS_PER_NODE", None)
    out = str(tmp_path / "hf")
    env = {"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_ID": "42"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        assert cluster.main(["hostfile", out]) == 0
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert capsys.readouterr().out.split() == ["n1", "20042"]
    assert open(out).read() == "n1 slots=4\nn2 slots=4\n"
    assert cluster.main(["expand", "n[2-1]"]) == 2


def _dry_run(tmp_path, env: dict, launcher: str) -> dict:
    """slurm/common.sh's palu_init + palu_command in a fake allocation; ``scontrol`` is a stub that expands the list
    with palu_ds.cluster (as SLURM would)."""
    stub = tmp_path / "bin"
    stub.mkdir(exist_ok=True)
    (stub / "scontrol").write_text(f'#!/bin/sh\n[ "$1 $2" = "show hostnames" ] || exit 9\n'
                                   f'exec {sys.executable} -m palu_ds.cluster expand "$3"\n')
    (stub / "scontrol").chmod(0o755)
    script = ('source slurm/common.sh; palu_init; palu_command launch/train.py --x 1; '
              'printf "%s\\n" "MASTER=$MASTER_ADDR:$MASTER_PORT" "WORLD=$PALU_WORLD" "DS=$PALU_DS_CONFIG" '
              '"ACC=${DS_ACCELERATOR:-}" "CMD=${PALU_CMD[*]}"; cat "$PALU_HOSTFILE"')
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "PALU_", "DS_ACCELERATOR", "CUDA_VISIBLE_DEVICES"))}
    full = {**base, "PATH": f"{stub}:{os.environ['PATH']}", "PALU_REPO": ROOT, "PALU_SHARED": str(tmp_path / "runs"),
            "PALU_LAUNCHER": launcher, "PALU_PYTHON": sys.executable, **env}
    p = subprocess.run(["bash", "-c", script], cwd=ROOT, env=full, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    out = dict(line.split("=", 1) for line in lines if re.match(r"^[A-Z]+=", line))
    out["hostfile"] = [line for line in lines if " slots=" in line]
    out["stderr"] = p.stderr
    return out


GPU_JOB = {"SLURM_JOB_ID": "4321", "SLURM_JOB_NODELIST": "gpu[01-03,07]", "SLURM_JOB_NUM_NODES": "4",
           "SLURM_GPUS_ON_NODE": "8", "SLURM_NTASKS_PER_NODE": "8", "SLURM_TASKS_PER_NODE": "8(x4)",
           "SLURM_CPUS_ON_NODE": "64", "SLURM_NTASKS": "32", "SLURM_SUBMIT_DIR": ROOT}


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun", "srun", "mpirun"])
def test_sbatch_scripts_on_four_gpu_nodes(tmp_path, launcher):
    r = _dry_run(tmp_path, GPU_JOB, launcher)
    assert r["hostfile"] == ["gpu01 slots=8", "gpu02 slots=8", "gpu03 slots=8", "gpu07 slots=8"]
    assert r["MASTER"] == "gpu01:24321" and r["WORLD"] == "32"
    assert r["DS"] == "ds_configs/zero3.json" and r["ACC"] == ""  # NCCL on the GPUs
    cmd = r["CMD"]
    if launcher in ("deepspeed", "torchrun"):  # one node launcher per node, started by srun (no ssh)
        assert cmd.startswith("srun --nodes=4 --ntasks=4 --ntasks-per-node=1 --cpus-per-task=64")
        assert "--gpus-per-node=8" in cmd and cmd.endswith("slurm/node_launch.sh launch/train.py --x 1")
    elif launcher == "srun":
        assert cmd.startswith("srun --ntasks=32 --ntasks-per-node=8") and "slurm/task.sh" in cmd
    else:
        assert cmd.startswith("mpirun -np 32 --hostfile ") and "--map-by ppr:8:node" in cmd
        assert "-x MASTER_ADDR -x MASTER_PORT" in cmd


def test_mpirun_passes_the_users_preloaded_allocator_to_every_rank(tmp_path):
    """mpirun starts remote ranks with only the variables named by -x: an LD_PRELOAD (jemalloc, BENCHMARKS' allocator
    paragraph) set for the job reaches them; unset, none is named."""
    assert "-x LD_PRELOAD" not in _dry_run(tmp_path, {**GPU_JOB, "LD_PRELOAD": ""}, "mpirun")["CMD"]
    assert "-x LD_PRELOAD" in _dry_run(tmp_path, {**GPU_JOB, "LD_PRELOAD": "libjemalloc.so.2"}, "mpirun")["CMD"]


def test_sbatch_scripts_on_one_cpu_node(tmp_path):
    env = {"SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "vm", "SLURM_JOB_NUM_NODES": "1",
           "SLURM_TASKS_PER_NODE": "2", "SLURM_NTASKS": "2", "SLURM_SUBMIT_DIR": ROOT}
    r = _dry_run(tmp_path, env, "deepspeed")
    assert r["hostfile"] == ["vm slots=2"] and r["WORLD"] == "2" and r["MASTER"] == "vm:20077"
    assert r["DS"] == "ds_configs/cpu/zero2.json" and r["ACC"] == "cpu"  # gloo on CPU
    assert r["CMD"].startswith("bash ") and r["CMD"].endswith("slurm/node_launch.sh launch/train.py --x 1")


def test_sbatch_scripts_count_gpus_from_cuda_visible_devices(tmp_path):
    """--gres=gpu:4 on a SLURM that does not set SLURM_GPUS_ON_NODE: the GPUs SLURM made visible."""
    env = {"SLURM_JOB_ID": "5", "SLURM_JOB_NODELIST": "g[1-2]", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_TASKS_PER_NODE": "4(x2)", "CUDA_VISIBLE_DEVICES": "0,1,2,3", "SLURM_SUBMIT_DIR": ROOT}
    r = _dry_run(tmp_path, env, "torchrun")
    assert r["hostfile"] == ["g1 slots=4", "g2 slots=4"] and r["WORLD"] == "8" and r["ACC"] == ""


def test_sbatch_scripts_refuse_a_wrong_setup(tmp_path):
    env = {"SLURM_JOB_ID": "5", "SLURM_JOB_NODELIST": "g1", "SLURM_TASKS_PER_NODE": "1", "SLURM_SUBMIT_DIR": ROOT}
    for extra, msg in (({"PALU_DEVICE": "gpu"}, "the job has no GPUs"), ({"PALU_REPO": "/nonexistent"}, "checkout")):
        with pytest.raises(AssertionError, match=msg):
            _dry_run(tmp_path, {**env, **extra}, "deepspeed")
    with pytest.raises(AssertionError, match="use deepspeed, torchrun, srun or mpirun"):
        _dry_run(tmp_path, env, "pdsh")


# ---------------------------------------------------------------------------------------------- real processes

STEPS = 30
# `make test` (CI) runs the reduced form; `make test-cluster` sets PALU_CLUSTER_FULL=1 and runs everything.
full_only = pytest.mark.cluster_full  # deselected by `make test` (-m "not cluster_full"), run by `make test-cluster`


def job_args(tiny, target, out=None, steps=STEPS, overrides_only=False):
    """launch/train.py's arguments (the sbatch script gives --deepspeed, --config and the output dirs itself)."""
    args = [] if overrides_only else ["--deepspeed", "ds_configs/cpu/zero2.json",
                                      "--config", "launch/configs/demo.yaml"]
    args += [f"model.path={target}", f"data.forget.source={tiny['data']}", f"data.retain.source={tiny['data']}",
             "method.name=grad_diff", "method.params={}", f"train.max_steps={steps}", "train.batch_size=4",
             "train.save_every=0", "data.max_length=64", "log.log_every=1"]
    return args + ([f"train.output_dir={out}"] if out else [])


def both_ranks_took_part(out: str) -> None:
    """Each rank writes its own RNG file into a checkpoint; rank 0 records the world size in the marker."""
    ckpt = sorted(glob.glob(os.path.join(out, "checkpoints", "step_*")))[-1]
    with open(os.path.join(ckpt, "COMPLETE")) as f:
        assert json.load(f)["world_size"] == 2
    assert os.path.isfile(os.path.join(ckpt, "rng_rank0.pt")) and os.path.isfile(os.path.join(ckpt, "rng_rank1.pt"))


def outputs_written(out: str, steps: int = STEPS) -> dict:
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    assert s["steps"] == steps
    assert os.path.isfile(os.path.join(out, "model", "model.safetensors"))
    assert glob.glob(os.path.join(out, "tensorboard", "events.out.tfevents.*")), "no TensorBoard event file"
    both_ranks_took_part(out)
    return s


def same_weights(a_dir: str, b_dir: str) -> None:
    """Exact resume: fp32 on CPU with the same 2 ranks is deterministic, whatever starts the ranks."""
    import torch

    a, b = state(os.path.join(a_dir, "model")), state(os.path.join(b_dir, "model"))
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def wait_for(cond, timeout: float, what: str, poll: float = 0.3):
    t = time.time()
    while time.time() - t < timeout:
        v = cond()
        if v:
            return v
        time.sleep(poll)
    raise TimeoutError(f"waited {timeout} s for {what}")


def read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def _mpirun(args) -> list[str]:
    return ["mpirun", "-np", "2", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none",
            sys.executable, "launch/train.py", *args]


@pytest.fixture(scope="module")
def mpirun_run(tiny, target, tmp_path_factory):
    """``mpirun -np 2 python launch/train.py``: no launcher of ours, the ranks find each other from OMPI_* (and
    MASTER_ADDR/PORT). Also the uninterrupted reference of the SLURM tests (the deepspeed launcher stands in when
    mpirun is missing)."""
    out = str(tmp_path_factory.mktemp("mpirun") / "run")
    args = job_args(tiny, target, out)
    if shutil.which("mpirun"):
        cmd = _mpirun(args)
    else:
        cmd = launcher_cmd("launch/train.py", args, 2)
    t = time.time()
    p = subprocess.run(cmd, cwd=ROOT, env=cpu_env(MASTER_PORT=str(free_port())), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, f"{cmd[0]} exited {p.returncode}\n{p.stdout[-4000:]}\n{p.stderr[-6000:]}"
    print(f"\n{os.path.basename(cmd[0])} 2 ranks: {time.time() - t:.1f} s")
    return {"out": out, "log": p.stdout + p.stderr, "mpirun": cmd[0] == "mpirun"}


@pytest.mark.slow
def test_mpirun_two_ranks(mpirun_run):
    if not mpirun_run["mpirun"]:
        pytest.skip("mpirun not installed (make install installs Debian's openmpi-bin)")
    outputs_written(mpirun_run["out"])
    assert f"done: {STEPS} steps" in mpirun_run["log"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A private single-host SLURM (2 CPUs) for this module; daemons stopped by PID afterwards."""
    from cluster_helpers import LocalSlurm, ensure_installed

    why = ensure_installed()
    if why:
        pytest.skip(f"no SLURM: {why}")
    s = LocalSlurm(str(tmp_path_factory.mktemp("slurm")), cpus=2)
    try:
        s.start()
    except Exception:
        s.stop()
        raise
    yield s
    s.stop()
    assert all(p.poll() is not None for p in s.procs.values())


def sbatch(shared, tiny, target, steps=STEPS) -> list[str]:
    return ["sbatch", "--wait", "--parsable", "--job-name=palu-test", "--nodes=1", "--ntasks-per-node=2",
            "--gpus-per-node=0", "--cpus-per-task=1", "--time=15:00", f"--output={shared}/slurm-%j.out",
            "slurm/train.sbatch", *job_args(tiny, target, steps=steps, overrides_only=True)]


def slurm_env(slurm, shared, **extra):
    env = cpu_env(PALU_SHARED=shared, PALU_CONFIG="launch/configs/demo.yaml", **extra)
    try:  # the scripts take the first node's name as MASTER_ADDR; a host whose own name does not resolve needs help
        socket.gethostbyname(slurm.node)
    except OSError:
        env["PALU_MASTER_ADDR"] = "127.0.0.1"
    return slurm.env(env)


LAUNCHERS = {  # how the job starts its ranks: PALU_* settings for slurm/common.sh
    "deepspeed": {},
    "srun": {"PALU_LAUNCHER": "srun"},
    "mpirun": {"PALU_LAUNCHER": "mpirun"},
    # the multi-node path on one node: srun starts one torchrun per node, which starts that node's ranks
    "torchrun-per-node": {"PALU_LAUNCHER": "torchrun", "PALU_SRUN_PER_NODE": "1"},
}


def check_slurm_job(log: str, out: str, launcher: str = "deepspeed") -> dict:
    via = launcher.split("-")[0]
    assert f"1 node(s) x 2 rank(s) = 2 on cpu via {via}" in log
    if via == "deepspeed":
        assert "--local_rank=0" in log and "--local_rank=1" in log
    assert f"done: {STEPS} steps" in log
    return outputs_written(out)


@pytest.mark.slow
@pytest.mark.parametrize("launcher,interruptions", [
    ("deepspeed", ["requeue"]),
    pytest.param("deepspeed", ["usr1", "requeue"], marks=full_only),
    pytest.param("srun", ["usr1", "requeue"], marks=full_only),
])
def test_sbatch_train_requeue_resume(slurm, mpirun_run, tiny, target, tmp_path_factory, launcher, interruptions):
    """``sbatch --wait slurm/train.sbatch`` with 2 tasks, interrupted mid-run and resumed each time from its
    checkpoint: it succeeds, both ranks took part, model and TensorBoard logs are there, and it ends with the steps
    and weights of the uninterrupted run.

    - ``requeue``: ``scontrol requeue`` (what preemption does): SLURM sends SIGTERM to every process of the job,
      the ranks checkpoint at the end of the step, SLURM requeues the job;
    - ``usr1``: ``scancel --signal=USR1 --batch`` (what ``--signal=B:USR1@300`` does near the time limit): the
      script passes it on to the ranks, they checkpoint, the script requeues the job itself.
    A requeued job is held ~2 min (BeginTime); the test releases it with ``scontrol update StartTime=now`` as soon
    as the node is idle again.
    """
    shared = str(tmp_path_factory.mktemp("shared"))
    t0 = time.time()
    sb = subprocess.Popen(sbatch(shared, tiny, target), cwd=ROOT, env=slurm_env(slurm, shared, **LAUNCHERS[launcher]),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job = None
    try:
        job = wait_for(lambda: sb.stdout.readline().strip().split(";")[0], 60, "the job id")
        out_log = os.path.join(shared, f"slurm-{job}.out")

        def steps_seen():
            return len(re.findall(r"\[palu_ds r0\] step (\d+)/\d+ ", read(out_log)))  # progress: step N/total | ...

        for n, how in enumerate(interruptions, 1):
            done = steps_seen()
            wait_for(lambda: steps_seen() >= done + 3 or sb.poll() is not None, 300, f"3 more steps before {how}")
            slurm.run(["scancel", "--signal=USR1", "--batch", job] if how == "usr1" else ["scontrol", "requeue", job])
            wait_for(lambda: read(out_log).count("r0] preempted at step") >= n or sb.poll() is not None, 120,
                     f"the checkpoint after {how}")
            wait_for(lambda: sb.poll() is not None or slurm.job(job).get("JobState") == "PENDING", 120,
                     f"job {job} requeued")
            # the previous run must be gone from the node first (else: "Job credential revoked")
            wait_for(slurm.node_idle, 120, "the node to be idle")
            time.sleep(2)
            slurm.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=False)
            wait_for(lambda: read(out_log).count("resumed from") >= n or sb.poll() is not None, 300, f"resume #{n}")
        rc = sb.wait(600)
    finally:
        if sb.poll() is None:
            if job:
                slurm.run(["scancel", job], check=False)
            sb.kill()
    log = read(out_log)
    assert rc == 0, f"job {job} ended with {rc}: {sb.stderr.read()}\n{log[-6000:]}"
    print(f"\nsbatch --wait ({launcher}), {len(interruptions)} interruption(s): {time.time() - t0:.1f} s")
    check_slurm_job(log, os.path.join(shared, f"palu-test-{job}"), launcher)
    stops = [int(s) for s in re.findall(r"\[palu_ds r0\] preempted at step (\d+)", log)]
    resumes = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", log)]
    assert len(stops) == len(interruptions) and resumes == stops and sorted(stops) == stops, (stops, resumes)
    assert 0 < stops[0] and stops[-1] < STEPS
    assert len(re.findall(r"\[palu_ds r1\] preempted at step", log)) == len(interruptions)  # rank 1 too
    assert f"(restart {len(interruptions)})" in log
    if "usr1" in interruptions:
        assert "received SIGUSR1" in log and "requeueing job" in log
    if "requeue" in interruptions:
        assert "received SIGTERM" in log
    same_weights(mpirun_run["out"], os.path.join(shared, f"palu-test-{job}"))


@pytest.mark.slow
@full_only
@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun-per-node", "mpirun"])
def test_sbatch_train_uninterrupted(slurm, mpirun_run, tiny, target, tmp_path_factory, launcher):
    shared = str(tmp_path_factory.mktemp("shared"))
    p = subprocess.run(sbatch(shared, tiny, target), cwd=ROOT, env=slurm_env(slurm, shared, **LAUNCHERS[launcher]),
                       capture_output=True, text=True, timeout=600)
    job = p.stdout.strip().split(";")[0]
    log = read(os.path.join(shared, f"slurm-{job}.out"))
    assert p.returncode == 0, f"sbatch --wait exited {p.returncode}: {p.stderr}\n{log[-5000:]}\n{slurm.logs()}"
    check_slurm_job(log, os.path.join(shared, f"palu-test-{job}"), launcher)
    same_weights(mpirun_run["out"], os.path.join(shared, f"palu-test-{job}"))


@pytest.mark.slow
@full_only
def test_sbatch_precompute_and_eval(slurm, tiny, target, tmp_path_factory):
    """slurm/precompute.sbatch writes one reference-cache shard per rank and the manifest; slurm/eval.sbatch
    evaluates a model data-parallel (srun: one task per rank)."""
    shared = str(tmp_path_factory.mktemp("shared"))
    out = os.path.join(shared, "run")
    common = ["--wait", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
              f"--output={shared}/slurm-%x-%j.out"]
    p = subprocess.run(["sbatch", *common, "slurm/precompute.sbatch", f"model.path={target}",
                        f"data.forget.source={tiny['data']}", f"data.retain.source={tiny['data']}",
                        "data.max_length=64"], cwd=ROOT, env=slurm_env(slurm, shared, PALU_OUTPUT_DIR=out),
                       capture_output=True, text=True, timeout=600)
    logs = lambda: "".join(read(f) for f in glob.glob(os.path.join(shared, "slurm-*.out")))  # noqa: E731
    assert p.returncode == 0, p.stderr + logs()[-5000:]
    cache = os.path.join(out, "reference_cache")
    assert os.path.isfile(os.path.join(cache, "manifest.json"))
    assert sorted(os.listdir(cache)) == ["forget.rank0.safetensors", "forget.rank1.safetensors", "manifest.json"]
    p = subprocess.run(["sbatch", *common, "slurm/eval.sbatch", "--model", target, "--suite", "tofu", "--split",
                        "forget10", "--data", tiny["data"], "--splits", "forget", "--max-new-tokens", "8",
                        "--max-examples", "6", "--no-forget-quality", "--out", os.path.join(shared, "eval")],
                       cwd=ROOT, env=slurm_env(slurm, shared, PALU_LAUNCHER="srun"), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr + logs()[-5000:]
    with open(os.path.join(shared, "eval", "summary.json")) as f:
        assert json.load(f)["world_size"] == 2


def _kill_rank_one(cmd, env, log_path, find_victim, progress=None, timeout=60.0):
    """Start ``cmd``, SIGKILL rank 1 after step 3 (as logged by rank 0 to ``progress()``, default: the command's
    output); return (exit status or None if still running ``timeout`` s later, seconds from the kill to the exit)."""
    progress = progress or (lambda: read(log_path))
    with open(log_path, "w") as log:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: p.poll() is not None or "r0] step 3/" in progress(), 300, "step 3")
        assert p.poll() is None, read(log_path)[-4000:] + progress()[-4000:]
        victim = wait_for(find_victim, 30, "rank 1")
        t = time.time()
        os.kill(victim, signal.SIGKILL)
        try:
            rc = p.wait(timeout)
        except subprocess.TimeoutExpired:
            rc = None
        return rc, time.time() - t
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def _ranks_named(marker: str) -> list:
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "launch/train.py" in cmd and marker in cmd and "deepspeed.launcher" not in cmd \
                and not cmd.startswith("mpirun"):
            found.append(proc)
    return found


def _rank_one(marker: str):
    for proc in _ranks_named(marker):
        try:
            env = proc.environ()
        except Exception:
            continue
        if env.get("RANK") == "1" or env.get("OMPI_COMM_WORLD_RANK") == "1" or "--local_rank=1" in proc.cmdline():
            return proc.pid
    return None


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["deepspeed", pytest.param("mpirun", marks=full_only)])
def test_killed_rank_fails_fast(tiny, target, tmp_path, launcher):
    """Rank 1 SIGKILLed mid-run: rank 0's gloo all-reduce fails (connection reset) and the launcher, which polls its
    children, stops the rest -- non-zero exit within 60 s, no rank left behind."""
    out = str(tmp_path / f"kill-{launcher}")
    args = job_args(tiny, target, out, steps=100000)
    if launcher == "deepspeed":
        cmd = launcher_cmd("launch/train.py", args, 2)
    else:
        if not shutil.which("mpirun"):
            pytest.skip("mpirun not installed")
        cmd = _mpirun(args)
    log = str(tmp_path / "log")
    rc, dt = _kill_rank_one(cmd, cpu_env(MASTER_PORT=str(free_port())), log, lambda: _rank_one(out))
    print(f"\n{launcher}: exit {rc} {dt:.1f} s after SIGKILL of rank 1")
    assert rc is not None, f"{launcher} still running 60 s after rank 1 was killed:\n{read(log)[-4000:]}"
    assert rc != 0 and dt < 60
    assert wait_for(lambda: not _ranks_named(out), 10, "no rank left")


@pytest.mark.slow
@full_only
def test_killed_rank_fails_the_slurm_job(slurm, tiny, target, tmp_path_factory):
    shared = str(tmp_path_factory.mktemp("shared"))
    marker = os.path.join(shared, "palu-test-")

    def job_log():
        return "".join(read(f) for f in glob.glob(os.path.join(shared, "slurm-*.out")))

    rc, dt = _kill_rank_one(sbatch(shared, tiny, target, steps=100000), slurm_env(slurm, shared),
                            os.path.join(shared, "sbatch.log"), lambda: _rank_one(marker), progress=job_log)
    print(f"\nSLURM job: sbatch --wait exit {rc} {dt:.1f} s after SIGKILL of rank 1")
    assert rc is not None, f"the SLURM job still ran 60 s after rank 1 was killed:\n{job_log()[-4000:]}"
    assert rc != 0 and dt < 60, job_log()[-3000:]
    assert wait_for(lambda: not _ranks_named(marker), 10, "no rank left")
