"""Crash-safe checkpoints around DeepSpeed's: a checkpoint counts only once its COMPLETE marker exists.

Layout: ``<output>/checkpoints/step_000010/`` holds DeepSpeed's engine files (tag ``step_000010``), one
``rng_rank<r>.pt`` per rank (python, numpy, torch RNG states as tensors and plain numbers, loaded with
``weights_only=True``) and, written last by rank 0 through an atomic rename after a barrier, ``COMPLETE`` (JSON: the
size and sha256 of every file of the folder -- each rank hashes the files it wrote --, then the client state: step,
dual variable, sampler positions, counters). A crash mid-write leaves no marker, so the directory is ignored on resume
and pruned by the next save. On resume the newest complete checkpoint is verified against its marker (sizes on every
rank, each rank's own files by checksum); a broken one is reported by file name and the previous one is used.

Trust: DeepSpeed's loader unpickles its ``*.pt`` files (``torch.load(weights_only=False)``), which runs whatever code
a crafted file holds. Checkpoint folders must therefore be trusted: the folders a run writes are made writable by
their owner only, and resuming from a folder (or a file in it) that another user could write is refused.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil

import numpy as np
import torch

from palu_ds import dist
from palu_ds.atomic import atomic_path
from palu_ds.integrity import check_not_writable_by_others, file_digest, make_private

MARKER = "COMPLETE"
BROKEN = "BROKEN"  # what a COMPLETE marker is renamed to once its checkpoint is found broken
_TAG = re.compile(r"^step_(\d+)$")
_OLDER = "a checkpoint of an older palu_ds"
_RANK_FILE = re.compile(r"(?:zero_pp_rank_|rng_rank)(\d+)[_.]")  # the files rank r writes (DeepSpeed's names, ours)


class ResumeRefused(RuntimeError):
    """No safe way to continue from the output folder's checkpoints; the message says what to do."""


def tag_for(step: int) -> str:
    return f"step_{step:06d}"


def complete_checkpoints(ckpt_root: str) -> list[str]:
    """Complete checkpoint dirs under ``ckpt_root``, oldest first."""
    if not os.path.isdir(ckpt_root):
        return []
    found = [(int(m.group(1)), d) for d in os.listdir(ckpt_root) if (m := _TAG.match(d))
             and os.path.isfile(os.path.join(ckpt_root, d, MARKER))]
    return [os.path.join(ckpt_root, d) for _, d in sorted(found)]


def latest(ckpt_root: str) -> str | None:
    done = complete_checkpoints(ckpt_root)
    return done[-1] if done else None


def _rng_state() -> dict:
    """This process's RNG states as tensors and plain numbers (loadable with ``torch.load(weights_only=True)``)."""
    version, state, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python_version": int(version), "python_state": torch.tensor(state, dtype=torch.int64),
            "python_gauss": gauss, "numpy_keys": torch.from_numpy(keys.astype(np.int64)), "numpy_pos": int(pos),
            "numpy_has_gauss": int(has_gauss), "numpy_gauss": float(cached), "torch": torch.get_rng_state()}


def _set_rng_state(rng: dict) -> None:
    random.setstate((rng["python_version"], tuple(rng["python_state"].tolist()), rng["python_gauss"]))
    np.random.set_state(("MT19937", rng["numpy_keys"].numpy().astype(np.uint32), rng["numpy_pos"],
                         rng["numpy_has_gauss"], rng["numpy_gauss"]))
    torch.set_rng_state(rng["torch"])


def _owner(name: str) -> int:
    """The rank that hashes (and verifies) file ``name``: the rank in its name, else rank 0."""
    m = _RANK_FILE.search(name)
    return int(m.group(1)) if m else 0


def _files(path: str) -> list[str]:
    return sorted(n for n in os.listdir(path) if n not in (MARKER, MARKER + ".tmp") and
                  os.path.isfile(os.path.join(path, n)))


def _describe_own_files(path: str) -> dict:
    """{name: {bytes, sha256}} of the files of ``path`` this rank owns (its own shards; rank 0 also the shared ones)."""
    return {n: {"bytes": os.path.getsize(os.path.join(path, n)), "sha256": file_digest(os.path.join(path, n))}
            for n in _files(path) if _owner(n) % dist.world() == dist.rank()}


def save(engine, ckpt_root: str, step: int, client_state: dict, keep_last: int,
         protect_before: int | None = None) -> str:
    tag = tag_for(step)
    path = os.path.join(ckpt_root, tag)
    if dist.is_main() and os.path.isdir(path):
        shutil.rmtree(path)  # an incomplete leftover of a crashed save at this step
    dist.barrier()
    engine.save_checkpoint(ckpt_root, tag=tag, client_state={"palu_ds": client_state}, save_latest=False)
    torch.save(_rng_state(), os.path.join(path, f"rng_rank{dist.rank()}.pt"))
    dist.barrier()
    files = {}
    for part in dist.all_gather_object(_describe_own_files(path)):  # every rank hashes what it wrote
        files.update(part)
    if dist.is_main():
        make_private(path)
        make_private_dir(ckpt_root)
        with atomic_path(os.path.join(path, MARKER)) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"world_size": dist.world(), "files": files, **client_state}, f)
            make_private(tmp)  # whatever the umask (002 is common): resume checks that nobody else can write here
        _prune(ckpt_root, keep_last, keep=path, protect_before=protect_before)
    dist.barrier()
    return path


def make_private_dir(path: str) -> None:
    """``chmod go-w`` on the folder itself (not its content)."""
    import stat

    mode = os.stat(path).st_mode
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        os.chmod(path, mode & ~(stat.S_IWGRP | stat.S_IWOTH))


def verify(path: str) -> str | None:
    """What is wrong with complete checkpoint ``path`` as seen from this rank (every file's size, this rank's own
    files' sha256, against the COMPLETE marker), or None."""
    try:
        with open(os.path.join(path, MARKER), encoding="utf-8") as f:
            recorded = json.load(f).get("files")
    except (OSError, ValueError) as e:
        return f"{os.path.join(path, MARKER)} is unreadable ({e})"
    if not recorded:
        return f"{os.path.join(path, MARKER)} records no file sizes or checksums ({_OLDER})"
    for name, want in sorted(recorded.items()):
        fp = os.path.join(path, name)
        if not os.path.isfile(fp):
            return f"{fp} is missing"
        if os.path.getsize(fp) != want["bytes"]:
            return f"{fp} has {os.path.getsize(fp)} bytes, the marker records {want['bytes']} (truncated or rewritten)"
    for name, want in sorted(recorded.items()):
        if _owner(name) % dist.world() == dist.rank() and file_digest(os.path.join(path, name)) != want["sha256"]:
            return f"{os.path.join(path, name)} differs from the checksum the marker records (corrupted)"
    return None


def resume_point(ckpt_root: str, explicit: str | None = None, log=None) -> str | None:
    """The checkpoint to resume from, chosen by rank 0 and verified on every rank (all ranks get the same answer):
    ``explicit`` or else the newest complete one under ``ckpt_root``; a broken one is named in a warning, marked
    BROKEN (pruned by the next save), and the previous complete one is tried. A broken ``explicit`` checkpoint, and
    checkpoints that are all broken (now or by an earlier run's verdict), are a :class:`ResumeRefused`."""
    if explicit:
        candidates = [explicit]
    else:  # rank 0's listing: a rank that sees the folder differently (a save landing meanwhile) still agrees
        candidates = dist.broadcast_object(list(reversed(complete_checkpoints(ckpt_root))) if dist.is_main() else None)
    broken = []
    for path in candidates:
        problems = [p for p in dist.all_gather_object(verify(path)) if p]
        if not problems:
            return path
        if explicit:
            raise ResumeRefused(f"train.resume={explicit} is broken: {problems[0]}")
        if _OLDER in problems[0]:  # not broken, only unverifiable: never pruned, the user decides
            raise ResumeRefused(f"{problems[0]}: resume it with the palu_ds that wrote it, or move it away (or set "
                                "train.resume=never) to start afresh")
        if log is not None:
            log.warning("checkpoint %s is broken: %s; falling back to the previous complete checkpoint", path,
                        problems[0])
        broken.append(f"{path}: {problems[0]}")
        dist.barrier()
        if dist.is_main():
            os.replace(os.path.join(path, MARKER), os.path.join(path, BROKEN))
        dist.barrier()
    if not broken:  # found broken by an earlier run (that then stopped): still no silent restart
        broken = dist.broadcast_object(_marked_broken(ckpt_root) if dist.is_main() else None)
    if broken:
        raise ResumeRefused(f"every checkpoint under {ckpt_root} is broken ({'; '.join(broken)}): nothing safe to "
                            "resume from. Restore a good copy, or set train.resume=never to start afresh from step 1 "
                            "(the broken checkpoints are then deleted by its first save)")
    return None


def _marked_broken(ckpt_root: str) -> list[str]:
    if not os.path.isdir(ckpt_root):
        return []
    return [f"{os.path.join(ckpt_root, d)}: marked {BROKEN} by an earlier run" for d in sorted(os.listdir(ckpt_root))
            if _TAG.match(d) and os.path.isfile(os.path.join(ckpt_root, d, BROKEN))]


def client_state(path: str) -> dict:
    """The client state a complete checkpoint's marker records (step, counters, the run's resolved config, ...)."""
    with open(os.path.join(path, MARKER), encoding="utf-8") as f:
        return json.load(f)


def check_same_checkpoint(path: str, step: int) -> None:
    """One all-gather: every rank is about to load ``path`` at ``step`` with the same COMPLETE marker (its sha256:
    node-local disks holding different folders under one path differ there), else every rank raises, naming each
    rank's choice, before DeepSpeed's loader could wait on a peer that loads something else."""
    marker = os.path.join(path, MARKER)
    picks = dist.all_gather_object((os.path.abspath(path), int(step),
                                    file_digest(marker) if os.path.isfile(marker) else None))
    if len(set(picks)) > 1:
        raise ResumeRefused("the ranks would resume from different checkpoints: " + ", ".join(
            f"rank {r}: {p} (step {s}{'' if d == picks[0][2] else ', another COMPLETE marker'})"
            for r, (p, s, d) in enumerate(picks)))


def _prune(ckpt_root: str, keep_last: int, keep: str, protect_before: int | None = None) -> None:
    """Delete all but the ``keep_last`` newest complete checkpoints and every incomplete leftover; with
    ``protect_before`` (the first step of a streak of non-finite steps) the newest checkpoint of an earlier step is
    kept too: the last state before the streak is never pruned while it lasts."""
    done = complete_checkpoints(ckpt_root)
    protected = None
    if protect_before is not None:
        before = [d for d in done if int(_TAG.match(os.path.basename(d)).group(1)) < protect_before]
        protected = before[-1] if before else None
    for old in done[:-keep_last]:
        if old != protected:
            shutil.rmtree(old, ignore_errors=True)
    for d in os.listdir(ckpt_root):  # incomplete leftovers
        full = os.path.join(ckpt_root, d)
        if _TAG.match(d) and full != keep and full not in done:
            shutil.rmtree(full, ignore_errors=True)


def load(engine, path: str) -> dict:
    """Load a complete checkpoint into ``engine`` and this rank's RNG; return the client state. Refused when another
    user could have written the folder or a file in it (DeepSpeed unpickles them)."""
    check_not_writable_by_others([os.path.dirname(os.path.abspath(path)), path]
                                 + [os.path.join(path, n) for n in sorted(os.listdir(path))])
    state = client_state(path)
    check_same_checkpoint(path, state["step"])
    if state["world_size"] != dist.world():
        raise ResumeRefused(f"{path} was written by {state['world_size']} ranks, this run has {dist.world()}: exact "
                           "resume needs the same world size (sampler shards and RNG states are per rank)")
    engine.load_checkpoint(os.path.dirname(path), tag=os.path.basename(path), load_module_strict=True)
    rng_path = os.path.join(path, f"rng_rank{dist.rank()}.pt")
    try:
        rng = torch.load(rng_path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - named: an unpicklable or foreign file is refused, never executed
        raise RuntimeError(f"{rng_path}: not a palu_ds RNG state ({type(e).__name__}: {str(e)[:200]})") from e
    _set_rng_state(rng)
    return state
