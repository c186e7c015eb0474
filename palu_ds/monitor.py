"""Rank-0 monitoring: TensorBoard (and optionally wandb) scalars, and the progress line (palu_ds.progress).

Values reach here already all-reduced, so what rank 0 writes is the global value.
"""

from __future__ import annotations

import logging
import os
import resource

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
    """Rank 0's record of a run: TensorBoard scalars, optionally Weights & Biases (``log.report_to: [.., wandb]``:
    the same scalars, the resolved config and the summary; ``WANDB_MODE=offline`` works without a network), and the
    progress line of each step (:mod:`palu_ds.progress`: a tqdm bar on a terminal, a log line every
    ``log.log_every`` steps otherwise). ``method`` / ``epsilon``: which terms the line shows and the constraint's
    bound (from the registry)."""

    def __init__(self, tb_dir: str | None, total_steps: int, start_step: int, log_every: int = 1, method=None,
                 epsilon: float | None = None, wandb_run=None):
        from palu_ds.progress import Progress

        self.main = dist.is_main()
        self.method, self.epsilon = method, epsilon
        self.writer, self.wandb = None, wandb_run
        self.progress = Progress(total_steps, "unlearn" if method is None or method.unlearning else "finetune",
                                 unit="step", initial=start_step, every=log_every)
        if not self.main:
            return
        if tb_dir:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(tb_dir, exist_ok=True)
            self.writer = SummaryWriter(tb_dir)

    def _write(self, step: int, scalars: dict[str, float]) -> None:
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(dict(scalars), step=step)

    def step(self, step: int, scalars: dict[str, float]) -> None:
        if not self.main:
            return
        from palu_ds.progress import step_fields

        self._write(step, scalars)
        self.progress.update(step - self.progress.done,
                             step_fields(scalars, self.method, self.epsilon) if self.method is not None else [])

    def step_scalars(self, step: int, scalars: dict[str, float]) -> None:
        """Extra scalars (e.g. evaluation metrics) without advancing the progress bar."""
        if self.main:
            self._write(step, scalars)
            log.info("step %d %s", step, " ".join(f"{k}={v:.4g}" for k, v in scalars.items()))

    def summary(self, data: dict) -> None:
        """The run's summary (its scalar entries) into the tracking backends that keep one (wandb)."""
        if self.main and self.wandb is not None:
            self.wandb.summary.update({k: v for k, v in flatten(data).items()
                                       if isinstance(v, (int, float, str)) and not isinstance(v, bool)})

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        self.progress.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def flatten(data: dict, prefix: str = "") -> dict:
    """``{"last": {"loss/total": 1.0}}`` -> ``{"last/loss/total": 1.0}`` (lists are left out)."""
    out = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        elif not isinstance(v, (list, tuple)):
            out[key] = v
    return out


#: the experiment trackers ``log.report_to`` may name (TensorBoard is written whenever log.tensorboard_dir is set)
TRACKERS = ("tensorboard", "wandb")


def start_wandb(cfg, resolved: dict):
    """A wandb run on rank 0 when ``log.report_to`` names wandb (else None): project ``log.wandb_project``, name
    ``log.run_name`` (default: the output folder's name), files under ``<output_dir>/wandb``, the resolved config.
    The mode (online / offline) is wandb's own: ``WANDB_MODE=offline`` writes the run to disk only."""
    if "wandb" not in cfg.log.report_to or not dist.is_main():
        return None
    import wandb

    os.makedirs(cfg.train.output_dir, exist_ok=True)
    return wandb.init(project=cfg.log.wandb_project, dir=cfg.train.output_dir, config=resolved,
                      name=cfg.log.run_name or os.path.basename(os.path.normpath(cfg.train.output_dir)),
                      reinit="create_new")
