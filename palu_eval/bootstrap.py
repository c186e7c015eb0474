"""Bootstrap intervals for comparing TOFU evaluations (the efficacy protocol of BENCHMARKS.md, issue 25).

Two questions, each answered from the per-example records of ``results.json`` (``EvalOutput.examples``):

- :func:`paired_ks_difference`: is model A's forget set closer to the retain model's than model B's?  The KS
  statistic D of each model's forget truth ratios against the retain model's, and the difference ``D_A - D_B``
  with a *paired* bootstrap over forget rows: one resample of row indices picks the same rows of A, B and the retain
  model, so what the three share (the rows' difficulty) cancels.
- :func:`utility_interval`: TOFU's model utility (harmonic mean of 9 values, :mod:`palu_eval.tofu`) and its ratio
  to the target's on the same rows, with a bootstrap over rows within each utility part.

Intervals are percentile intervals (Efron & Tibshirani, *An Introduction to the Bootstrap*, 1993, ch. 13).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from palu_eval.metrics import harmonic_mean
from palu_eval.tofu import UTILITY_METRICS, UTILITY_PARTS

N_BOOT = 10_000


def ks_statistics(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Two-sample KS statistics ``D = max_x |F_a(x) - F_b(x)|`` of each row pair of ``a`` [R, n] and ``b`` [R, m].

    The supremum is attained at a sample point, so it is evaluated at every value of both samples (the empirical CDF
    of a sample at x counts its values <= x). Equals ``scipy.stats.ks_2samp(a[r], b[r]).statistic`` row by row.
    Example: a = [1, 2], b = [3, 4] -> F_a(2) = 1, F_b(2) = 0 -> D = 1; a = [1, 3], b = [2, 4] -> D = 0.5.
    """
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    points = np.concatenate([a, b], axis=1)[:, :, None]  # [R, n + m, 1]
    cdf_a = (a[:, None, :] <= points).mean(-1)
    cdf_b = (b[:, None, :] <= points).mean(-1)
    return np.abs(cdf_a - cdf_b).max(-1)


def _interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def paired_ks_difference(tr_a: Sequence[float], tr_b: Sequence[float], tr_retain: Sequence[float], *,
                         n_boot: int = N_BOOT, seed: int = 0, level: float = 0.95) -> dict:
    """``D_A - D_B`` (each model's KS statistic against the retain model's forget truth ratios) with a paired
    percentile bootstrap interval over the forget rows.

    The three sequences hold one truth ratio per forget row, in the same row order. Returns ``{"d_a", "d_b", "diff",
    "low", "high", "level", "n_boot", "rows"}``; ``diff > 0`` means B is closer to the retain model. Example: with
    A = the retain model's own ratios, ``d_a = 0`` and ``diff = -d_b``.
    """
    arrays = [np.asarray(x, dtype=np.float64) for x in (tr_a, tr_b, tr_retain)]
    n = arrays[0].size
    if n == 0 or any(x.size != n for x in arrays):
        raise ValueError(f"paired_ks_difference needs three equally long, non-empty truth-ratio lists (one per "
                         f"forget row), got {[x.size for x in arrays]}")
    a, b, r = arrays
    d_a, d_b = (float(ks_statistics(x, r)[0]) for x in (a, b))
    diffs = np.empty(n_boot)
    rng = np.random.default_rng(seed)
    for start in range(0, n_boot, 1000):  # 1000 resamples at a time bound the [R, 2n, n] comparison array
        idx = rng.integers(0, n, size=(min(1000, n_boot - start), n))
        diffs[start:start + len(idx)] = ks_statistics(a[idx], r[idx]) - ks_statistics(b[idx], r[idx])
    lo, hi = _interval(diffs, level)
    return {"d_a": d_a, "d_b": d_b, "diff": d_a - d_b, "low": lo, "high": hi, "level": level, "n_boot": n_boot,
            "rows": n}


#: each utility metric's per-row value (its part's value is the mean over rows)
_ROW_VALUE = {
    "prob": lambda part, r: r["prob" if part == "retain" else "normalized_prob"],
    "rougeL_recall": lambda part, r: r["rougeL_recall"],
    "truth_ratio": lambda part, r: max(0.0, 1.0 - r["truth_ratio"]),
}


def utility_rows(examples: Mapping[str, list[dict]]) -> dict[str, np.ndarray]:
    """Each of TOFU's 9 utility values as per-row contributions whose mean is the value
    (:func:`palu_eval.tofu.aggregate_part`): ``prob`` (normalized over the options on real_authors / world_facts),
    ``rougeL_recall``, and ``max(0, 1 - R)`` for the truth ratio R. Keys ``"<part>/<metric>"``."""
    missing = [p for p in UTILITY_PARTS if not examples.get(p)]
    if missing:
        raise ValueError(f"model utility needs the parts {list(UTILITY_PARTS)}; missing or empty: {missing} "
                         "(evaluate with --splits including them)")
    return {f"{part}/{metric}": np.array([_ROW_VALUE[metric](part, r) for r in examples[part]], dtype=np.float64)
            for part in UTILITY_PARTS for metric in UTILITY_METRICS}


def _utility(rows: dict[str, np.ndarray], picks: Mapping[str, np.ndarray] | None = None) -> float:
    return harmonic_mean(float(v[picks[k.split("/")[0]]].mean() if picks else v.mean()) for k, v in rows.items())


def _questions(examples: Mapping[str, list[dict]], part: str) -> list:
    return [r.get("question") for r in examples[part]]


def utility_interval(examples: Mapping[str, list[dict]], target: Mapping[str, list[dict]] | None = None, *,
                     n_boot: int = N_BOOT, seed: int = 0, level: float = 0.95) -> dict:
    """TOFU model utility of ``examples`` with a percentile bootstrap interval (rows resampled within each utility
    part), and, with ``target`` (the target's records on the same rows), the ratio utility / target utility with the
    target resampled on the same rows. Returns ``{"utility", "low", "high"}`` (+ ``"ratio", "ratio_low",
    "ratio_high"``) and ``"level", "n_boot"``. A harmonic mean is 0 when one value is 0, so a resample without a
    single correct real-authors answer pulls the interval's low end to 0: that fragility is what it shows."""
    rows = utility_rows(examples)
    trows = utility_rows(target) if target is not None else None
    if target is not None:
        for part in UTILITY_PARTS:
            if _questions(examples, part) != _questions(target, part):
                raise ValueError(f"utility_interval: the target's {part} rows are not the model's ({len(target[part])}"
                                 f" vs {len(examples[part])} rows, or another order): evaluate both on the same rows")
    sizes = {p: len(examples[p]) for p in UTILITY_PARTS}
    rng = np.random.default_rng(seed)
    utils, ratios = np.empty(n_boot), np.empty(n_boot)
    for i in range(n_boot):
        picks = {p: rng.integers(0, n, size=n) for p, n in sizes.items()}
        utils[i] = _utility(rows, picks)
        if trows is not None:
            t = _utility(trows, picks)
            ratios[i] = utils[i] / t if t > 0 else np.nan
    out = {"utility": _utility(rows), "level": level, "n_boot": n_boot}
    out["low"], out["high"] = _interval(utils, level)
    if trows is not None:
        t = _utility(trows)
        out["ratio"] = out["utility"] / t if t > 0 else float("nan")
        finite = ratios[np.isfinite(ratios)]
        out["ratio_low"], out["ratio_high"] = _interval(finite, level) if finite.size else (float("nan"),) * 2
    return out
