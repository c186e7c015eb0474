"""Compare runs at a glance: a PNG (TOFU: forget quality on a log scale vs model utility, one point per run;
per-metric bars for every run) and a markdown table beside it.

    python palu_eval/report.py runs/eval/npo runs/eval/palu runs/eval/retain --out runs/eval/report.png

Each argument is a ``summary.json`` or a folder holding one (written by ``palu_eval/run.py``).  The table goes to
the same path with ``.md``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


#: metrics shown as bars, per suite (name in summary -> label); only those present in some run are drawn
BARS = {
    "tofu": {
        "model_utility": "model utility", "forget/prob": "forget prob",
        "forget/rougeL_recall": "forget ROUGE-L", "forget/truth_ratio": "forget TR",
        "forget/extraction_strength": "forget ES", "retain/prob": "retain prob",
        "retain/rougeL_recall": "retain ROUGE-L", "retain/truth_ratio": "retain TR",
        "real_authors/prob": "real authors prob", "world_facts/prob": "world facts prob",
        "mia_min_k_auc": "MIA Min-K AUC",
    },
    "muse": {
        "verbmem_f": "VerbMem forget", "knowmem_f": "KnowMem forget", "knowmem_r": "KnowMem retain",
        "mia_min_k_pp_auc": "MIA Min-K++ AUC", "mia_min_k_auc": "MIA Min-K AUC",
    },
}
#: shown in the table only (not in [0, 1])
TABLE_ONLY = {"tofu": {"forget_quality": "forget quality", "privleak": "PrivLeak %"}, "muse": {"privleak": "PrivLeak %", "privleak_min_k_pp": "PrivLeak Min-K++ %"}}


def load_summary(path: str | Path) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "summary.json"
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found: pass summary.json files (or their folders) written by "
                                f"palu_eval/run.py --out DIR")
    s = json.loads(p.read_text())
    s.setdefault("name", p.parent.name)
    return s


def markdown_table(summaries: list[dict]) -> str:
    lines = []
    for suite in ("tofu", "muse"):
        runs = [s for s in summaries if s.get("suite") == suite]
        if not runs:
            continue
        cols = {**{k: v for k, v in TABLE_ONLY[suite].items() if k == "forget_quality"}, **BARS[suite],
                **{k: v for k, v in TABLE_ONLY[suite].items() if k != "forget_quality"}}
        cols = {k: v for k, v in cols.items() if any(k in r["metrics"] for r in runs)}
        lines += [f"### {suite.upper()} ({', '.join(sorted({r['split'] for r in runs}))})", "",
                  "| run | " + " | ".join(cols.values()) + " |", "|---" * (len(cols) + 1) + "|"]
        for r in runs:
            vals = [_fmt(r["metrics"].get(k), k) for k in cols]
            lines.append(f"| {r['name']} | " + " | ".join(vals) + " |")
        notes = {n for r in runs for n in r["metrics"].get("notes", [])}
        lines += [""] + [f"- note: {n}" for n in sorted(notes)] + [""]
    return "\n".join(lines)


def _fmt(v, key) -> str:
    if v is None or not isinstance(v, (int, float)):
        return "—"
    if key == "forget_quality":
        return f"{v:.2e}"
    return f"{v:.1f}" if "privleak" in key else f"{v:.3f}"


def render(summaries: list[dict], out_png: str | Path) -> tuple[Path, Path]:
    """Write the PNG and the markdown table (same stem, ``.md``); returns both paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    suites = [s for s in ("tofu", "muse") if any(r.get("suite") == s for r in summaries)]
    panels = []
    for suite in suites:
        runs = [r for r in summaries if r.get("suite") == suite]
        if suite == "tofu" and any("forget_quality" in r["metrics"] and "model_utility" in r["metrics"] for r in runs):
            panels.append(("scatter", suite, runs))
        panels.append(("bars", suite, runs))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (kind, suite, runs) in zip(axes[0], panels):
        if kind == "scatter":
            for i, r in enumerate(runs):
                fq, mu = r["metrics"].get("forget_quality"), r["metrics"].get("model_utility")
                if fq is None or mu is None:
                    continue
                ax.scatter(mu, max(fq, 1e-300), s=80, color=colors[i % len(colors)], label=r["name"], zorder=3)
                ax.annotate(r["name"], (mu, max(fq, 1e-300)), textcoords="offset points", xytext=(5, 5), fontsize=8)
            mus = [r["metrics"]["model_utility"] for r in runs if r["metrics"].get("forget_quality") is not None
                   and r["metrics"].get("model_utility") is not None]
            pad = max(0.02, 0.1 * (max(mus) - min(mus))) if mus else 0.05
            ax.set_xlim(max(0.0, min(mus, default=0) - pad), min(1.0, max(mus, default=1) + pad))
            ax.set_yscale("log")
            fqs = [r["metrics"]["forget_quality"] for r in runs if r["metrics"].get("forget_quality") is not None]
            ax.set_ylim(min([1e-3] + [max(f, 1e-300) / 5 for f in fqs]), 2.0)
            ax.axhline(0.05, ls="--", color="gray", lw=0.8, label="p = 0.05")
            ax.legend(fontsize=8, loc="lower right")
            ax.set_xlabel("model utility (higher is better)")
            ax.set_ylabel("forget quality, KS p-value (log; higher is better)")
            ax.set_title("TOFU: forget quality vs model utility")
            ax.grid(alpha=0.3, which="both")
        else:
            keys = [k for k in BARS[suite] if any(isinstance(r["metrics"].get(k), (int, float)) for r in runs)]
            width = 0.8 / max(1, len(runs))
            for i, r in enumerate(runs):
                vals = [r["metrics"].get(k) for k in keys]
                vals = [v if isinstance(v, (int, float)) and math.isfinite(v) else 0.0 for v in vals]
                ax.bar([j + i * width for j in range(len(keys))], vals, width, label=r["name"],
                       color=colors[i % len(colors)])
            ax.set_xticks([j + width * (len(runs) - 1) / 2 for j in range(len(keys))])
            ax.set_xticklabels([BARS[suite][k] for k in keys], rotation=45, ha="right", fontsize=8)
            ax.set_ylim(0, 1.05)
            ax.set_title(f"{suite.upper()} metrics per run")
            ax.legend(fontsize=8)
            ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    md = out_png.with_suffix(".md")
    md.write_text(f"![report]({out_png.name})\n\n" + markdown_table(summaries))
    return out_png, md


def main(argv=None):
    p = argparse.ArgumentParser(description="PNG + markdown comparison of evaluation runs")
    p.add_argument("runs", nargs="+", help="summary.json files or folders holding one")
    p.add_argument("--out", required=True, help="PNG path; the markdown table is written beside it (.md)")
    p.add_argument("--labels", help="comma list of run names (default: each summary's name)")
    args = p.parse_args(argv)
    summaries = [load_summary(r) for r in args.runs]
    if args.labels:
        labels = args.labels.split(",")
        if len(labels) != len(summaries):
            p.error(f"--labels has {len(labels)} names for {len(summaries)} runs")
        for s, name in zip(summaries, labels):
            s["name"] = name
    png, md = render(summaries, args.out)
    print(f"wrote {png} and {md}")
    return png, md


if __name__ == "__main__":
    main()
