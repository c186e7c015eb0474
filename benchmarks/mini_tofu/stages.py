"""The stage runner: each command's output in ``OUT/logs/<name>.log``, timed, skipped when unchanged; and the
clean-up after DeepSpeed runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from palu_ds.atomic import write_json

ROOT = Path(__file__).resolve().parents[2]


class Stages:
    """Runs commands with their output in ``OUT/logs/<name>.log``, times them, and skips a stage whose command,
    input files (size + mtime of e.g. the model it starts from) and outputs are unchanged since a previous run
    (``--fresh`` redoes everything).  A reused stage reports the seconds it took when it ran; ``tag`` prefixes the
    printed lines."""

    def __init__(self, out: Path, fresh: bool, tag: str = "mini_tofu"):
        self.out, self.fresh, self.tag = out, fresh, tag
        self.seconds: dict[str, float] = {}
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def _fingerprint(inputs) -> dict:
        out = {}
        for p in inputs:
            p = Path(p)
            files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
            out[str(p)] = [[x.name, x.stat().st_size, x.stat().st_mtime_ns] for x in files if x.exists()]
        return out

    def run(self, name: str, cmd: list[str], done: Path | None = None, inputs=(), before=None,
            retries: int = 0) -> bool:
        stamp = self.logs / f"{name}.cmd.json"
        key = {"cmd": cmd, "inputs": self._fingerprint(inputs)}
        stored = json.loads(stamp.read_text()) if stamp.exists() else {}
        if not self.fresh and done is not None and done.exists() and \
                {k: stored.get(k) for k in key} == key:
            if stored.get("seconds") is not None:
                self.seconds[name] = stored["seconds"]
            print(f"[{self.tag}] {name}: reused ({done})", flush=True)
            return True
        if before is not None:
            before()
        log = self.logs / f"{name}.log"
        t = time.time()
        with open(log, "w") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=os.environ.copy()).returncode
        self.seconds[name] = round(time.time() - t, 1)
        if rc != 0:
            stamp.unlink(missing_ok=True)
            tail = log.read_text().splitlines()[-15:]
            print(f"[{self.tag}] {name}: FAILED (exit {rc}) in {self.seconds[name]} s; log {log}:\n  "
                  + "\n  ".join(tail), flush=True)
            if retries > 0:
                shutil.copy(log, log.with_suffix(f".failed{retries}.log"))
                print(f"[{self.tag}] {name}: retrying ({retries} left)", flush=True)
                return self.run(name, cmd, done, inputs, before, retries - 1)
            return False
        write_json(stamp, {**key, "seconds": self.seconds[name]})
        print(f"[{self.tag}] {name}: {self.seconds[name]} s", flush=True)
        return True


def read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def drop_shm_buffers(port: int) -> None:
    """DeepSpeed's CPU shared-memory allreduce leaves ``/dev/shm/deepspeed_allreduce_buffer_*_<addr>_<port>_<rank>``
    (66 MB a rank) behind after every launch (deepspeedai/DeepSpeed#4115); remove the ones of our own port."""
    for f in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{os.environ.get('MASTER_ADDR', '*')}_{port}_*"):
        f.unlink(missing_ok=True)


def drop_checkpoints(run_dir: Path, keep: bool) -> None:
    if not keep:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
