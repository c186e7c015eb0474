"""The result of one suite run: per-example records (enough to recompute every aggregate, e.g. forget quality)
and a flat summary; written as ``results.json`` and ``summary.json``."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from palu_ds.atomic import write_json


@dataclass
class EvalOutput:
    suite: str
    split: str
    config: dict
    examples: dict[str, list[dict]]  # part -> records ordered by index
    summary: dict  # flat: "forget/prob": 0.9, "model_utility": ..., "notes": [...]
    meta: dict = field(default_factory=dict)

    def results_dict(self) -> dict:
        return {"suite": self.suite, "split": self.split, "config": self.config, "meta": self.meta,
                "summary": self.summary, "examples": self.examples}

    def summary_dict(self) -> dict:
        return {"suite": self.suite, "split": self.split, **self.meta, "metrics": self.summary}

    def write(self, out_dir: str | os.PathLike) -> tuple[Path, Path]:
        """Write ``results.json`` and ``summary.json`` into ``out_dir`` (atomically, via a temporary name)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for name, obj in (("results.json", self.results_dict()), ("summary.json", self.summary_dict())):
            write_json(out / name, _clean(obj), allow_nan=False)
            paths.append(out / name)
        return paths[0], paths[1]


def _clean(x):
    """JSON-safe: numpy scalars to Python, non-finite floats to None."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def mean(values) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else float("nan")
