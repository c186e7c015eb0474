"""The efficacy protocol of issue 25 (BENCHMARKS.md, "Does PALU beat the baselines? The efficacy protocol (issue
25)", pre-registered), run by the TOFU runner for a preset with a ``protocol`` section (``presets/efficacy.yaml``)::

    python -m benchmarks.tofu --preset efficacy --out runs/efficacy

Parts (each stage cached by :class:`palu_ds.stages.Stages`: an interrupted protocol resumes where it stopped):

1. data (``OUT/data``: the target's rows = retain authors + every protocol author, the retain model's = the retain
   authors; ``OUT/<pair>/data`` for ``dev``, ``A``, ``B``: the pair's rows under the forget split's names, TOFU's
   perturbed answers, PALU's labels, 20 utility rows a part for ``dev``, every row for the reported pairs); the target
   and retain SFT (:func:`.pipeline.stage_models`) and their checks; the retain / target / base evaluations per pair;
2. the grid on ``dev``: every method of the preset x ``protocol.lrs``, one run each of the preset's ``unlearn``
   schedule, evaluated inside the run after ``protocol.epochs`` (``OUT/dev/unlearn/<method>_lr<lr>/eval/step_N``);
3. :func:`.rules.select_point` per method;
4. each reported pair: every method at its selected lr, the same schedule, evaluated inside the run after its selected
   epoch only (and its model written then, :mod:`.train_snapshot`, for the NLL by position kind);
5. seed reruns of PALU's and the best baseline's selected points (:func:`.rules.best_baseline`) on each pair;
6. bootstrap intervals (:mod:`palu_eval.bootstrap`) and :func:`.rules.decide` per baseline;
7. ``OUT/<report>.json`` / ``.md`` / ``.png`` (:mod:`.protocol_report`).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

from palu_ds.atomic import write_json
from palu_ds.data.io import load_records, read_json_records

from . import data as D
from .data import ROWS_PER_AUTHOR
from .pipeline import Run, read_json, sft_summary, stage_evaluate, stage_position_nll, write_report
from .preset import repo_path
from .report import minutes_by_part
from .specs import run_specs

SNAPSHOT_SCRIPT = "benchmarks/tofu/train_snapshot.py"


# ------------------------------------------------------------------------------------------------ the plan
def protocol_authors(cfg: dict) -> list[int]:
    """Every author the target learns beyond the retain authors: the development authors and both pairs."""
    return sorted({a for authors in [cfg["dev"], *cfg["pairs"].values()] for a in authors})


def check_protocol(preset: dict) -> None:
    """The protocol section is complete and consistent (an error naming the key otherwise)."""
    cfg, where = preset["protocol"], f"preset {preset.get('name', '?')}"
    for key in ("pairs", "method", "lrs", "epochs", "labels_first_author"):
        if not cfg[key]:
            raise ValueError(f"{where}: protocol.{key} is not set (see presets/efficacy.yaml)")
    if not preset["spans"]["labels"]:
        raise ValueError(f"{where}: the protocol reads PALU's labels: set spans.labels")
    if "dev" in cfg["pairs"]:
        raise ValueError(f"{where}: protocol.pairs may not be named dev (the development authors' folder)")
    authors = [a for g in [cfg["dev"], *cfg["pairs"].values()] for a in g]
    if len(authors) != len(set(authors)):
        raise ValueError(f"{where}: protocol.dev and protocol.pairs share authors: {authors}")
    methods = run_specs(preset, 1)
    if cfg["method"] not in methods:
        raise ValueError(f"{where}: protocol.method {cfg['method']!r} is not among the methods {sorted(methods)}")
    chk = cfg["fp32_check"]
    if chk and (not isinstance(chk, dict) or set(chk) != {"method", "lr"} or chk["method"] not in methods):
        raise ValueError(f"{where}: protocol.fp32_check needs {{method, lr}} with a method of the list, got {chk!r}")
    if chk and preset["unlearn"].get("precision") != "bf16":
        raise ValueError(f"{where}: protocol.fp32_check reruns a bf16 point in fp32: set unlearn.precision: bf16")
    if max(cfg["epochs"]) > preset["unlearn"]["epochs"]:
        raise ValueError(f"{where}: protocol.epochs {cfg['epochs']} go past unlearn.epochs "
                         f"{preset['unlearn']['epochs']}")


def steps_per_epoch(preset: dict, rows: int) -> int:
    """Optimizer steps per epoch of a pair's forget rows (engine: batches per epoch // accumulation)."""
    per_step = preset["unlearn"]["batch_size"] * preset["ranks"] * preset["unlearn"].get("grad_accum", 1)
    return max(1, rows // per_step)


def epoch_step(epoch: float, spe: int) -> int:
    """The optimizer step after which the engine evaluates for ``eval.epochs`` entry ``epoch``
    (:meth:`palu_ds.config.EvalConfig.steps`)."""
    return max(1, round(float(epoch) * spe))


def eval_overrides(run: Run, pair_dir: Path, epochs: list) -> list[str]:
    """The run config's ``eval`` section of a protocol run: TOFU on the pair's folder after ``epochs``, forget
    quality against the retain model's evaluation of the same folder, in the preset's ``eval.dtype`` (a cast copy of
    the model being trained, scored as ``palu_eval/run.py --dtype`` scores the retain model; ``auto``: as trained)."""
    p = run.p
    dtype = [] if p["eval"]["dtype"] == "auto" else [f"eval.dtype={p['eval']['dtype']}"]
    return dtype + [f"eval.epochs=[{', '.join(str(e) for e in epochs)}]", "eval.suite=tofu",
            f"eval.split={run.info['forget_split']}", f"eval.data={pair_dir / 'data'}",
            f"eval.splits=[{', '.join(p['eval']['parts'])}]", f"eval.max_new_tokens={run.max_new}",
            f"eval.max_length={p['max_length']}", f"eval.retain_results={pair_dir / 'eval' / 'retain'}"]


def grid_plan(preset: dict) -> list[dict]:
    """The grid's runs: ``[{"name", "method", "lr"}]``, every method of the preset x ``protocol.lrs``."""
    return [{"name": f"{m}_lr{lr:g}", "method": m, "lr": float(lr)}
            for m in run_specs(preset, 1) for lr in preset["protocol"]["lrs"]]


def report_plan(selection: dict, cfg: dict, best: dict | None = None) -> list[dict]:
    """The reported runs: ``[{"pair", "name", "method", "lr", "epoch", "seed"}]``, every method at its selected
    point on every pair; with ``best`` (``{pair: baseline}``) the seed reruns of ``protocol.method`` and the best
    baseline instead."""
    out = []
    for pair in cfg["pairs"]:
        names = [cfg["method"], best[pair]] if best else list(selection)
        for m in names:
            pt = selection[m]["point"]
            seed = cfg["seed_rerun"] if best else None
            out.append({"pair": pair, "name": f"{m}_seed{seed}" if best else m, "method": m, "lr": pt["lr"],
                        "epoch": pt["epoch"], "seed": seed})
    return out


# ------------------------------------------------------------------------------------------------ the data
def label_rows(labels: list[dict], full: list[dict], authors, first_author: int, source: str) -> list[dict]:
    """The rows of PALU's labelled file (its first author ``first_author``, 20 rows an author in TOFU order) for
    ``authors``, checked against TOFU's ``full`` rows (same question and answer, else an error naming the row)."""
    out = []
    for a in authors:
        for k in range(ROWS_PER_AUTHOR):
            i, j = ROWS_PER_AUTHOR * (a - first_author) + k, ROWS_PER_AUTHOR * a + k
            if not 0 <= i < len(labels):
                raise ValueError(f"{source}: author {a} needs labelled row {i}, the file has {len(labels)} rows "
                                 f"(its first author is protocol.labels_first_author = {first_author})")
            r = labels[i]
            if (r.get("question"), r.get("answer")) != (full[j]["question"], full[j]["answer"]):
                raise ValueError(f"{source}: row {i} is not TOFU's row {j} (author {a}): check "
                                 "protocol.labels_first_author or the labels file")
            out.append({"question": r["question"], "answer": r["answer"], "target_words": r["target_words"],
                        "common_words": list(r.get("common_words") or [])})
    return out


def build_pair(tofu: Path, main: dict, authors, utility_rows: int | None, perturbed: str, labels_path: Path,
               first_author: int) -> dict:
    """One author pair of the efficacy protocol, laid out as a reported run's data (read by the evaluation and the
    unlearning runs unchanged): its rows and TOFU's ``perturbed`` answers under the forget split's names, PALU's labels
    for them (``labels.jsonl``), the retain set and refusals of ``main``, and the utility rows spread evenly
    (``utility_rows`` per part; None: every row of ``main``, which :func:`build_tofu` built with every row)."""
    split = main["info"]["forget_split"]
    full = read_json_records(tofu / "full.jsonl")
    D.need(tofu, [perturbed])
    pair = D.forget_files(full, D.author_ids(authors), split, [tofu / f"{perturbed}.jsonl"],
                        f"authors {list(authors)} (protocol.perturbed names the file)")
    labels = label_rows(load_records(str(labels_path)), full, authors, first_author, str(labels_path))
    util = {k: D.evenly(v, utility_rows) for k, v in main["files"].items()
            if k.endswith("_perturbed") and k != f"{split}_perturbed"}
    return D.with_rows({**pair, "labels": labels, "retain": main["files"][main["info"]["retain_split"]],
                      "idontknow": main["files"]["idontknow"], **util}, {**main["info"], "authors": list(authors)})


# ------------------------------------------------------------------------------------------------ the stages
def stage_pairs(run: Run, tofu: Path, main: dict) -> dict[str, dict]:
    """``OUT/<pair>/data`` for ``dev`` and each reported pair (:func:`build_pair`); ``{pair: {"dir", "rows",
    "authors", "labels"}}``."""
    cfg = run.p["protocol"]
    labels = repo_path(run.p["spans"]["labels"])
    out = {}
    for name, authors in {"dev": cfg["dev"], **cfg["pairs"]}.items():
        rows = cfg["dev_utility_rows"] if name == "dev" else None
        d = build_pair(tofu, main, authors, rows, cfg["perturbed"], labels, cfg["labels_first_author"])
        D.write_jsonl(run.out / name / "data", d["files"])
        out[name] = {"dir": run.out / name, "rows": len(d["files"][main["info"]["forget_split"]]),
                     "authors": list(authors), "labels": run.out / name / "data" / "labels.jsonl",
                     "utility_rows": {k: v for k, v in d["info"]["rows"].items() if k.endswith("_perturbed")}}
    return out


def stage_reference_evals(run: Run, pairs: dict, models: dict, base: Path) -> dict | None:
    """The retain model (first: every forget quality needs it), the target and (``eval.base``) the base on every
    pair's folder: ``{pair: {model: metrics}}``; None when one failed."""
    evals = {"retain": models["retain"], "target": models["target"],
             **({"base": base} if run.p["eval"]["base"] else {})}
    out = {pair: {} for pair in pairs}
    ok = all(stage_evaluate(run, name, model, out[pair], pair) for pair in pairs for name, model in evals.items())
    return out if ok else None


def point(metrics: dict, target_mu: float, **labels) -> dict:
    """A grid or reported point from an evaluation's metrics: KS D, forget quality, utility and relative utility."""
    mu = metrics.get("model_utility")
    return {**labels, "ks": metrics.get("ks_statistic"), "fq": metrics.get("forget_quality"), "mu": mu,
            "mu_rel": mu / target_mu if mu is not None and target_mu else None}


def evaluated_run(run: Run, stage: str, spec: dict, target: Path, where: dict, name: str, lr: float, epochs: list,
                  failed: str, extra=(), **script) -> dict | None:
    """``spec`` at ``lr`` on the pair folder ``where`` (its data and labels) into ``<pair>/unlearn/<name>``,
    evaluated inside the run after ``epochs`` (``extra``: more overrides; ``script``: another train script):
    ``{epoch: (step, metrics)}``; None, named in ``run.failed[failed]``, when it failed.  Its final model is not
    used: removed unless --keep-checkpoints."""
    from palu_ds.checkpoint import tag_for

    run_dir, spe = where["dir"] / "unlearn" / name, steps_per_epoch(run.p, where["rows"])
    steps = {e: epoch_step(e, spe) for e in epochs}
    summary = {e: run_dir / "eval" / tag_for(s) / "summary.json" for e, s in steps.items()}
    ok = run.unlearn(stage, spec, target, where["dir"] / "data", run_dir, lr, labels=where["labels"],
                     extra=eval_overrides(run, where["dir"], epochs) + list(extra), done=summary[max(epochs)], **script)
    run.drop(run_dir / "model")
    if not ok:
        run.failed[failed] = f"training or its evaluation failed (see logs/{stage}.log)"
        return None
    return {e: (steps[e], read_json(summary[e])["metrics"]) for e in epochs}


def stage_grid(run: Run, specs: dict, models: dict, dev: dict, target_mu: float) -> dict[str, list[dict]]:
    """Every grid run on the development authors, evaluated in the run after ``protocol.epochs``: ``{method:
    [point]}`` (a failed run is named in ``run.failed`` and gives no points)."""
    if not target_mu:
        raise ValueError(f"the target's utility on the development rows is {target_mu} ({dev['dir'] / 'eval'}"
                         "/target): relative utility is undefined; check the SFT and the utility rows")
    points: dict[str, list[dict]] = {m: [] for m in specs}
    for g in grid_plan(run.p):
        res = evaluated_run(run, f"grid_{g['name']}", specs[g["method"]], models["target"], dev, g["name"], g["lr"],
                            run.p["protocol"]["epochs"], f"grid {g['name']}")
        points[g["method"]] += [point(m, target_mu, method=g["method"], lr=g["lr"], epoch=e, step=s, run=g["name"])
                                for e, (s, m) in (res or {}).items()]
    return points


def stage_fp32_check(run: Run, specs: dict, models: dict, dev: dict, target_mu: float, grid: dict) -> dict | None:
    """``protocol.fp32_check`` (``{method, lr}``, for a protocol trained in bf16, ``unlearn.precision: bf16``): that
    grid point's run again with ``train.precision=fp32`` from the same target, evaluated after its last epoch:
    ``{"grid": point, "fp32": point}``."""
    chk = run.p["protocol"]["fp32_check"]
    if not chk:
        return None
    epoch, name = max(run.p["protocol"]["epochs"]), f"{chk['method']}_lr{chk['lr']:g}_fp32"
    fp32 = copy.copy(run)  # the same stages, the unlearning in fp32
    fp32.p = {**run.p, "unlearn": {**run.p["unlearn"], "precision": "fp32"}}
    res = evaluated_run(fp32, f"grid_{name}", specs[chk["method"]], models["target"], dev, name, float(chk["lr"]),
                        [epoch], f"fp32 check {name}")
    if res is None:
        return None
    step, m = res[epoch]
    same = [p for p in grid.get(chk["method"], []) if p["lr"] == float(chk["lr"]) and p["epoch"] == epoch]
    return {"grid": same[0] if same else None, "fp32": point(m, target_mu, method=chk["method"], lr=float(chk["lr"]),
                                                                 epoch=epoch, step=step, run=name),
            "precision": "fp32"}


def stage_reported(run: Run, specs: dict, models: dict, pairs: dict, plan: list[dict]) -> dict[str, dict]:
    """The reported runs of ``plan`` (:func:`report_plan`), each evaluated in the run after its selected epoch on
    every utility row and its model written then: ``{"<pair>/<name>": {..., "metrics", "results", "snapshot"}}``."""
    from palu_ds.checkpoint import tag_for

    out = {}
    for r in plan:
        p = pairs[r["pair"]]
        step = epoch_step(r["epoch"], steps_per_epoch(run.p, p["rows"]))
        extra = ["--snapshot-steps", str(step)] + ([f"train.seed={r['seed']}"] if r["seed"] is not None else [])
        res = evaluated_run(run, f"report_{r['pair']}_{r['name']}", specs[r["method"]], models["target"], p,
                            r["name"], r["lr"], [r["epoch"]], f"{r['pair']} {r['name']}", extra, script=SNAPSHOT_SCRIPT)
        if res is not None:
            run_dir = p["dir"] / "unlearn" / r["name"]
            out[f"{r['pair']}/{r['name']}"] = {**r, "step": step, "metrics": res[r["epoch"]][1],
                                               "results": str(run_dir / "eval" / tag_for(step) / "results.json"),
                                               "snapshot": str(run_dir / "snapshots" / tag_for(step))}
    return out


# ------------------------------------------------------------------------------------------------ the analysis
def truth_ratios(results: str | Path) -> tuple[dict, list[float]]:
    """A results.json's per-example records and its forget truth ratios (one per forget row, in row order)."""
    ex = read_json(Path(results))["examples"]
    return ex, [r["truth_ratio"] for r in ex["forget"]]


def pair_numbers(pair_dir: Path, runs: dict[str, dict], n_boot: int) -> tuple[dict, dict]:
    """Every reported run of one pair (and the retain model) with a bootstrap interval of its KS D (a paired bootstrap
    of its truth ratios and the retain model's: D_model - D_retain, D_retain = 0) and of its utility and relative
    utility (:func:`palu_eval.bootstrap.utility_interval`, the target on the same rows): ``({name: numbers},
    {name: forget truth ratios, "retain": ...})``."""
    from palu_eval.bootstrap import paired_ks_difference, utility_interval

    target, _ = truth_ratios(pair_dir / "eval" / "target" / "results.json")
    retain, tr_r = truth_ratios(pair_dir / "eval" / "retain" / "results.json")
    target_mu = read_json(pair_dir / "eval" / "target" / "summary.json")["metrics"]["model_utility"]
    nums, trs = {}, {"retain": tr_r}
    for name, r in runs.items():
        ex, trs[name] = truth_ratios(r["results"])
        d = paired_ks_difference(trs[name], tr_r, tr_r, n_boot=n_boot)
        nums[name] = {**point(r["metrics"], target_mu, method=r["method"], lr=r["lr"], epoch=r["epoch"],
                              seed=r["seed"]), "ks_interval": [d["low"], d["high"]],
                      "utility_interval": utility_interval(ex, target, n_boot=n_boot)}
    nums["retain"] = {"ks": 0.0, "utility_interval": utility_interval(retain, target, n_boot=n_boot)}
    nums["retain"]["mu_rel"] = nums["retain"]["utility_interval"]["ratio"]
    return nums, trs


def verdicts(numbers: dict, trs: dict, selection: dict, best: dict, cfg: dict) -> dict:
    """The decision rule (:func:`.rules.decide`) for each baseline: D_B - D_PALU with a paired bootstrap over the
    forget rows (PALU's, B's and the retain model's truth ratios resampled together), the seed-rerun difference
    (PALU's seed-1 run in place of its seed-0 run; for the pair's best baseline its seed-1 run too)."""
    from palu_eval.bootstrap import paired_ks_difference

    from .rules import decide

    palu, seed = cfg["method"], cfg["seed_rerun"]
    out = {}
    for b in [m for m in selection if m != palu]:
        per = {}
        for pair in cfg["pairs"]:
            n, tr = numbers[pair], trs[pair]
            if palu not in n or b not in n:
                break
            p1, b1 = n.get(f"{palu}_seed{seed}"), n.get(f"{b}_seed{seed}") if best.get(pair) == b else n[b]
            per[pair] = {"palu": {"mu_rel": n[palu]["mu_rel"], "keeps_no_point": selection[palu]["keeps_no_point"]},
                         "baseline": {"mu_rel": n[b]["mu_rel"], "keeps_no_point": selection[b]["keeps_no_point"]},
                         "diff": paired_ks_difference(tr[b], tr[palu], tr["retain"], n_boot=cfg["n_boot"]),
                         "seed_diff": b1["ks"] - p1["ks"] if p1 and b1 else None}
        out[b] = ({**decide(per, cfg["utility_floor"]), "inputs": per} if len(per) == len(cfg["pairs"])
                  else {"verdict": "not run", "inputs": per})
    return out


def protocol_position_nll(run: Run, pairs: dict, models: dict, base: Path, reported: dict) -> dict:
    """Answer NLL by position kind on each reported pair's labelled rows: base, retain, target and every method's
    selected point (its snapshot); cached in ``OUT/<pair>/position_nll.json`` while the models are unchanged."""
    out = {}
    for pair in run.p["protocol"]["pairs"]:
        ms = {"base": base, "retain": models["retain"], "target": models["target"],
              **{r["name"]: Path(r["snapshot"]) for r in reported.values() if r["pair"] == pair and r["seed"] is None}}
        key = {n: [str(m), (m / "model.safetensors").stat().st_mtime_ns] for n, m in ms.items()
               if (m / "model.safetensors").exists()}
        cache, secs = pairs[pair]["dir"] / "position_nll.json", run.stages.seconds
        if cache.exists() and read_json(cache).get("key") == key:
            out[pair] = read_json(cache)["nll"]
            secs["position NLL"] = secs.get("position NLL", 0) + read_json(cache).get("seconds", 0)
            continue
        before = secs.get("position NLL", 0)
        out[pair] = stage_position_nll(run, {n: ms[n] for n in key}, base, labels=pairs[pair]["labels"])
        write_json(cache, {"key": key, "nll": out[pair], "seconds": round(secs["position NLL"] - before, 1)})
    return out


def cost_by_part(stage_seconds: dict[str, float]) -> dict[str, float]:
    """:func:`.report.minutes_by_part` of the protocol: ``{"SFT", "reference evaluations", "references
    (precompute)", "grid", "report", "seed reruns", "position NLL", "total"}``.  Example: ``{"sft_target": 300,
    "grid_palu_lr1e-05": 660, "report_A_npo_seed1": 600}`` -> ``{"SFT": 5.0, "grid": 11.0, "seed reruns": 10.0,
    "total": 26.0}``."""
    def part(stage: str) -> str:
        head = stage.split("_", 1)[0]
        if head == "report":
            return "seed reruns" if "_seed" in stage else "report"
        return {"sft": "SFT", "eval": "reference evaluations", "precompute": "references (precompute)",
                "grid": "grid"}.get(head, stage)
    return minutes_by_part(stage_seconds, part)


# ------------------------------------------------------------------------------------------------ the run
def sft_checks(models: dict[str, Path]) -> dict:
    """Answer NLL of both SFT models on what they learned (memorized below 0.1, else a warning, printed)."""
    out = {}
    for n, m in models.items():
        out[n] = {**sft_summary(m), "memorized": None}
        out[n]["memorized"] = out[n]["last_nll"] < 0.1
        if not out[n]["memorized"]:
            print(f"[efficacy] WARNING: the {n} model's answer NLL is {out[n]['last_nll']:.3f} >= 0.1: not fully "
                  "memorized", file=sys.stderr, flush=True)
    return out


def protocol_data(preset: dict) -> dict:
    """The protocol checked (:func:`check_protocol`); the target's data: TOFU's split, the retain authors and every
    protocol author (:func:`protocol_authors`) outside the split."""
    check_protocol(preset)
    tofu, d = repo_path(preset["data"]["tofu"]), preset["data"]
    main = D.build_tofu(tofu, d["split"], d["retain_authors"], d["utility_rows"])
    extra = [a for a in protocol_authors(preset["protocol"]) if a not in main["info"]["forget_authors"]]
    return D.build_tofu(tofu, d["split"], d["retain_authors"], d["utility_rows"], extra)


def run_protocol(run: Run, main: dict) -> int:
    """Every part of the protocol after :func:`.pipeline.setup` (module doc); 0 when every run succeeded, 3 when one
    failed, 1 when it cannot go on (a reference evaluation failed)."""
    base, specs, models = run.base, run.specs, run.models
    pairs = stage_pairs(run, repo_path(run.p["data"]["tofu"]), main)
    refs = stage_reference_evals(run, pairs, models, base)
    if refs is None:
        return 1
    report = run_parts(run, specs, models, base, pairs, refs)
    report.update({"sft": sft_checks(models), "references": refs, "cost_minutes": cost_by_part(run.stages.seconds),
                   "pairs": {n: {k: str(v) if isinstance(v, Path) else v for k, v in p.items()}
                             for n, p in pairs.items()}})
    from .protocol_report import render_markdown, render_png

    return write_report(run, report, render_markdown, render_png)


def run_parts(run: Run, specs: dict, models: dict, base: Path, pairs: dict, refs: dict) -> dict:
    """The grid, the selection, the reported runs, the seed reruns, the intervals, the decision and the NLL by
    position kind: the report's numbers (what exists so far when a stage failed)."""
    from .rules import best_baseline, goal, select_point

    cfg = run.p["protocol"]
    grid = stage_grid(run, specs, models, pairs["dev"], refs["dev"]["target"]["model_utility"])
    selection = {m: select_point(pts, cfg["utility_floor"]) for m, pts in grid.items() if pts}
    out = {"grid": grid, "selection": selection,
           "fp32_check": stage_fp32_check(run, specs, models, pairs["dev"], refs["dev"]["target"]["model_utility"],
                                          grid)}
    if cfg["method"] not in selection or len(selection) < 2:
        run.failed["selection"] = f"the grid left {sorted(selection)}: no comparison with {cfg['method']}"
        return out
    reported = stage_reported(run, specs, models, pairs, report_plan(selection, cfg))
    first = {pair: {r["method"]: point(r["metrics"], refs[pair]["target"]["model_utility"])
                    for r in reported.values() if r["pair"] == pair} for pair in cfg["pairs"]}
    baselines = [m for m in selection if m != cfg["method"]]
    best = {pair: best_baseline(first[pair], baselines, cfg["utility_floor"]) for pair in cfg["pairs"]
            if any(b in first[pair] for b in baselines)}
    if len(best) == len(cfg["pairs"]) and all(cfg["method"] in first[p] for p in cfg["pairs"]):
        reported.update(stage_reported(run, specs, models, pairs, report_plan(selection, cfg, best)))
    numbers, trs = {}, {}
    for pair in cfg["pairs"]:
        runs = {r["name"]: r for r in reported.values() if r["pair"] == pair}
        numbers[pair], trs[pair] = pair_numbers(pairs[pair]["dir"], runs, cfg["n_boot"])
    v = verdicts(numbers, trs, selection, best, cfg)
    palu = {pair: numbers[pair].get(cfg["method"], {"fq": None, "mu_rel": None}) for pair in cfg["pairs"]}
    pos = protocol_position_nll(run, pairs, models, base, reported) if run.p["eval"]["position_nll"] else {}
    return {**out, "reported": reported, "best_baseline": best, "numbers": numbers, "verdicts": v,
            "goal": goal(v, palu, cfg["fq_goal"], cfg["utility_floor"]), "position_nll": pos}
