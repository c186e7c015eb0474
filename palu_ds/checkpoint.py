"""Crash-safe checkpoints around DeepSpeed's: a checkpoint counts only once its COMPLETE marker exists.

Layout: ``<output>/checkpoints/step_000010/`` holds DeepSpeed's engine files (tag ``step_000010``), one
``rng_rank<r>.pt`` per rank (python, numpy, torch RNG states) and, written last by rank 0 through an atomic rename
after a barrier, ``COMPLETE`` (JSON client state: step, dual variable, sampler positions, counters). A crash
mid-write leaves no marker, so the directory is ignored on resume and pruned by the next save.
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

MARKER = "COMPLETE"
_TAG = re.compile(r"^step_(\d+)$")


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
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def save(engine, ckpt_root: str, step: int, client_state: dict, keep_last: int) -> str:
    tag = tag_for(step)
    path = os.path.join(ckpt_root, tag)
    if dist.is_main() and os.path.isdir(path):
        shutil.rmtree(path)  # an incomplete leftover of a crashed save at this step
    dist.barrier()
    engine.save_checkpoint(ckpt_root, tag=tag, client_state={"palu_ds": client_state}, save_latest=False)
    torch.save(_rng_state(), os.path.join(path, f"rng_rank{dist.rank()}.pt"))
    dist.barrier()
    if dist.is_main():
        tmp = os.path.join(path, MARKER + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"world_size": dist.world(), **client_state}, f)
        os.replace(tmp, os.path.join(path, MARKER))
        _prune(ckpt_root, keep_last, keep=path)
    dist.barrier()
    return path


def _prune(ckpt_root: str, keep_last: int, keep: str) -> None:
    done = complete_checkpoints(ckpt_root)
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for d in os.listdir(ckpt_root):  # incomplete leftovers
        full = os.path.join(ckpt_root, d)
        if _TAG.match(d) and full != keep and full not in done:
            shutil.rmtree(full, ignore_errors=True)


def load(engine, path: str) -> dict:
    """Load a complete checkpoint into ``engine`` and this rank's RNG; return the client state."""
    with open(os.path.join(path, MARKER), encoding="utf-8") as f:
        state = json.load(f)
    if state["world_size"] != dist.world():
        raise RuntimeError(f"{path} was written by {state['world_size']} ranks, this run has {dist.world()}: exact "
                           "resume needs the same world size (sampler shards and RNG states are per rank)")
    engine.load_checkpoint(os.path.dirname(path), tag=os.path.basename(path), load_module_strict=True)
    rng = torch.load(os.path.join(path, f"rng_rank{dist.rank()}.pt"), weights_only=False)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    return state
