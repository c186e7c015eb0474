"""Rank-0 monitoring: TensorBoard scalars, a tqdm bar on a TTY, one-line logs otherwise.

Values reach here already all-reduced, so what rank 0 writes is the global value.
"""

from __future__ import annotations

import logging
import os
import resource
import sys

import torch

from palu_ds import dist

log = logging.getLogger("palu_ds")


def reset_peak_memory() -> None:
    """Start a new peak window (called when training starts, so loading transients do not count): CUDA's peak
    stats, and on Linux the RSS high-water mark (``5 > /proc/self/clear_refs`` resets VmHWM)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    try:  # hand memory freed while loading back to the OS (glibc keeps it otherwise), then reset VmHWM
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_bytes() -> int:
    """Peak GPU memory allocated since the last reset when on CUDA, else this process's peak RSS since the last
    reset (VmHWM; the lifetime ru_maxrss where /proc is unavailable)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class Monitor:
    def __init__(self, tb_dir: str | None, total_steps: int, start_step: int, log_every: int = 1):
        self.main = dist.is_main()
        self.log_every = max(1, log_every)
        self.writer = self.bar = None
        if not self.main:
            return
        if tb_dir:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(tb_dir, exist_ok=True)
            self.writer = SummaryWriter(tb_dir)
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="unlearn", dynamic_ncols=True)

    def step(self, step: int, scalars: dict[str, float]) -> None:
        if not self.main:
            return
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)
        short = {"loss": scalars.get("loss/total"), "lambda": scalars.get("dual/lambda"),
                 "tok/s": scalars.get("throughput/tokens_per_s")}
        short = {k: f"{v:.4g}" for k, v in short.items() if v is not None}
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(short)
        elif step % self.log_every == 0:
            log.info("step %d %s", step, " ".join(f"{k}={v}" for k, v in short.items()))

    def step_scalars(self, step: int, scalars: dict[str, float]) -> None:
        """Extra scalars (e.g. evaluation metrics) without advancing the progress bar."""
        if self.main and self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)
        if self.main:
            log.info("step %d %s", step, " ".join(f"{k}={v:.4g}" for k, v in scalars.items()))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self.bar is not None:
            self.bar.close()


def write_summary(path: str, data: dict) -> None:
    """``data`` as JSON at ``path``, written to a temporary name and renamed (never half-written)."""
    import json

    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)
