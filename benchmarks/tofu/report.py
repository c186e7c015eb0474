"""The report: tables (columns from the evaluated parts), the cost by part, ``<report>.md`` and
``<report>.png`` (forget quality vs model utility, the retain model as the ideal point)."""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

NAMES = {"prob": "prob", "rougeL_recall": "ROUGE-L", "truth_ratio": "TR"}


def fmt(v, key: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, str):
        return v
    return f"{v:.2e}" if key == "forget_quality" else f"{v:.3f}"


def columns(parts) -> list[tuple[str, str]]:
    """``[(metric key, header)]``: forget quality, KS D, then per part its truth ratio, ROUGE-L and probability
    (forget first: what unlearning moves), then utility and utility relative to the target."""
    cols = [("forget_quality", "forget quality"), ("ks_statistic", "KS D")]
    for p in parts:
        order = ("truth_ratio", "rougeL_recall", "prob") if p == "forget" else ("prob", "rougeL_recall", "truth_ratio")
        cols += [(f"{p}/{m}", f"{p.split('_')[0]} {NAMES[m]}") for m in order]
    return cols + [("model_utility", "utility"), ("mu_rel", "utility / target")]


def add_relative(results: dict[str, dict]) -> None:
    """``mu_rel`` = model utility / the target's, in place."""
    mu_t = results.get("target", {}).get("model_utility")
    for m in results.values():
        mu = m.get("model_utility")
        m["mu_rel"] = mu / mu_t if mu is not None and mu_t else None


def metrics_table(rows: list[tuple[str, dict]], cols: list[tuple[str, str]]) -> str:
    """One markdown table: ``rows`` = ``[(label, metrics)]``, ``cols`` = ``[(metric key, header)]``."""
    lines = ["| run | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(fmt(m.get(k), k) for k, _ in cols) + " |" for label, m in rows]
    return "\n".join(lines)


def minutes_by_part(stage_seconds: dict[str, float], part_of) -> dict[str, float]:
    """Minutes from scratch by ``part_of(stage)``, from each stage's own seconds (a reused stage keeps the seconds it
    took), rounded to 0.1, and ``total``."""
    parts: dict[str, float] = {}
    for stage, sec in stage_seconds.items():
        parts[part_of(stage)] = parts.get(part_of(stage), 0.0) + sec / 60
    return {**{k: round(v, 1) for k, v in parts.items()}, "total": round(sum(stage_seconds.values()) / 60, 1)}


def cost_by_part(stage_seconds: dict[str, float], specs: dict[str, dict]) -> dict[str, float]:
    """:func:`minutes_by_part` of the runner: SFT, references (the shared precomputes), methods / ablations (a run's
    unlearning and evaluation), base, retain, target evaluation; the others by stage name."""
    def part(stage: str) -> str:
        run = stage.split("_", 1)[1] if stage.startswith(("unlearn_", "eval_")) else None
        if stage.startswith(("sft_", "precompute_")):
            return "SFT" if stage.startswith("sft_") else "references"
        if run in specs:
            return specs[run]["group"] + "s"
        return "base, retain, target evaluation" if run in ("base", "retain", "target") else stage
    return minutes_by_part(stage_seconds, part)


def sft_lines(sft: dict) -> list[str]:
    return [f"- {n} SFT: answer NLL {v['first_nll']:.3f} -> {v['last_nll']:.3f} in {v['steps']} steps"
            + ("" if v.get("memorized", True) else " (WARNING: not memorized, >= 0.1)") for n, v in sft.items()]


def position_nll_lines(what: str, rows: dict) -> list[str]:
    """The table of answer NLL by position kind (``what``: on which rows), ``rows`` = ``{model: {kind: nll}}``."""
    from benchmarks.position_nll import nll_table

    return ["", f"Answer NLL (nats/token) {what} (PALU's labels, N = 3):", "", *nll_table(rows).splitlines()]


def lr_text(report: dict) -> str:
    """``"2e-05 (entropy), 0.0002 (nll, preference)"``-style: each family lr, and the lr of the others."""
    by_lr: dict[float, list[str]] = {}
    for fam, lr in report["family_lr"].items():
        by_lr.setdefault(lr, []).append(fam)
    fams = ", ".join(f"{lr:g} ({', '.join(f)})" for lr, f in by_lr.items())
    default = report["default_lr"]
    text = f"{fams}; other families {default:g}" if fams else f"{default:g} for every run"
    return f"{text} (lr.choice {report['preset']['lr']['choice']})"


def _cost_lines(report: dict) -> list[str]:
    secs = report["stage_seconds"]
    cost = cost_by_part(secs, report["specs"])
    untimed = [n for n in report.get("stage_status", {}) if n not in secs]
    return ["", f"Cost from scratch (each stage's own time; reused stages as measured when they ran): "
            f"{cost.pop('total'):.1f} min = " + ", ".join(f"{k} {v:.1f}" for k, v in cost.items())
            + (f"; not counted: {len(untimed)} reused stages whose stamp has no time" if untimed else "") + ".",
            "", f"Wall time of this invocation {report['wall_seconds'] / 60:.1f} min; stage seconds in the json."]


def render_markdown(report: dict) -> str:
    res, specs, info, preset = report["results"], report["specs"], report["data"], report["preset"]
    cols = columns(preset["eval"]["parts"])
    main = [(n, res[n]) for n in ("base", "retain", "target") if n in res]
    main += [(n, res[n]) for n, s in specs.items() if s["group"] == "method" and n in res]
    abl = [(f"{s['method']} {', '.join(s['ablation'])}", res[n]) for n, s in specs.items()
           if s.get("ablation") and n in res]
    lines = [f"### {preset['title']}: forget authors {info['forget_authors']} ({info['forget_split']}), "
             f"{len(info['retain_authors']) if isinstance(info['retain_authors'], list) else info['retain_authors']} "
             f"retain authors, seed {preset['seed']}", "",
             f"SFT {preset['sft']}; unlearning {preset['unlearn']} at lr {lr_text(report)}; generation max "
             f"{report['max_new_tokens']} new tokens.", "", metrics_table(main, cols), ""]
    if abl:
        lines += [f"Ablations of {preset['ablations']['method']} (the others at the main run's values):", "",
                  metrics_table(abl, cols), ""]
    lines += [preset["footnote"], ""] if preset["footnote"] else []
    lines += sft_lines(report.get("sft", {}))
    if report.get("position_nll"):
        lines += position_nll_lines("on the forget set by position kind", report["position_nll"])
    lines += [f"- FAILED {n}: {e}" for n, e in report.get("failed", {}).items()]
    return "\n".join(lines + _cost_lines(report)) + "\n"


@contextmanager
def figure(path: str | Path, panels: int, width: float, height: float):
    """``panels`` matplotlib axes side by side (no display needed), the figure saved to ``path`` after the block."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=(width * panels, height), squeeze=False)
    yield axes[0], plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _point(m: dict) -> tuple[float, float] | None:
    """``(utility, forget quality)`` of a result (floored for the log scale), None when one is missing."""
    if m.get("forget_quality") is None or m.get("model_utility") is None:
        return None
    return m["model_utility"], max(m["forget_quality"], 1e-300)


def _plot_panel(ax, title: str, names: list[str], report: dict, colors: list[str]) -> None:
    res, specs = report["results"], report["specs"]
    labels_at: dict = {}
    for i, n in enumerate(names):
        if (xy := _point(res.get(n, {}))) is None:
            continue
        label = n if specs[n]["group"] == "method" or title == "methods" else ", ".join(specs[n]["ablation"])
        ax.scatter(*xy, s=60, color=colors[i % len(colors)], zorder=3, label=label)
        labels_at.setdefault((round(xy[0], 2), round(math.log10(xy[1]))), []).append((xy, label))
    for group in labels_at.values():  # coincident points (e.g. all at the KS floor) share one label
        ax.annotate(" / ".join(g[1] for g in group), group[0][0], textcoords="offset points", xytext=(5, 4),
                    fontsize=7)
    for n, mk, c in (("target", "X", "black"), ("base", "P", "gray")):
        if (xy := _point(res.get(n, {}))) is not None:
            ax.scatter(*xy, marker=mk, s=90, color=c, zorder=4, label=n)
    r, mu_t = res.get("retain", {}), res.get("target", {}).get("model_utility")
    if r.get("model_utility") is not None:
        ax.scatter(r["model_utility"], 1.0, marker="*", s=160, color="gold", edgecolor="black", zorder=4,
                   label="retain model (ideal: FQ = 1)")
    if mu_t is not None:
        ax.axvline(0.9 * mu_t, ls=":", color="gray", lw=1, label="0.9 x target utility")
    ax.axhline(0.05, ls="--", color="gray", lw=0.8, label="p = 0.05")
    ax.set_yscale("log")
    ax.set_xlabel("model utility (harmonic mean of the utility parts)")
    ax.set_ylabel("forget quality (KS p-value vs retain model, log)")
    ax.set_title(f"{report['preset']['title']}: {title}", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6, loc="lower left")


def render_png(report: dict, path: str | Path) -> None:
    specs = report["specs"]
    groups = [("methods", [n for n, s in specs.items() if s["group"] == "method"]),
              ("ablations", [n for n, s in specs.items() if s.get("ablation")])]
    groups = [(t, ns) for t, ns in groups if ns]
    with figure(path, len(groups), 7, 5.5) as (axes, colors):
        for ax, (title, names) in zip(axes, groups):
            _plot_panel(ax, title, names, report, colors)
