"""What a run does with its output folder before it loads anything: :func:`lock` it, compare the checkpoint it resumes
with its own config (:func:`check_resume_config`), and set an earlier run's results aside
(:func:`set_aside_stale_outputs`).

One run per output folder: rank 0 holds an exclusive ``flock`` on ``<output_dir>/.palu_ds.lock`` for the run's
life. A second run on the same folder is refused at start, naming the holder's host and pid (written into the file).
The kernel drops the lock when the holder's process ends, however it ends (crash, SIGKILL, node reboot), so a crashed
run never leaves the folder stuck; the file itself stays behind and means nothing on its own.

On a shared file system the lock is only as good as its ``flock``: local disks, Lustre (mounted with ``flock``) and
NFSv4 honour it across hosts.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from dataclasses import asdict

from palu_ds import checkpoint, dist

log = logging.getLogger("palu_ds")

LOCK_FILE = ".palu_ds.lock"


class OutputDirInUse(RuntimeError):
    """Another live process holds the output folder; the message names its host and pid."""


class OutputLock:
    """``acquire()`` takes the lock or raises :class:`OutputDirInUse`; ``release()`` (or process exit) drops it."""

    def __init__(self, folder: str):
        self.folder, self.path, self._fd = folder, os.path.join(folder, LOCK_FILE), None

    def acquire(self) -> "OutputLock":
        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by exec'd children (PEP 446)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise OutputDirInUse(
                f"train.output_dir={self.folder} is in use by another run (host {holder.get('host', '?')}, pid "
                f"{holder.get('pid', '?')}, since {holder.get('since', '?')}; lock file {self.path}): wait for it to "
                "end or give this run another train.output_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                  "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except ValueError:  # the holder is between truncate and write
        return {}


def lock(folder: str) -> OutputLock | None:
    """Rank 0 takes the folder's lock (returned: keep it for the run's life); every rank raises
    :class:`OutputDirInUse` when another run holds it."""
    held, refused = None, None
    if dist.is_main():
        try:
            held = OutputLock(folder).acquire()
        except OutputDirInUse as e:
            refused = str(e)
    refused = dist.broadcast_object(refused)
    if refused:
        raise OutputDirInUse(refused)
    return held


def check_resume_config(resume: str | None, cfg, hp) -> dict:
    """The checkpoint's recorded config against this run's (``palu_ds.config.config_changes``, decided by rank 0):
    a change that makes the continuation another run is a ConfigError naming the keys, unless
    ``train.resume=force``, which continues and returns the changes (with the earlier forced ones) for
    summary.json and the next checkpoints."""
    from palu_ds.config import ConfigError, changes_message, config_changes

    if not resume:
        return {}
    changes, earlier, step = None, {}, None
    if dist.is_main():
        state = checkpoint.client_state(resume)
        earlier, step = state.get("config_changes") or {}, state.get("step")
        if state.get("config") is not None:
            recorded = {**state["config"]}
            recorded["method"] = {**recorded["method"], "hparams": state.get("hp")}
            now = asdict(cfg)
            now["method"]["hparams"] = dict(hp)
            changes = config_changes(recorded, json.loads(json.dumps(now)))
    changes, earlier, step = dist.broadcast_object((changes, earlier, step))
    if not changes:
        return dict(earlier)
    if cfg.train.resume != "force":
        raise ConfigError(changes_message(changes, resume))
    log.warning("train.resume=force: continuing %s with changed settings: %s", resume,
                ", ".join(f"{k} {v['checkpoint']!r} -> {v['run']!r}" for k, v in changes.items()))
    return {**earlier, **{f"step {step}: {k}": v for k, v in changes.items()}}


def set_aside_stale_outputs(folder: str) -> None:
    """A model/ and summary.json already in the folder belong to an earlier run (a killed final save can leave
    them beside newer checkpoints): rank 0 renames them ``*.stale-<UTC time>`` so they are never taken for this
    run's result. One generation is kept: an older stale copy is deleted then (a folder rerun many times does not
    fill the disk)."""
    import glob
    import shutil

    if not dist.is_main():
        return
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for name, stale in (("model", "model.stale-{}"), ("summary.json", "summary.stale-{}.json")):
        path = os.path.join(folder, name)
        if not os.path.lexists(path):
            continue
        for older in glob.glob(os.path.join(folder, stale.format("*"))):
            shutil.rmtree(older) if os.path.isdir(older) else os.remove(older)
            log.warning("deleted %s (an older stale copy)", older)
        os.replace(path, os.path.join(folder, stale.format(stamp)))
        log.warning("%s is an earlier run's: renamed to %s", path, stale.format(stamp))
