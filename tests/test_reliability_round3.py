"""Faults of issue 26 (reliability, round 3), each injected: two runs on one output folder, ranks that would resume
from different checkpoints, a resume with a changed config, every checkpoint broken, a stale model beside newer
checkpoints, malformed YAML configs, DeepSpeed's own overflow skips, models that evaluation cannot load, a hub model
moved to another revision, a truncated reference-cache manifest."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from test_reliability import _StubEngine, _saved, _train_args

BASE = ["model.path=m", "data.forget.source=f.jsonl", "data.retain.source=r.jsonl"]


# ------------------------------------------------------------------------------------------- 1. the output folder lock
def test_a_held_output_folder_is_refused_naming_the_holder(tmp_path):
    import socket

    from palu_ds.run_folder import OutputDirInUse, OutputLock

    first = OutputLock(str(tmp_path)).acquire()
    with pytest.raises(OutputDirInUse, match=rf"in use by another run \(host {socket.gethostname()}, pid "
                                             rf"{os.getpid()}, since"):
        OutputLock(str(tmp_path)).acquire()  # another open file description: flock refuses it
    first.release()
    OutputLock(str(tmp_path)).acquire().release()  # released: free again


def _resume_worker(rank, world, port, root, out):
    """Rank 1 sees another listing of the folder (a save landing meanwhile): both ranks still resume rank 0's choice;
    two different picks are refused on both ranks by the collective check."""
    import torch.distributed as dist

    from palu_ds import checkpoint

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo")
    try:
        if rank == 1:
            checkpoint.complete_checkpoints = lambda r: [os.path.join(r, "step_000002")]
        chosen = checkpoint.resume_point(root)
        try:
            checkpoint.check_same_checkpoint(os.path.join(root, f"step_00000{2 + 2 * rank}"), 2 + 2 * rank)
            refused = None
        except checkpoint.ResumeRefused as e:
            refused = str(e)
        checkpoint.check_same_checkpoint(chosen, 4)  # the same pick passes
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump({"chosen": chosen, "refused": refused}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_rank_0_chooses_the_checkpoint_and_the_ranks_check_they_agree(tmp_path):
    from e2e import free_port

    root = _saved(tmp_path, steps=(2, 4))
    mp.spawn(_resume_worker, args=(2, free_port(), root, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["chosen"] == r1["chosen"] == os.path.join(root, "step_000004")
    for r in (r0, r1):
        assert r["refused"].startswith("the ranks would resume from different checkpoints: rank 0: ")
        assert "step_000002 (step 2), rank 1: " in r["refused"] and r["refused"].endswith("step_000004 (step 4, another COMPLETE marker)")


# ------------------------------------------------------------------------------------------- 2. config changes
def _changes(old_overrides, new_overrides):
    from dataclasses import asdict

    from palu_ds.config import config_changes, load_config, resolve

    def flat(overrides):
        run = resolve(load_config(None, BASE + overrides))
        d = json.loads(json.dumps(asdict(run.cfg)))
        d["method"]["hparams"] = json.loads(json.dumps(dict(run.hp)))
        return d

    return config_changes(flat(old_overrides), flat(new_overrides))


def test_bookkeeping_keys_may_change_and_the_rest_is_named():
    free = ["log.log_every=7", "train.save_every=3", "train.timeout=30", "train.keep_last=5", "train.max_steps=9",
            "train.max_nonfinite=9", "eval.batch_size=2", "train.output_dir=elsewhere", "train.resume=force"]
    assert _changes([], free) == {}
    assert set(_changes([], ["train.lr=1e-3", "train.batch_size=2", "method.name=npo", "data.max_length=99",
                             "train.seed=1", "method.params.gamma=2", "train.scheduler=cosine"])) == {
        "train.lr", "train.batch_size", "method.name", "data.max_length", "train.seed", "method.params",
        "method.hparams.gamma", "train.scheduler"}
    assert _changes(["train.scheduler=linear"], ["train.scheduler=linear", "train.max_steps=9"]) == {
        "train.max_steps": {"checkpoint": None, "run": 9}}  # the run's length moves a linear schedule: refused


@pytest.mark.e2e  # the real CLI, one process
def test_one_run_per_folder_resume_refuses_changes_and_broken_checkpoints_stop(tiny, tmp_path):
    """One output folder through the real CLI: held by another process -> refused naming its host and pid; the
    holder SIGKILLed -> free again; resumed with another lr or batch size -> refused naming the key (nothing renamed
    or lost); train.resume=force -> continues, the change in summary.json, the earlier run's model and summary set
    aside; every checkpoint truncated -> the run stops and says so (twice: not a silent restart the second time)."""
    import glob
    import socket

    from e2e import folder_held, launch, summary

    out = str(tmp_path / "run")
    dup = tmp_path / "dup.yaml"
    demo = open("launch/configs/demo.yaml").read()
    dup.write_text(demo + "train:\n  lr: 1e-3\n")  # a second train: section
    p = launch("launch/train.py", ["--deepspeed", "ds_configs/cpu/zero2.json", "--config", str(dup)], nproc=1,
               check=False, timeout=300)
    line = demo.count("\n") + 1
    assert p.returncode == 2, p.stderr[-3000:]
    assert f"config error: {dup}, line {line}: key train is given twice (first on line 13)" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr

    def cli(*extra):
        args = _train_args(tiny, tiny["model"], out, "method.name=grad_diff", "method.params={}",
                           "train.batch_size=4", "train.save_every=1", "train.keep_last=2", *extra)
        return launch("launch/train.py", args, nproc=1, check=False, timeout=300)

    with folder_held(out) as pid:  # afterwards killed, as a crashed run: the kernel drops its flock
        p = cli("train.max_steps=2")
        assert p.returncode == 2, p.stderr[-3000:]
        assert f"is in use by another run (host {socket.gethostname()}, pid {pid}," in p.stderr
        assert "Traceback" not in p.stderr and not os.path.exists(os.path.join(out, "checkpoints"))
    p = cli("train.max_steps=2")
    assert p.returncode == 0, p.stderr[-3000:]
    first = summary(out)
    assert first["steps"] == 2 and first["config_changes"] == {}

    for change, key in (("train.lr=1e-3", "train.lr (checkpoint 0.0005, now 0.001)"),
                        ("train.batch_size=2", "train.batch_size (checkpoint 4, now 2)")):
        p = cli("train.max_steps=3", change)
        assert p.returncode == 2, p.stderr[-3000:]
        assert "config error: train.resume: this run's config differs" in p.stderr and key in p.stderr, p.stderr
        assert "Traceback" not in p.stderr and "max() arg" not in p.stderr
        assert summary(out) == first and os.path.isfile(os.path.join(out, "model", "model.safetensors"))
        assert os.path.isfile(os.path.join(out, "checkpoints", "step_000002", "COMPLETE"))

    p = cli("train.max_steps=3", "train.lr=1e-3", "train.resume=force", "log.log_every=2")
    assert p.returncode == 0, p.stderr[-3000:]
    s = summary(out)
    assert s["steps"] == 3 and s["config_changes"] == {"step 2: train.lr": {"checkpoint": 0.0005, "run": 0.001}}
    (stale_model,) = glob.glob(os.path.join(out, "model.stale-*"))
    (stale_summary,) = glob.glob(os.path.join(out, "summary.stale-*.json"))
    assert os.path.isfile(os.path.join(stale_model, "model.safetensors")) and json.load(open(stale_summary)) == first
    assert "is an earlier run's: renamed to model.stale-" in p.stderr

    for ckpt in glob.glob(os.path.join(out, "checkpoints", "step_*")):  # every checkpoint broken
        with open(os.path.join(ckpt, "mp_rank_00_model_states.pt"), "r+b") as f:
            f.truncate(100)
    for _ in range(2):
        p = cli("train.max_steps=4", "train.lr=1e-3")
        assert p.returncode == 2, p.stderr[-3000:]
        assert f"every checkpoint under {os.path.join(out, 'checkpoints')} is broken" in p.stderr, p.stderr[-3000:]
        assert "train.resume=never to start afresh" in p.stderr and "Traceback" not in p.stderr
    assert summary(out) == s  # nothing restarted, nothing overwritten


def test_every_checkpoint_broken_stops_unless_resume_never(tmp_path):
    from palu_ds import checkpoint

    root = _saved(tmp_path, steps=(2, 4))
    for step in (2, 4):
        path = os.path.join(root, f"step_00000{step}", "mp_rank_00_model_states.pt")
        open(path, "ab").write(b"x")
    with pytest.raises(checkpoint.ResumeRefused, match=r"every checkpoint under .* is broken \(.*step_000004.*has "):
        checkpoint.resume_point(root)
    with pytest.raises(checkpoint.ResumeRefused, match=r"step_000002: marked BROKEN by an earlier run"):
        checkpoint.resume_point(root)  # the second run is not a silent restart either
    assert checkpoint.resume_point(str(tmp_path / "none")) is None  # no checkpoint at all: a fresh start


def test_a_resumed_sampler_saved_with_another_batch_size_moves_on():
    from palu_ds.sampling import BatchStream

    s = BatchStream(list(range(10)), 5, 0, 1, 0, list)  # 2 batches an epoch
    s.load_state_dict({"epoch": 0, "pos": 4})  # saved at batch 4 of 5 with batch size 2 (train.resume=force)
    assert s.state_dict() == {"epoch": 1, "pos": 0} and len(s.next()) == 5


# ------------------------------------------------------------------------------------------- 6. YAML config files
@pytest.mark.parametrize("name,content,message", [
    ("dup.yaml", "train:\n  lr: 1e-5\n  batch_size: 2\n  lr: 2e-5\n",
     r"dup.yaml, line 4: key train.lr is given twice \(first on line 2\)"),
    ("list.yaml", "- train\n- lr\n", r"list.yaml, line 1: the top level is a list, not a mapping of sections"),
    ("string.yaml", "# a comment\ntrain.lr=1e-5\n", r"string.yaml, line 2: the top level is a str, not a mapping"),
    ("syntax.yaml", "train:\n  lr: [1, 2\n", r"syntax.yaml, line 3, column 1: not valid YAML \(expected ','"),
    ("latin1.yaml", b"train:\n  output_dir: caf\xe9\n", r"latin1.yaml, line 2: is not UTF-8 \(byte 0xe9\)"),
    ("section.yaml", "train: [1, 2]\n", r"section.yaml: train: expected a mapping, got list"),
])
def test_malformed_yaml_names_file_line_and_key(tmp_path, name, content, message):
    from palu_ds.config import ConfigError, load_config

    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConfigError, match=message):
        load_config(str(path), BASE)


# ------------------------------------------------------------------------------------------- 5. evaluation input
@pytest.fixture(scope="module")
def eval_env(tmp_path_factory):
    from palu_ds.data.synthetic import corpus_texts, write_tofu
    from palu_ds.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("evalin")
    make_tiny_model(root / "model", corpus_texts())
    return {"root": root, "model": str(root / "model"), "tofu": str(write_tofu(root / "tofu", n=3))}


def _evaluate(env, model, *extra):
    from e2e import ROOT, cpu_env

    cmd = [sys.executable, "palu_eval/run.py", "--model", model, "--suite", "tofu", "--split", "forget10", "--data",
           env["tofu"], "--no-forget-quality", "--max-new-tokens", "4", "--out", str(env["root"] / "out"), *extra]
    return subprocess.run(cmd, cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=300)


def _copy_model(env, name):
    import shutil

    dst = env["root"] / name
    shutil.copytree(env["model"], dst)
    return dst


@pytest.mark.e2e  # the real evaluation CLI, one process; bad paths fail before transformers is imported
@pytest.mark.parametrize("case", ["truncated", "data_folder", "empty", "missing", "nan_weights"])
def test_evaluation_refuses_a_model_it_cannot_use_naming_it(eval_env, case):
    from safetensors.torch import load_file, save_file

    model = {"data_folder": eval_env["tofu"], "missing": str(eval_env["root"] / "nope" / "model")}.get(case)
    if case == "truncated":
        model = _copy_model(eval_env, "truncated")
        w = model / "model.safetensors"
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    elif case == "empty":
        model = eval_env["root"] / "empty"
        model.mkdir()
    elif case == "nan_weights":
        model = _copy_model(eval_env, "nan")
        state = load_file(model / "model.safetensors")
        name = sorted(state)[1]
        state[name][0] = float("nan")
        save_file(state, model / "model.safetensors", metadata={"format": "pt"})
    message = {"truncated": "model.safetensors does not read (truncated or corrupt",
               "data_folder": "not a model folder (no config.json); it holds ",
               "empty": "the folder is empty", "missing": "no such folder",
               "nan_weights": "the weights hold NaN/inf in 1 tensor(s): "}[case]
    p = _evaluate(eval_env, str(model))
    assert p.returncode == 2, p.stderr[-3000:]
    assert f"error: --model {model}: {message}" in p.stderr, p.stderr[-3000:]
    assert "Traceback" not in p.stderr and not (eval_env["root"] / "out").exists()
    if case == "nan_weights":
        assert name in p.stderr


@pytest.mark.e2e
def test_evaluation_refuses_non_finite_scores_and_ends_at_its_time_bound(eval_env):
    """Finite weights whose outputs overflow (the LM head scaled to 1e38): the scores are NaN/inf -> exit 2, nothing
    written. --timeout: past it the process exits 124 with a message naming the bound, nothing written; in time,
    the run is as without it."""
    from safetensors.torch import load_file, save_file

    model = _copy_model(eval_env, "overflow")
    state = load_file(model / "model.safetensors")
    head = next(k for k in state if "embed" in k or "lm_head" in k)
    state[head] = state[head] * 1e38
    assert torch.isfinite(state[head]).all()
    save_file(state, model / "model.safetensors", metadata={"format": "pt"})
    p = _evaluate(eval_env, str(model))
    assert p.returncode == 2, p.stderr[-3000:]
    assert "error: the scores hold NaN/inf (" in p.stderr and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert not (eval_env["root"] / "out").exists()
    p = _evaluate(eval_env, eval_env["model"], "--timeout", "0.2")
    assert p.returncode == 124, p.stderr[-3000:]
    assert f"the evaluation of {eval_env['model']} did not finish within --timeout=0.2 s" in p.stderr
    assert "no result was written" in p.stderr and not (eval_env["root"] / "out").exists()
    p = _evaluate(eval_env, eval_env["model"], "--timeout", "600")  # in time: both JSONs, status 0
    assert p.returncode == 0, p.stderr[-3000:]
    assert {f.name for f in (eval_env["root"] / "out").iterdir()} == {"results.json", "summary.json"}


# ------------------------------------------------------------------------------------------- 4. DeepSpeed's own skips
@pytest.mark.slow
def test_deepspeeds_overflow_skips_are_counted_and_end_the_run_by_the_streak_rule(tiny, tmp_path):
    """2 ranks, ZeRO-2: from step 3 on rank 1's loss stays finite but its gradient is NaN (the issue's lr-30 run,
    injected): DeepSpeed's overflow check (agreed over the ranks) skips the update and bumps its skipped_steps; both
    ranks count it, log it, and stop after max_nonfinite=2 such steps with a checkpoint, as for a NaN loss."""
    from e2e import FAULTY, launch

    out = str(tmp_path / "overflow")
    p = launch(FAULTY, ["grad_nan_from=3,grad_nan_rank=1",
                        *_train_args(tiny, tiny["model"], out, "method.name=grad_diff", "method.params={}",
                                     "train.batch_size=4", "train.max_steps=8", "train.max_nonfinite=2")], check=False)
    text = p.stdout + p.stderr
    assert p.returncode != 0, text[-4000:]
    assert "step 3: DeepSpeed skipped the update (non-finite gradient norm" in text, text[-4000:]
    assert "step 4: DeepSpeed skipped the update" in text and "step 5: DeepSpeed" not in text
    assert ("2 optimizer steps in a row had a non-finite loss term or gradient (step 4; DeepSpeed's own overflow "
            "skips so far: 2)") in text
    marker = json.load(open(os.path.join(out, "checkpoints", "step_000004", "COMPLETE")))
    assert marker["skipped"] == 2 and marker["consecutive_bad"] == 2 and marker["streak_start"] == 3
    assert marker["last_scalars"]["deepspeed_skipped_steps"] == 2.0
    assert not os.path.exists(os.path.join(out, "model"))


# ------------------------------------------------------------------------------------------- 3. hub models, 7. manifest
def _fake_hub(tiny, tmp_path):
    """An offline hub cache holding org/tiny at two commits (the second with other weights), refs/main unset."""
    import shutil

    from safetensors.torch import load_file, save_file

    hub = tmp_path / "hub"
    repo = hub / "models--org--tiny"
    commits = ["a" * 40, "b" * 40]
    for c in commits:
        shutil.copytree(tiny["model"], repo / "snapshots" / c)
    w = repo / "snapshots" / commits[1] / "model.safetensors"
    state = load_file(w)
    name = sorted(state)[0]
    state[name] = state[name] + 0.5
    save_file(state, w, metadata={"format": "pt"})
    (repo / "refs").mkdir()
    return hub, repo, commits


def test_a_hub_model_is_keyed_by_its_resolved_revision_and_content(tiny, tmp_path, monkeypatch):
    """A fake offline hub cache (models--org--tiny/snapshots/<commit>/ + refs/main): the reference cache key of the
    hub name holds the commit and the snapshot's digest; refs/main moved to a snapshot with other weights changes
    the key, so the old reference cache is refused (CacheMismatch naming 'model') instead of reused."""
    from palu_ds.reference import model_fingerprint
    from palu_ds.reference.key import _diff

    hub, repo, commits = _fake_hub(tiny, tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PALU_DS_CACHE", str(tmp_path / "digests"))
    (repo / "refs" / "main").write_text(commits[0])
    first = model_fingerprint("org/tiny")
    assert first.startswith(f"hub:org/tiny@{commits[0]}:")
    assert first.endswith(model_fingerprint(str(repo / "snapshots" / commits[0])))
    (repo / "refs" / "main").write_text(commits[1])  # the hub cache moved to a revision with other weights
    second = model_fingerprint("org/tiny")
    assert second.startswith(f"hub:org/tiny@{commits[1]}:") and second != first
    assert _diff({"model": first, "K": 5}, {"model": second, "K": 5}) == ["model"]
    with pytest.raises(RuntimeError, match=r"model org/absent: not a local folder, not in the hub cache"):
        model_fingerprint("org/absent")


@pytest.mark.e2e  # the real precompute CLI, one process, twice
def test_a_hub_model_moved_to_another_revision_invalidates_the_reference_cache(tiny, tmp_path):
    from e2e import launch

    hub, repo, commits = _fake_hub(tiny, tmp_path)
    env = {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "PALU_DS_CACHE": str(tmp_path / "digests")}
    args = _train_args(tiny, "org/tiny", str(tmp_path / "run"))
    (repo / "refs" / "main").write_text(commits[0])
    p = launch("launch/precompute.py", args, nproc=1, env=env, check=False, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    (repo / "refs" / "main").write_text(commits[1])
    p = launch("launch/precompute.py", args, nproc=1, env=env, check=False, timeout=300)
    assert p.returncode == 2, p.stderr[-3000:]
    assert f"differing field(s): model (cache 'hub:org/tiny@{commits[0]}:" in p.stderr, p.stderr[-3000:]
    assert f"run 'hub:org/tiny@{commits[1]}:" in p.stderr and "Traceback" not in p.stderr


def test_a_truncated_manifest_is_an_error_naming_it(tmp_path):
    from palu_ds.reference import MANIFEST, CachedReference

    path = tmp_path / MANIFEST
    path.write_text('{"key": {"model": "ab')
    with pytest.raises(RuntimeError, match=rf"{path} is unreadable \(.*\): the reference cache's manifest is damaged"):
        CachedReference(str(tmp_path))


def test_stale_outputs_are_set_aside_keeping_one_generation(tmp_path, caplog):
    import glob
    import logging

    from palu_ds.run_folder import set_aside_stale_outputs

    (tmp_path / "checkpoints").mkdir()
    for generation in (1, 2):
        (tmp_path / "model").mkdir()
        (tmp_path / "model" / "model.safetensors").write_text(str(generation))
        (tmp_path / "summary.json").write_text(json.dumps({"steps": generation}))
        for old in glob.glob(str(tmp_path / "*.stale-*")):  # distinct stamps without waiting a second
            os.rename(old, old.replace("stale-", "stale-0"))
        with caplog.at_level(logging.WARNING, "palu_ds"):
            set_aside_stale_outputs(str(tmp_path))
    assert not (tmp_path / "model").exists() and not (tmp_path / "summary.json").exists()
    (model,) = glob.glob(str(tmp_path / "model.stale-*"))  # one generation: the older copy is gone
    (summ,) = glob.glob(str(tmp_path / "summary.stale-*.json"))
    assert open(os.path.join(model, "model.safetensors")).read() == "2" and json.load(open(summ)) == {"steps": 2}
    assert "is an earlier run's: renamed to model.stale-" in caplog.text and "(an older stale copy)" in caplog.text
