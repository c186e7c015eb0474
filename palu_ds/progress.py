"""Progress on rank 0, one format for every long loop: training steps (``palu_ds.monitor``), the reference precompute
(``palu_ds.reference.compute``) and evaluation (``palu_eval.scoring``).

On a terminal it is a tqdm bar whose postfix is the line below; when the output is not a terminal (SLURM, a log file)
it is a plain log line every ``every`` updates (and at the end)::

    step 3/100 | loss 1.234 | forget 0.5 kl 0.01 retain 0.27 (eps 0.3) | lambda 4.2 | lr 1e-05 | 142 tok/s | eta 4m12s
    reference forget: rows 96/400 | eta 1m05s

Which terms a step shows and whether it has a constraint (its eps) and a lambda come from the method
(:class:`palu_ds.methods.Method` ``term_fns`` / ``constraint``), never from its name.
"""

from __future__ import annotations

import logging
import sys
import time

from palu_ds import dist

log = logging.getLogger("palu_ds")


def duration(seconds: float | None) -> str:
    """``252`` -> ``4m12s``; ``3725`` -> ``1h02m05s``; ``None`` (not known yet) -> ``?``."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(round(max(0.0, seconds)))
    h, m, s = s // 3600, s // 60 % 60, s % 60
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _g(v: float) -> str:
    return f"{v:.4g}"


def step_fields(scalars: dict[str, float], method, epsilon: float | None) -> list[str]:
    """The per-step values of a training line, in order: loss, the method's terms (the constraint's with its eps),
    lambda (methods with a constraint), lr, throughput."""
    out = []
    if "loss/total" in scalars:
        out.append(f"loss {_g(scalars['loss/total'])}")
    terms = []
    for name in method.term_fns:
        if f"loss/{name}" in scalars:
            text = f"{name} {_g(scalars[f'loss/{name}'])}"
            if name == method.constraint and epsilon is not None:
                text += f" (eps {_g(epsilon)})"
            terms.append(text)
    if terms:
        out.append(" ".join(terms))
    if method.constraint is not None and "dual/lambda" in scalars:
        out.append(f"lambda {_g(scalars['dual/lambda'])}")
    if "lr" in scalars:
        out.append(f"lr {scalars['lr']:.3g}")
    if "throughput/tokens_per_s" in scalars:
        out.append(f"{scalars['throughput/tokens_per_s']:.0f} tok/s")
    return out


class Progress:
    """Counts ``done`` of ``total`` units (steps, rows) on rank 0 and shows them with an ETA (module doc).

    ``update(n, fields)``: ``n`` more units done; ``fields`` the extra values to show (e.g. :func:`step_fields`);
    without a terminal a line is logged each time ``done`` passes a multiple of ``every``, and at the end.
    ``unit``: ``"step"`` gives ``step 3/100``, anything else ``rows 96/400``. The ETA is the mean time per unit
    since this object was made times the units left (units done before it, e.g. by a resumed run, do not count).
    Other ranks keep no state and print nothing."""

    def __init__(self, total: int, desc: str = "", unit: str = "rows", initial: int = 0, every: int = 1,
                 tty: bool | None = None):
        self.total, self.desc, self.unit = int(total), desc, unit
        self.done = self.start_done = int(initial)
        self.every = max(1, int(every))
        self.main = dist.is_main()
        self.t0 = time.monotonic()
        self.bar = None
        if self.main and (sys.stderr.isatty() if tty is None else tty):
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=self.done, desc=desc or unit, dynamic_ncols=True,
                            leave=unit == "step")

    def eta(self) -> float | None:
        n = self.done - self.start_done
        if n <= 0:
            return None
        return (time.monotonic() - self.t0) / n * max(0, self.total - self.done)

    def line(self, fields: list[str] = ()) -> str:
        """The plain line for the current count (what a non-terminal output shows)."""
        head = f"step {self.done}/{self.total}" if self.unit == "step" else f"rows {self.done}/{self.total}"
        if self.desc and self.unit != "step":
            head = f"{self.desc}: {head}"
        return " | ".join([head, *fields, f"eta {duration(self.eta())}"])

    def update(self, n: int = 1, fields: list[str] = ()) -> None:
        if not self.main:
            return
        before, self.done = self.done, self.done + n
        if self.bar is not None:
            self.bar.update(n)
            if fields:
                self.bar.set_postfix_str(" | ".join(fields))
        elif self.done // self.every > before // self.every or self.done >= self.total:  # crossed a multiple
            log.info("%s", self.line(fields))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def rows_progress(rows: int, desc: str, lines: int = 10) -> Progress:
    """Progress over ``rows`` rows of this rank (rank 0 shows its own share, whose pace is every rank's), about
    ``lines`` plain lines when not on a terminal."""
    return Progress(rows, desc, unit="rows", every=max(1, -(-rows // lines)))
