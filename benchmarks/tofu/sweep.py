"""The learning-rate rule of the development sweep (pure parts; written down before any sweep ran):

- **development authors** (``lr.sweep.dev_authors``): TOFU authors outside the forget split and the retain authors,
  learned by the reported target (TOFU's own setting: its target saw every author); development forget quality is
  the KS test of their truth ratios against the retain model's on the same rows, development utility is compared with
  the target's on the same utility rows;
- **grid**: the target's SFT lr times ``lr.sweep.grid`` (0.1, 0.3, 1: mini-TOFU's grid {3e-4, 1e-3, 3e-3} at its SFT
  lr 3e-3), rounded to 3 significant digits;
- **one lr per family** (``palu_ds.methods.Method.family``), swept on one representative run each
  (``lr.sweep.representatives``); a family without a representative runs at the SFT lr;
- **choice** (:func:`choose_lr`): the lr with the highest geometric-mean development forget quality of the family's
  swept runs among those whose mean development utility stays >= ``utility_floor`` x the target's; if none does, the
  lr with the highest mean utility; ties go to the higher utility.
"""

from __future__ import annotations

import math

from .report import metrics_table


def grid(sft_lr: float, factors) -> list[float]:
    """The swept learning rates: ``sft_lr * factor``, 3 significant digits (``2e-4`` -> 2e-5, 6e-5, 2e-4)."""
    return [float(f"{sft_lr * g:.3g}") for g in factors]


def choose_lr(by_lr: dict[float, dict[str, dict]], target_utility: float, floor: float = 0.9) -> dict:
    """The module's choice from ``by_lr`` = ``{lr: {run: metrics}}`` of one family on the development authors:
    ``{"lr", "reason", "scores": {lr: {"fq_gmean", "mu_rel"}}}`` (tests/test_tofu_bench.py has worked cases)."""
    if not by_lr or not target_utility:
        raise ValueError("choose_lr needs at least one swept lr and the development target's utility")
    scores = {}
    for lr, runs in by_lr.items():
        fqs = [max(m["forget_quality"], 1e-300) for m in runs.values()]
        mus = [m["model_utility"] for m in runs.values()]
        scores[lr] = {"fq_gmean": math.exp(sum(map(math.log, fqs)) / len(fqs)),
                      "mu_rel": sum(mus) / len(mus) / target_utility}
    ok = [lr for lr, s in scores.items() if s["mu_rel"] >= floor]
    if ok:
        best = max(ok, key=lambda lr: (scores[lr]["fq_gmean"], scores[lr]["mu_rel"]))
        reason = f"highest forget quality at utility >= {floor}x"
    else:
        best = max(scores, key=lambda lr: scores[lr]["mu_rel"])
        reason = f"no lr keeps utility >= {floor}x: the highest utility"
    return {"lr": best, "reason": reason, "scores": scores}


def sweep_markdown(sweep: dict) -> str:
    """The sweep's table: one row per (family, lr) with the representative's development numbers and the choice."""
    rows = []
    for fam, f in sweep["families"].items():
        for lr, runs in f["runs"].items():
            for run, m in runs.items():
                chosen = " (chosen)" if float(lr) == f["choice"]["lr"] else ""
                rows.append((f"{fam}: {run} lr {float(lr):g}{chosen}", m))
    cols = [("forget_quality", "dev forget quality"), ("forget/truth_ratio", "dev forget TR"),
            ("forget/prob", "dev forget prob"), ("model_utility", "dev utility"), ("mu_rel", "utility / dev target")]
    t = sweep.get("target", {})
    head = (f"Learning-rate sweep on development authors {sweep['dev_authors']} (dev target utility "
            f"{t.get('model_utility', float('nan')):.3f}, forget quality {t.get('forget_quality', float('nan')):.3g}); "
            "rule in benchmarks/tofu/sweep.py:")
    lines = [head, "", metrics_table(rows, cols), ""]
    lines += [f"- {fam}: lr {f['choice']['lr']:g} ({f['choice']['reason']})" for fam, f in sweep["families"].items()]
    return "\n".join(lines) + "\n"
