"""Around the stages (the runner itself is :class:`palu_ds.stages.Stages`, shared with ``make demo``): the repository
root the commands run from, JSON reading and the clean-up after DeepSpeed runs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


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
