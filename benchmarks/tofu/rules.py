"""The efficacy protocol's two rules (BENCHMARKS.md, "The efficacy protocol (issue 25)"), as pure functions of the
numbers, written down before the first run: :func:`select_point` (per method, on the development authors) and
:func:`decide` (PALU against each baseline, on both reported pairs), with :func:`best_baseline` (whose selected point
gets the seed rerun).

A *point* is one in-run evaluation of one grid run: ``{"lr", "epoch", "ks" (KS D against the retain model's forget
truth ratios), "mu_rel" (utility / the target's on the same rows), ...}``.
"""

from __future__ import annotations


def keeps(mu_rel: float | None, floor: float = 0.95) -> bool:
    """Whether a point *keeps utility*: relative utility >= ``floor`` (0.95)."""
    return mu_rel is not None and mu_rel >= floor


def select_point(points: list[dict], floor: float = 0.95) -> dict:
    """The selection rule: among the points that keep utility, the lowest KS D; ties go to the higher utility, then
    fewer epochs, then the lower lr.  If none keeps utility: the point with the highest utility (ties as above, by
    lower D, fewer epochs, lower lr) and the method is marked *keeps no point*.
    Returns ``{"point", "keeps_no_point", "reason"}``.

    >>> pts = [{"lr": 1e-5, "epoch": 1, "ks": 0.3, "mu_rel": 1.0}, {"lr": 1e-4, "epoch": 5, "ks": 0.1, "mu_rel": 0.96},
    ...        {"lr": 1e-4, "epoch": 10, "ks": 0.05, "mu_rel": 0.5}]
    >>> select_point(pts)["point"]["epoch"]
    5
    """
    if not points:
        raise ValueError("select_point needs at least one grid point (every grid run failed?)")
    bad = [p for p in points if p.get("ks") is None or p.get("mu_rel") is None]
    if bad:
        raise ValueError(f"select_point: points without KS D or relative utility: {bad[:2]}")
    kept = [p for p in points if keeps(p["mu_rel"], floor)]
    if kept:
        best = min(kept, key=lambda p: (p["ks"], -p["mu_rel"], p["epoch"], p["lr"]))
        return {"point": best, "keeps_no_point": False,
                "reason": f"lowest KS D among the {len(kept)} points at >= {floor}x the target's utility"}
    best = min(points, key=lambda p: (-p["mu_rel"], p["ks"], p["epoch"], p["lr"]))
    return {"point": best, "keeps_no_point": True, "reason": f"no point keeps {floor}x utility: the highest utility"}


def best_baseline(pair: dict[str, dict], baselines: list[str], floor: float = 0.95) -> str:
    """The baseline whose selected point gets the seed rerun on a pair: the lowest KS D among the baselines that keep
    utility on that pair, else the lowest KS D (``pair``: ``{method: {"ks", "mu_rel"}}``; ties: the preset's order)."""
    have = [b for b in baselines if b in pair]
    if not have:
        raise ValueError(f"best_baseline: none of the baselines {baselines} has a reported run on this pair")
    kept = [b for b in have if keeps(pair[b]["mu_rel"], floor)]
    return min(kept or have, key=lambda b: (pair[b]["ks"], have.index(b)))


def beats_on_pair(x: dict, y: dict, diff: dict, seed_diff: float | None, floor: float = 0.95,
                  sign: int = 1) -> bool:
    """Whether X beats Y on one pair: X's selected point keeps utility there and either (a) Y is marked keeps no
    point or Y's point does not keep utility on the pair, or (b) the 95% interval of ``diff`` (D_Y - D_X for
    ``sign=1``; D_X - D_Y given as -diff for ``sign=-1``) lies above 0 and the seed-rerun difference keeps its sign.
    ``x``/``y``: ``{"mu_rel", "keeps_no_point"}``; ``diff``: ``{"low", "high"}`` of D_B - D_PALU."""
    if not keeps(x["mu_rel"], floor):
        return False
    if y["keeps_no_point"] or not keeps(y["mu_rel"], floor):
        return True
    low = diff["low"] if sign == 1 else -diff["high"]
    return low > 0 and seed_diff is not None and sign * seed_diff > 0


def decide(pairs: dict[str, dict], floor: float = 0.95) -> dict:
    """The decision rule for one baseline B over the reported pairs.  ``pairs``: ``{pair: {"palu": {"mu_rel",
    "keeps_no_point"}, "baseline": {...}, "diff": {"diff", "low", "high"} (D_B - D_PALU, paired bootstrap),
    "seed_diff": D_B - D_PALU with the seed-1 run(s) in place (None: not run)}}``.  Returns ``{"verdict": "beats" |
    "loses" | "not resolved", "per_pair": {pair: "palu" | "baseline" | None}, "intervals": {pair: [low, high]}}``:
    "beats" = PALU beats B on every pair, "loses" = B beats PALU on every pair."""
    if not pairs:
        raise ValueError("decide needs at least one reported pair")
    per = {}
    for name, p in pairs.items():
        if beats_on_pair(p["palu"], p["baseline"], p["diff"], p["seed_diff"], floor, sign=1):
            per[name] = "palu"
        elif beats_on_pair(p["baseline"], p["palu"], p["diff"], p["seed_diff"], floor, sign=-1):
            per[name] = "baseline"
        else:
            per[name] = None
    winners = set(per.values())
    verdict = ("beats" if winners == {"palu"} else "loses" if winners == {"baseline"} else "not resolved")
    return {"verdict": verdict, "per_pair": per,
            "intervals": {n: [p["diff"]["low"], p["diff"]["high"]] for n, p in pairs.items()},
            "diffs": {n: p["diff"]["diff"] for n, p in pairs.items()}}


def goal(verdicts: dict[str, dict], palu_points: dict[str, dict], fq_floor: float = 0.5,
         floor: float = 0.95) -> dict:
    """The goal: PALU beats every baseline on both pairs and reaches forget quality >= ``fq_floor`` at relative
    utility >= ``floor`` on each pair (``palu_points``: ``{pair: {"fq", "mu_rel"}}``)."""
    beats_all = bool(verdicts) and all(v["verdict"] == "beats" for v in verdicts.values())
    fq_ok = {n: p.get("fq") is not None and p["fq"] >= fq_floor and keeps(p["mu_rel"], floor)
             for n, p in palu_points.items()}
    return {"beats_every_baseline": beats_all, "forget_quality_at_utility": fq_ok,
            "met": beats_all and bool(fq_ok) and all(fq_ok.values())}
