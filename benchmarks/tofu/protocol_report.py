"""The efficacy protocol's report (:mod:`.protocol`): ``render_markdown`` (the SFT checks, the reference models, the
grid, the selection, each reported pair with its intervals, the decision per baseline, the goal, the NLL by position
kind, the cost by part) and ``render_png`` (the frontier: KS D vs relative utility, every grid point of every method,
the retain model as the ideal point, intervals on the selected points of each reported pair)."""

from __future__ import annotations

from pathlib import Path

from .report import figure, fmt, metrics_table, position_nll_lines, sft_lines

REF_COLS = [("forget_quality", "forget quality"), ("ks_statistic", "KS D"), ("forget/prob", "forget prob"),
            ("forget/rougeL_recall", "forget ROUGE-L"), ("model_utility", "utility")]


def _iv(lo, hi) -> str:
    return "—" if lo is None or hi is None else f"[{lo:.3f}, {hi:.3f}]"


def _pt(p: dict) -> str:
    return f"lr {p['lr']:g}, epoch {p['epoch']:g}"


def reference_lines(report: dict) -> list[str]:
    lines = sft_lines(report["sft"])
    for pair, ms in report["references"].items():
        lines += ["", f"Reference models on {pair} (authors {report['pairs'][pair]['authors']}):", "",
                  metrics_table(list(ms.items()), REF_COLS)]
    return lines


def grid_lines(report: dict) -> list[str]:
    lines = ["", "Grid on the development authors (every point; * = selected):", "",
             "| method | lr | epoch | KS D | forget quality | utility | utility / target |", "|---" * 7 + "|"]
    for m, pts in report["grid"].items():
        sel = report["selection"].get(m, {}).get("point")
        for p in pts:
            mark = "*" if sel and (p["lr"], p["epoch"]) == (sel["lr"], sel["epoch"]) else ""
            lines.append(f"| {m}{mark} | {p['lr']:g} | {p['epoch']:g} | {fmt(p['ks'])} | "
                         f"{fmt(p['fq'], 'forget_quality')} | {fmt(p['mu'])} | {fmt(p['mu_rel'])} |")
    chk = report.get("fp32_check")
    if chk:
        lines += ["", f"Precision check ({_pt(chk['fp32'])}, {chk['fp32']['method']}): trained in bf16 as the protocol -> "
                  + (f"KS D {fmt(chk['grid']['ks'])}, utility {fmt(chk['grid']['mu_rel'])}x" if chk["grid"] else "—")
                  + f"; in fp32 -> KS D {fmt(chk['fp32']['ks'])}, utility "
                  f"{fmt(chk['fp32']['mu_rel'])}x"]
    lines += ["", "Selection (rule in benchmarks/tofu/rules.py):", ""]
    lines += [f"- {m}: {_pt(s['point'])} (KS D {fmt(s['point']['ks'])}, utility {fmt(s['point']['mu_rel'])}x)"
              + (" -- keeps no point" if s["keeps_no_point"] else "") + f"; {s['reason']}"
              for m, s in report["selection"].items()]
    return lines


def pair_lines(report: dict) -> list[str]:
    lines = []
    for pair, nums in report.get("numbers", {}).items():
        lines += ["", f"Pair {pair} (authors {report['pairs'][pair]['authors']}, every utility row; best baseline "
                  f"{report['best_baseline'].get(pair, '—')}):", "",
                  "| run | point | KS D | KS D 95% | forget quality | utility | utility 95% | utility / target | "
                  "ratio 95% |", "|---" * 9 + "|"]
        for name, n in nums.items():
            u = n["utility_interval"]
            where = _pt(n) + (f", seed {n['seed']}" if n.get("seed") is not None else "") if "lr" in n else "—"
            lines.append(f"| {name} | {where} | {fmt(n['ks'])} | {_iv(*n.get('ks_interval', (None, None)))} | "
                         f"{fmt(n.get('fq'), 'forget_quality')} | {fmt(u['utility'])} | {_iv(u['low'], u['high'])} | "
                         f"{fmt(n['mu_rel'])} | {_iv(u.get('ratio_low'), u.get('ratio_high'))} |")
    return lines


def decision_lines(report: dict) -> list[str]:
    if not report.get("verdicts"):
        return []
    method = report["preset"]["protocol"]["method"]
    lines = ["", f"Decision ({method} vs each baseline; D_B - D_{method} with its paired-bootstrap 95% interval, "
             "the seed-rerun difference):", ""]
    for b, v in report["verdicts"].items():
        per = "; ".join(f"{pair}: {fmt(i['diff']['diff'])} {_iv(i['diff']['low'], i['diff']['high'])}, seed "
                        f"{fmt(i['seed_diff'])}" for pair, i in v["inputs"].items())
        lines.append(f"- {b}: **{v['verdict']}** ({per})")
    g = report["goal"]
    lines.append(f"- Goal ({method} beats every baseline on both pairs and reaches forget quality >= "
                 f"{report['preset']['protocol']['fq_goal']} at >= {report['preset']['protocol']['utility_floor']}x "
                 f"utility): {'MET' if g['met'] else 'NOT met'} (beats all: {g['beats_every_baseline']}; forget "
                 f"quality at utility per pair: {g['forget_quality_at_utility']})")
    return lines


def render_markdown(report: dict) -> str:
    p = report["preset"]
    lines = [f"### {p['title']}", "", f"SFT {p['sft']}; unlearning {p['unlearn']}, lrs {p['protocol']['lrs']}, "
             f"in-run evaluations after epochs {p['protocol']['epochs']}; generation max {report['max_new_tokens']} "
             "new tokens.", ""]
    lines += reference_lines(report) + grid_lines(report) + pair_lines(report) + decision_lines(report)
    for pair, rows in (report.get("position_nll") or {}).items():
        lines += position_nll_lines(f"by position kind on pair {pair}", rows)
    lines += ["", p["footnote"]] if p["footnote"] else []
    lines += [f"- FAILED {n}: {e}" for n, e in report.get("failed", {}).items()]
    cost = dict(report["cost_minutes"])
    lines += ["", f"Cost from scratch (minutes, each stage's own time): {cost.pop('total'):.1f} = "
              + ", ".join(f"{k} {v:.1f}" for k, v in cost.items())
              + f"; wall time of this invocation {report['wall_seconds'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def _panel(ax, title: str, retain_mu: float | None, floor: float) -> None:
    if retain_mu is not None:
        ax.scatter([retain_mu], [0.0], marker="*", s=180, color="gold", edgecolor="black", zorder=5,
                   label="retain model (ideal)")
    ax.axvline(floor, ls=":", color="gray", lw=1, label=f"{floor} x target utility")
    ax.set_xlabel("utility / target's (same rows)")
    ax.set_ylabel("KS D vs the retain model (lower = closer)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)


def render_png(report: dict, path: str | Path) -> None:
    floor, pairs = report["preset"]["protocol"]["utility_floor"], list(report.get("numbers", {}))
    with figure(path, 1 + len(pairs), 6, 5) as (axes, cycle):
        colors = {m: cycle[i % len(cycle)] for i, m in enumerate(report["grid"])}
        _frontier(report, axes, pairs, colors, floor)


def _frontier(report: dict, axes, pairs: list[str], colors: dict, floor: float) -> None:
    """The grid on the development authors (first panel), each reported pair's selected points with intervals."""
    dev, ax = report["references"]["dev"], axes[0]
    for m, pts in report["grid"].items():
        ax.scatter([p["mu_rel"] for p in pts], [p["ks"] for p in pts], s=[12 + 4 * p["epoch"] for p in pts],
                   color=colors[m], alpha=0.6, label=m)
        s = report["selection"].get(m)
        if s:
            ax.scatter([s["point"]["mu_rel"]], [s["point"]["ks"]], s=120, facecolor="none", edgecolor="black")
    _panel(ax, "development authors: every grid point (size = epochs; circled = selected)",
           dev["retain"]["model_utility"] / dev["target"]["model_utility"], floor)
    ax.legend(fontsize=6)
    for ax, pair in zip(axes[1:], pairs):
        for name, n in report["numbers"][pair].items():
            if name == "retain" or n.get("mu_rel") is None:
                continue
            u, k = n["utility_interval"], n["ks_interval"]
            xerr = [[max(0.0, n["mu_rel"] - u["ratio_low"])], [max(0.0, u["ratio_high"] - n["mu_rel"])]]
            yerr = [[max(0.0, n["ks"] - k[0])], [max(0.0, k[1] - n["ks"])]]  # a percentile interval may miss the point
            ax.errorbar([n["mu_rel"]], [n["ks"]], xerr=xerr, yerr=yerr, fmt="o" if n.get("seed") is None else "s",
                        color=colors.get(n["method"], "black"), capsize=3, label=name)
        _panel(ax, f"pair {pair}: selected points, 95% intervals", report["numbers"][pair]["retain"]["mu_rel"], floor)
        ax.legend(fontsize=6)
