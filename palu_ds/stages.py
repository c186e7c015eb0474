"""Local pipelines of CLI stages -- ``make demo`` and every benchmark -- run through one runner.

A stage is one command (a launcher, a training or evaluation script) run as a subprocess from ``cwd``: its output goes
to ``OUT/logs/<name>.log`` (and to the console as it comes with ``echo=True``), its seconds are kept, an optional
``check`` judges its result after exit 0, and a stage given a ``done`` file is skipped when its command, its input
files and that output are unchanged since it last succeeded (``fresh=True`` runs everything)::

    stages = Stages("runs/x", cwd=ROOT)
    stages.run("sft_target", [sys.executable, "launch/finetune.py", ...], done=Path("runs/x/target/model/config.json"))
    stages.seconds        # {"sft_target": 312.4}
    stages.status         # {"sft_target": "ok"}

A stage that fails returns False, prints the last lines of its log and leaves no stamp, so a rerun redoes it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from palu_ds.atomic import write_json


def log_name(stage: str) -> str:
    """A stage's name as a file name: ``"PALU unlearning (2 ranks)"`` -> ``"PALU_unlearning_(2_ranks)"``."""
    return stage.replace(" ", "_").replace("/", "-")


class Stages:
    """Runs, logs, times, checks and reuses the stages of one pipeline writing under ``out`` (module doc).

    ``tag`` prefixes the printed lines; ``env`` is the stages' environment (default: this process's at each run)."""

    def __init__(self, out, fresh: bool = False, tag: str = "palu_ds", echo: bool = False, cwd=None,
                 env: dict | None = None):
        self.out, self.fresh, self.tag, self.echo = Path(out), fresh, tag, echo
        self.cwd, self.env = cwd, env
        self.seconds: dict[str, float] = {}
        self.status: dict[str, str] = {}
        self.logs = self.out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def log(self, name: str) -> Path:
        """Stage ``name``'s log file (its stamp is the same path with ``.cmd.json``)."""
        return self.logs / f"{log_name(name)}.log"

    @staticmethod
    def _fingerprint(inputs) -> dict:
        out = {}
        for p in inputs:
            p = Path(p)
            files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
            out[str(p)] = [[x.name, x.stat().st_size, x.stat().st_mtime_ns] for x in files if x.exists()]
        return out

    def _reusable(self, name: str, stamp: Path, key: dict, done, decides) -> bool:
        if self.fresh or done is None or not Path(done).exists() or not stamp.exists():
            return False
        stored = json.loads(stamp.read_text())
        if stored.get("inputs") != key["inputs"] or decides(stored.get("cmd") or []) != decides(key["cmd"]):
            return False
        if stored.get("seconds") is not None:
            self.seconds[name] = stored["seconds"]
        return True

    def _execute(self, cmd: list[str], log: Path) -> int:
        env = dict(os.environ if self.env is None else self.env)
        with open(log, "w") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            if not self.echo:
                return subprocess.run(cmd, cwd=self.cwd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
            p = subprocess.Popen(cmd, cwd=self.cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                 text=True, bufsize=1)
            for line in p.stdout:
                f.write(line)
                sys.stdout.write(line)
                sys.stdout.flush()
            return p.wait()

    def run(self, name: str, cmd: list[str], done=None, inputs=(), before=None, retries: int = 0,
            check=None, decides=None) -> bool:
        """Run stage ``name`` (or reuse it, see the module doc); True when it succeeded.

        ``before``: called right before the command runs (not when reused); ``retries``: reruns after a failure (the
        failed log kept as ``<name>.failed<N>.log``); ``check``: called after exit 0, returns a status string (or
        None for "ok") or raises AssertionError, which fails the stage with its message; ``decides``: the part of a
        command that decides the stage's output (default: all of it), for a stage that several commands share (e.g.
        one reference cache made by whichever method of its key comes first): reused when the stored command's part
        equals this one's."""
        log = self.log(name)
        stamp = log.with_suffix(".cmd.json")
        key = {"cmd": cmd, "inputs": self._fingerprint(inputs)}
        if self._reusable(name, stamp, key, done, decides or list):
            self.status[name] = "reused"
            print(f"[{self.tag}] {name}: reused ({done})", flush=True)
            return True
        if before is not None:
            before()
        if self.echo:
            print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
        t = time.time()
        rc = self._execute(cmd, log)
        self.seconds[name] = round(time.time() - t, 1)
        status = "ok" if rc == 0 else f"FAILED (exit {rc})"
        if rc == 0 and check is not None:
            try:
                status = check() or "ok"
            except AssertionError as e:
                status = f"FAILED: {e}"
        self.status[name] = status
        if status.startswith("FAILED"):
            stamp.unlink(missing_ok=True)
            tail = log.read_text().splitlines()[-15:]
            print(f"[{self.tag}] {name}: {status} in {self.seconds[name]} s; log {log}:\n  " + "\n  ".join(tail),
                  flush=True)
            if retries > 0:
                shutil.copy(log, log.with_suffix(f".failed{retries}.log"))
                print(f"[{self.tag}] {name}: retrying ({retries} left)", flush=True)
                return self.run(name, cmd, done, inputs, before, retries - 1, check, decides)
            return False
        write_json(stamp, {**key, "seconds": self.seconds[name]})
        print(f"=== {name} done in {self.seconds[name]} s" if self.echo
              else f"[{self.tag}] {name}: {self.seconds[name]} s", flush=True)
        return True
