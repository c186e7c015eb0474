"""The learning-rate sweep of ``benchmarks/tofu_real.py`` on development authors: its data and its rule (pure parts).

The rule was written down before any sweep run, and is mini-TOFU's rule (``benchmarks/mini_tofu/settings.py``,
``FAMILY_LR``) carried over unchanged:

- **development authors**: TOFU authors 196 and 197 (rows 3920-3959 of ``full.jsonl``; their paraphrased / perturbed
  answers are in ``forget05_perturbed``) -- outside forget01 (198-199) and outside the retain authors (0..R-1);
- **development target**: the reported target itself, whose SFT rows are retain + the development authors + forget
  (TOFU's own setting: its target saw every author); the retain model is the reported one (it never saw authors
  196-199), so development forget quality is the KS test of the development authors' truth ratios against the
  retain model's on the same rows, and the development utility is compared with the target's on the same utility
  rows.  (Until 2026-12-02 the development target was a second SFT on retain + the development authors alone; one
  target saves that SFT, ~6 of the script's minutes, and was chosen for the budget before any run with it);
- **grid**: the target's SFT learning rate times ``GRID`` = (0.1, 0.3, 1): mini-TOFU's grid {3e-4, 1e-3, 3e-3} at
  its SFT lr 3e-3, i.e. 2e-5, 6e-5, 2e-4 here;
- **one lr per family** of ``mini_tofu.FAMILY`` (entropy: palu, palu_pd, pd_flat; nll: grad_ascent, grad_diff;
  preference: npo, simnpo, idk_dpo), swept on one representative each (``REPRESENTATIVES``: palu on the project's
  span detector, since PALU's GPT labels exist for forget01 only; grad_diff; npo) to fit the CPU budget;
- **choice** (:func:`choose_lr`): the lr with the highest geometric-mean development forget quality of the family's
  swept methods among those whose mean development utility stays >= 0.9x the development target's; if none does, the
  lr with the highest mean utility; ties go to the higher utility.  palu's choice also sets every PALU ablation's lr
  and palu with PALU's labels.
"""

from __future__ import annotations

import math
from pathlib import Path

from benchmarks.mini_tofu import FAMILY, ROWS_PER_AUTHOR, metrics_table, tofu_perturbed_index
from palu_ds.data.io import read_json_records

DEV_AUTHORS = (196, 197)
GRID = (0.1, 0.3, 1.0)
#: the swept run of each family (run names of tofu_real's specs)
REPRESENTATIVES = {"entropy": "palu_detector", "nll": "grad_diff", "preference": "npo"}
UTILITY_FLOOR = 0.9


def grid(sft_lr: float) -> list[float]:
    """The swept learning rates: ``sft_lr * GRID``, rounded to 3 significant digits (``2e-4`` -> 2e-5, 6e-5, 2e-4)."""
    return [float(f"{sft_lr * g:.3g}") for g in GRID]


def family_of(run: str) -> str:
    """The lr family of a tofu_real run name: ``palu_detector`` and the ``palu_K*`` / ``palu_N*`` ablations are
    palu's (entropy)."""
    method = "palu" if run == "palu_detector" or run.startswith(("palu_K", "palu_N")) else run
    if method not in FAMILY:
        raise KeyError(f"no lr family for run {run!r}; families: {sorted(set(FAMILY.values()))}")
    return FAMILY[method]


def dev_row_ids(n_full: int, n_forget: int, retain_authors: int, dev_authors=DEV_AUTHORS) -> list[int]:
    """Row numbers in ``full.jsonl`` of the development authors; refuses authors the retain model or the forget set
    holds (``n_full`` / ``n_forget``: rows of full and of the forget split)."""
    forget_first = (n_full - n_forget) // ROWS_PER_AUTHOR
    clash = [a for a in dev_authors if a < retain_authors or a >= forget_first]
    if clash:
        raise ValueError(f"development authors {list(dev_authors)} overlap the retain authors 0..{retain_authors - 1} "
                         f"or the forget authors {forget_first}..{n_full // ROWS_PER_AUTHOR - 1} ({clash}): the "
                         "sweep needs authors that neither the retain model nor the reported forget set holds")
    return [ROWS_PER_AUTHOR * a + k for a in dev_authors for k in range(ROWS_PER_AUTHOR)]


def build_dev_data(tofu: Path, split: str, main_files: dict[str, list[dict]], retain_authors: int,
                   dev_authors=DEV_AUTHORS) -> dict:
    """The development run's files, laid out as the reported run's (the forget rows under ``split``'s names, so the
    TOFU evaluation reads them unchanged): ``split`` / ``split_perturbed`` = the development authors' rows with TOFU's
    perturbed answers; ``retain``, every utility file and ``idontknow`` as in ``main_files`` (the target's SFT rows
    are not a development file: the target is shared)."""
    full = read_json_records(tofu / "full.jsonl")
    ids = dev_row_ids(len(full), len(main_files[split]), retain_authors, dev_authors)
    rows = [full[i] for i in ids]
    sources = sorted(tofu.glob("forget*_perturbed.jsonl"))
    index = tofu_perturbed_index(full, [read_json_records(p) for p in sources])
    missing = [i for i in ids if i not in index]
    if missing:
        raise ValueError(f"{tofu}: no perturbed answers for rows {missing[:5]}... of the development authors "
                         f"{list(dev_authors)} in {', '.join(p.name for p in sources)}")
    files = {**{k: v for k, v in main_files.items() if k != "target"}, split: rows,
             f"{split}_perturbed": [index[i] for i in ids]}
    return {"files": files, "info": {"dev_authors": list(dev_authors), "rows": len(rows)}}


def choose_lr(by_lr: dict[float, dict[str, dict]], target_utility: float) -> dict:
    """``by_lr`` = ``{lr: {run: metrics}}`` of one family on the development authors; returns ``{"lr", "reason",
    "scores": {lr: {"fq_gmean", "mu_rel"}}}`` by the module's rule.

    >>> r = choose_lr({1e-4: {"npo": {"forget_quality": 0.5, "model_utility": 0.8}},
    ...                2e-4: {"npo": {"forget_quality": 0.9, "model_utility": 0.5}}}, target_utility=0.8)
    >>> r["lr"], r["reason"]
    (0.0001, 'highest forget quality at utility >= 0.9x')
    """
    if not by_lr or not target_utility:
        raise ValueError("choose_lr needs at least one swept lr and the development target's utility")
    scores = {}
    for lr, runs in by_lr.items():
        fqs = [max(m["forget_quality"], 1e-300) for m in runs.values()]
        mus = [m["model_utility"] for m in runs.values()]
        scores[lr] = {"fq_gmean": math.exp(sum(map(math.log, fqs)) / len(fqs)),
                      "mu_rel": sum(mus) / len(mus) / target_utility}
    ok = [lr for lr, s in scores.items() if s["mu_rel"] >= UTILITY_FLOOR]
    if ok:
        best = max(ok, key=lambda lr: (scores[lr]["fq_gmean"], scores[lr]["mu_rel"]))
        reason = f"highest forget quality at utility >= {UTILITY_FLOOR}x"
    else:
        best = max(scores, key=lambda lr: scores[lr]["mu_rel"])
        reason = f"no lr keeps utility >= {UTILITY_FLOOR}x: the highest utility"
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
            "rule in benchmarks/tofu_real_dev.py:")
    lines = [head, "", metrics_table(rows, cols), ""]
    lines += [f"- {fam}: lr {f['choice']['lr']:g} ({f['choice']['reason']})" for fam, f in sweep["families"].items()]
    return "\n".join(lines) + "\n"
