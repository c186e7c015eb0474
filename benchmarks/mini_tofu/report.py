"""Stage 5, the report: tables, the goal check, ``mini_tofu.md`` and ``mini_tofu.png``."""

from __future__ import annotations

import math
from pathlib import Path

from .settings import BASELINES_FOR_GOAL


COLUMNS = [("forget_quality", "forget quality"), ("ks_statistic", "KS D"), ("forget/truth_ratio", "forget TR"),
           ("forget/rougeL_recall", "forget ROUGE-L"), ("forget/prob", "forget prob"),
           ("retain/prob", "retain prob"), ("retain/rougeL_recall", "retain ROUGE-L"),
           ("retain/truth_ratio", "retain TR"), ("model_utility", "utility"), ("mu_rel", "utility / target")]
NOT_MEASURED = "n/a†"
FOOTNOTE = ("† real_authors / world_facts are not run: a model trained from scratch on a few fictitious authors "
            "knows no real authors or world facts, so those parts would measure nothing. \"utility\" is the "
            "harmonic mean of the 3 retain values (retain prob, ROUGE-L recall, truth ratio), not TOFU's 9.")


def fmt(v, key: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, str):
        return v
    if key == "forget_quality":
        return f"{v:.2e}"
    return f"{v:.3f}"


def add_relative(results: dict[str, dict]) -> None:
    """``mu_rel`` = model utility / the target's, in place."""
    mu_t = results.get("target", {}).get("model_utility")
    for m in results.values():
        mu = m.get("model_utility")
        m["mu_rel"] = mu / mu_t if mu is not None and mu_t else None


def metrics_table(rows: list[tuple[str, dict]], columns: list[tuple[str, str]],
                  constant: tuple[str, str] | None = None) -> str:
    """One markdown table: ``rows`` = ``[(label, metrics)]``, ``columns`` = ``[(metric key, header)]`` (values by
    :func:`fmt`); ``constant`` = ``(header, cell)`` of a last column with the same cell on every row."""
    heads = [c[1] for c in columns] + ([constant[0]] if constant else [])
    lines = ["| run | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    for label, m in rows:
        cells = [fmt(m.get(k), k) for k, _ in columns] + ([constant[1]] if constant else [])
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_table(rows: list[tuple[str, dict]], extra: tuple[str, str] | None = None) -> str:
    """mini-TOFU's table: columns :data:`COLUMNS` (+ ``extra``) + real authors/world facts, not measured."""
    return metrics_table(rows, COLUMNS + ([extra] if extra else []), ("real authors / world facts", NOT_MEASURED))


def goal_check(results: dict[str, dict], method: str = "palu") -> dict:
    """The issue's goal: PALU's forget quality >= 10x the best of grad_diff / npo, at utility >= 0.9x the target's."""
    p = results.get(method, {})
    base = {b: results[b].get("forget_quality") for b in BASELINES_FOR_GOAL if b in results
            and results[b].get("forget_quality") is not None}
    out = {"method": method, "forget_quality": p.get("forget_quality"), "baselines": base,
           "utility_rel": p.get("mu_rel")}
    if p.get("forget_quality") is None or not base or p.get("mu_rel") is None:
        out.update(ratio=None, met=None)
        return out
    best = max(base.values())
    out["best_baseline"] = max(base, key=base.get)
    out["ratio"] = p["forget_quality"] / best if best > 0 else math.inf
    out["met"] = bool(out["ratio"] >= 10 and p["mu_rel"] >= 0.9)
    return out


def render_markdown(report: dict) -> str:
    res, specs = report["results"], report["specs"]
    info = report["data"]
    main_rows = [(n, res[n]) for n in ("target", "retain") if n in res]
    main_rows += [(n, res[n]) for n, s in specs.items() if s["group"] == "method" and n in res]
    abl = [(f"palu {', '.join(s['ablation'])}", res[n]) for n, s in specs.items() if s.get("ablation") and n in res]
    g = report["goal"]
    lines = [f"### mini-TOFU: authors {info['authors'][0]}:{info['authors'][1]}, forget {info['forget_pct']}% "
             f"(authors {info['forget_authors'][0]}..{info['forget_authors'][-1]}), seed {report['seed']}"
             + (f", pre-trained on authors {info['pretrain_authors'][0]}:{info['pretrain_authors'][1]}"
                if info.get("pretrain_authors") else ""), "",
             markdown_table(main_rows), ""]
    if abl:
        k0 = report.get("settings", {}).get("palu_K", "the scaled default")
        lines += [f"PALU ablations (K = top-K of the reference flattened, N = first N tokens of each span; the other "
                  f"one fixed at K = {k0} / N = 3, the main PALU run):", "",
                  markdown_table(abl), ""]
    lines += [FOOTNOTE, "",
              "The retain model's forget quality is 1 by definition (its own truth ratios); it is evaluated "
              "without it.",
              ""]
    if g.get("ratio") is not None:
        lines.append(f"Goal (PALU forget quality >= 10x max(grad_diff, npo) at utility >= 0.9x target): "
                     f"ratio {g['ratio']:.3g} (vs {g['best_baseline']}), utility {g['utility_rel']:.3f}x target -> "
                     f"{'MET' if g['met'] else 'NOT met'}")
    failed = {n: e for n, e in report.get("failed", {}).items()}
    if failed:
        lines += [""] + [f"- FAILED {n}: {e}" for n, e in failed.items()]
    lines += ["", f"Wall time {report['wall_seconds'] / 60:.1f} min; stage seconds in mini_tofu.json."]
    return "\n".join(lines) + "\n"


def render_png(report: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res, specs = report["results"], report["specs"]
    groups = [("methods", [n for n, s in specs.items() if s["group"] == "method"]),
              ("PALU ablations", [n for n, s in specs.items() if s.get("ablation")])]
    groups = [(t, ns) for t, ns in groups if ns]
    fig, axes = plt.subplots(1, len(groups), figsize=(7 * len(groups), 5.5), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    mu_t = res.get("target", {}).get("model_utility")
    for ax, (title, names) in zip(axes[0], groups):
        pts, labels_at = [], {}
        for i, n in enumerate(names):
            m = res.get(n, {})
            if m.get("forget_quality") is None or m.get("model_utility") is None:
                continue
            label = n if title == "methods" else ", ".join(specs[n]["ablation"])
            fq = max(m["forget_quality"], 1e-300)
            ax.scatter(m["model_utility"], fq, s=70, color=colors[i % len(colors)], zorder=3, label=label)
            labels_at.setdefault((round(m["model_utility"], 2), round(math.log10(fq))), []).append(
                (m["model_utility"], fq, label))
            pts.append((m["model_utility"], fq))
        for group in labels_at.values():  # coincident points (e.g. all at the KS floor) share one label
            ax.annotate(" / ".join(g[2] for g in group), group[0][:2], textcoords="offset points", xytext=(5, 4),
                        fontsize=8)
        t = res.get("target", {})
        if t.get("forget_quality") is not None and mu_t is not None:
            ax.scatter(mu_t, max(t["forget_quality"], 1e-300), marker="x", s=90, color="black", zorder=4,
                       label="target (before unlearning)")
            pts.append((mu_t, max(t["forget_quality"], 1e-300)))
        r = res.get("retain", {})
        if r.get("model_utility") is not None:
            ax.scatter(r["model_utility"], 1.0, marker="*", s=140, color="gold", edgecolor="black", zorder=4,
                       label="retain model (FQ = 1 by definition)")
            pts.append((r["model_utility"], 1.0))
        if mu_t is not None:
            ax.axvline(0.9 * mu_t, ls=":", color="gray", lw=1, label="0.9 x target utility")
        ax.axhline(0.05, ls="--", color="gray", lw=0.8, label="p = 0.05")
        ax.set_yscale("log")
        if pts:
            ax.set_ylim(min(min(p[1] for p in pts) / 10, 1e-3), 3.0)
        ax.set_xlabel("model utility (retain prob / ROUGE-L / truth ratio, harmonic mean)")
        ax.set_ylabel("forget quality (KS p-value vs retain model, log)")
        ax.set_title(f"mini-TOFU {title}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="lower left")
    info = report["data"]
    fig.suptitle(f"authors {info['authors'][0]}:{info['authors'][1]}, forget {info['forget_pct']}%, "
                 f"seed {report['seed']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
