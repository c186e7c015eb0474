"""The efficacy protocol's bootstrap (palu_eval/bootstrap.py): KS statistics equal scipy's, the paired difference
and its interval on constructed truth ratios, utility values equal the suite's aggregates."""
import numpy as np
import pytest
from scipy.stats import ks_2samp

from palu_eval.bootstrap import ks_statistics, paired_ks_difference, utility_interval, utility_rows
from palu_eval.tofu import UTILITY_PARTS, aggregate_part
from palu_eval.metrics import harmonic_mean


def test_ks_statistics_equal_scipy_row_by_row():
    rng = np.random.default_rng(0)
    a, b = rng.lognormal(size=(50, 40)), rng.lognormal(0.3, size=(50, 40))
    a[:, :5] = b[:, :5]  # ties across the samples
    want = [ks_2samp(x, y).statistic for x, y in zip(a, b)]
    np.testing.assert_allclose(ks_statistics(a, b), want, rtol=0, atol=1e-12)
    assert ks_statistics(np.array([1.0, 2]), np.array([3.0, 4]))[0] == 1.0
    assert ks_statistics(np.array([1.0, 3]), np.array([2.0, 4]))[0] == 0.5


def test_paired_difference_on_constructed_truth_ratios():
    rng = np.random.default_rng(1)
    retain = rng.uniform(0.5, 1.0, 40)
    far = retain + 10.0  # every ratio beyond the retain model's: D = 1 on every resample
    res = paired_ks_difference(retain, far, retain, n_boot=500)
    assert (res["d_a"], res["d_b"], res["diff"], res["low"], res["high"]) == (0.0, 1.0, -1.0, -1.0, -1.0)
    assert res["rows"] == 40 and res["n_boot"] == 500
    same = paired_ks_difference(far, far, retain, n_boot=200)
    assert same["diff"] == same["low"] == same["high"] == 0.0
    # two models from one distribution: the interval holds the point and 0
    a, b = rng.uniform(0.4, 1.0, 40), rng.uniform(0.4, 1.0, 40)
    res = paired_ks_difference(a, b, retain, n_boot=2000, seed=3)
    assert res["low"] <= res["diff"] <= res["high"] and res["low"] < 0 < res["high"]
    assert res["diff"] == pytest.approx(ks_2samp(a, retain).statistic - ks_2samp(b, retain).statistic)
    # the same seed gives the same interval
    assert paired_ks_difference(a, b, retain, n_boot=2000, seed=3) == res
    with pytest.raises(ValueError, match=r"equally long.*\[40, 39, 40\]"):
        paired_ks_difference(a, b[:-1], retain)


def _records(rng, part, n):
    recs = []
    for i in range(n):
        r = {"question": f"{part} q{i}", "prob": float(rng.uniform()), "rougeL_recall": float(rng.uniform()),
             "truth_ratio": float(rng.uniform(0.1, 1.5))}
        if part != "retain":
            r["normalized_prob"] = float(rng.uniform())
        recs.append(r)
    return recs


def test_utility_values_are_the_suites_and_the_interval_holds_them():
    rng = np.random.default_rng(2)
    ex = {p: _records(rng, p, n) for p, n in zip(UTILITY_PARTS, (20, 25, 30))}
    rows = utility_rows(ex)
    for part in UTILITY_PARTS:
        agg = aggregate_part(part, ex[part])
        for metric in ("prob", "rougeL_recall", "truth_ratio"):
            assert rows[f"{part}/{metric}"].mean() == pytest.approx(agg[metric], abs=1e-12), (part, metric)
    want = harmonic_mean(v.mean() for v in rows.values())
    res = utility_interval(ex, n_boot=300)
    assert res["utility"] == pytest.approx(want) and res["low"] < want < res["high"]
    self_ratio = utility_interval(ex, ex, n_boot=100)
    assert self_ratio["ratio"] == self_ratio["ratio_low"] == self_ratio["ratio_high"] == pytest.approx(1.0)
    other = {p: _records(rng, p, len(ex[p])) for p in UTILITY_PARTS}
    with pytest.raises(ValueError, match="target's retain rows are not the model's"):
        utility_interval(ex, {**other, "retain": _records(rng, "retainX", 20)}, n_boot=10)
    with pytest.raises(ValueError, match=r"missing or empty: \['world_facts'\]"):
        utility_rows({**ex, "world_facts": []})
