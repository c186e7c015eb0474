"""The progress line (palu_ds.progress): its format for every method of the registry, rows with an ETA, and the
plain lines every N units when the output is not a terminal. The timing itself is not asserted (only its format);
the lines of real runs on the tiny model are checked in tests/test_engine_e2e.py."""
import logging
import re

import pytest

from palu_ds.methods import METHODS
from palu_ds.progress import Progress, duration, rows_progress, step_fields

ETA = r"eta (\?|(\d+h)?(\d+m)?\d+s)"


def test_duration():
    assert [duration(s) for s in (0, 7, 252, 3725, None)] == ["0s", "7s", "4m12s", "1h02m05s", "?"]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_step_line_shows_the_methods_terms_its_bound_and_lambda(name):
    """Terms and eps / lambda come from the registry entry (term_fns, constraint), never from the method's name."""
    m = METHODS[name]
    scalars = {"loss/total": 1.5, **{f"loss/{t}": 0.25 for t in m.term_fns}, "lr": 1e-5,
               "throughput/tokens_per_s": 142.3, "memory/peak_bytes": 1e9}
    if m.constraint:
        scalars["dual/lambda"] = 4.2
    p = Progress(100, unit="step", initial=2, tty=False)
    p.update(1, step_fields(scalars, m, 0.3 if m.constraint else None))
    line = p.line(step_fields(scalars, m, 0.3 if m.constraint else None))
    terms = " ".join(f"{t} 0.25" + (" \\(eps 0.3\\)" if t == m.constraint else "") for t in m.term_fns)
    lam = r" \| lambda 4.2" if m.constraint else ""
    assert re.fullmatch(rf"step 3/100 \| loss 1.5 \| {terms}{lam} \| lr 1e-05 \| 142 tok/s \| {ETA}", line), line
    assert ("lambda" in line) == (m.constraint is not None) and "memory" not in line


def test_plain_lines_every_n_and_at_the_end(caplog):
    """Not a terminal: one log line each time the count passes a multiple of ``every`` (rows come in batches of
    3 here, so 4 of 10 units done crosses 4), and one at the end."""
    p = rows_progress(10, "reference forget", lines=3)  # every ceil(10 / 3) = 4 rows
    p.bar = None  # as under SLURM / a log file, even when pytest runs on a terminal
    with caplog.at_level(logging.INFO, logger="palu_ds"):
        for _ in range(3):
            p.update(3)
        p.update(1)
    lines = [r.getMessage() for r in caplog.records]
    assert [ln.split(" | ")[0] for ln in lines] == ["reference forget: rows 6/10", "reference forget: rows 9/10",
                                                   "reference forget: rows 10/10"]
    assert all(re.fullmatch(rf"reference forget: rows \d+/10 \| {ETA}", ln) for ln in lines), lines
    assert lines[-1].endswith("eta 0s")
