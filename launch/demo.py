"""``make demo``: a real pretrained model forgets real facts, end to end on CPU through the real CLIs (DeepSpeed,
2 ranks), each stage timed:

  fetch SmolLM2-135M-Instruct (palu-ds fetch-model, cached) -> ask it every question of launch/data/real_facts (who
  wrote which book; general facts) and keep those it answers correctly -> precompute the reference (2 ranks) ->
  PALU unlearning of who wrote the Shakespeare / Dickens / Orwell books while keeping the retain set (2 ranks) ->
  ask again -> report.md with each answer before and after: forget, retain (trained on) and holdout (other authors
  and facts the unlearning never saw) side by side.  Each stage's output is also kept in ``OUT/logs/<stage>.log``
  (the benchmarks' stage runner, ``palu_ds.stages``).

    python launch/demo.py --out runs/demo          # the real model (make demo)
    python launch/demo.py --tiny --out runs/demo   # the fast synthetic pipeline: generated TOFU-style data, a tiny
                                                   # Llama trained from scratch, PALU, TOFU evaluation (tests use it)
    python launch/demo.py --select --out runs/demo_select  # how the real demo's settings were chosen: a small grid
                                                   # scored on development questions (launch/data/real_facts/dev.jsonl)
                                                   # that the report never shows, by the rule in BENCHMARKS.md
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from palu_ds.atomic import write_json, write_jsonl, write_text
from palu_ds.config import ConfigError, load_config, read_yaml
from palu_ds.localrun import launcher_cmd
from palu_ds.process import refusing
from palu_ds.stages import Stages
from palu_eval.facts import names_key

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class StageFailed(Exception):
    pass


def pipeline(out: str) -> Stages:
    """The benchmarks' stage runner, every stage run (nothing reused), its output on the console and in
    ``OUT/logs``."""
    return Stages(out, fresh=True, tag="demo", echo=True, cwd=ROOT)


def run(stages: Stages, stage: str, cmd: list[str], done=None) -> None:
    if not stages.run(stage, cmd, done=done):
        raise StageFailed(f"{stage} failed: see {stages.logs}")


def deepspeed(script: str, ds: str, config: str, overrides: list[str], port: int) -> list[str]:
    return launcher_cmd(script, ["--deepspeed", ds, "--config", config, *overrides], 2, port)


def summary(out: str, name: str) -> dict:
    with open(os.path.join(out, name, "summary.json")) as f:
        return json.load(f)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, (int, float)) else str(v)


def tiny_demo(args) -> int:
    """The synthetic pipeline: generated data -> tokenizer + tiny Llama -> fine-tune the target and retain models
    (2 ranks) -> precompute the reference -> PALU (2 ranks) -> TOFU evaluation -> report."""
    out = args.out
    stages = pipeline(out)
    run(stages, "generate data, tokenizer, base model", [sys.executable, "-m", "palu_ds.cli", "make-default", out])
    base = [f"model.path={out}/base", f"data.forget.source={out}/data"]
    for name, split in (("target", "full"), ("retain", "retain90")):
        run(stages, f"fine-tune {name} model (2 ranks)", deepspeed(
            "launch/finetune.py", args.ds, "launch/configs/finetune.yaml",
            base + [f"data.forget.config={split}", f"train.output_dir={out}/{name}", "train.resume=never"],
            args.port))
    s = summary(out, "target")
    print(f"\ntarget fine-tune: answer NLL {s['first']['loss/forget']:.3f} -> {s['last']['loss/forget']:.3f} "
          f"over {s['steps']} steps")
    if not s["last"]["loss/forget"] < s["first"]["loss/forget"]:
        print("error: the fine-tune did not lower the loss", file=sys.stderr)
        return 1
    unlearn = [f"model.path={out}/target/model", f"data.forget.source={out}/data", f"data.retain.source={out}/data",
               f"train.output_dir={out}/palu", "train.resume=never"]
    # a cache left in this folder by an earlier run (another demo, a benchmark with other settings) may not match
    # this target and would be refused as a mismatch: the demo rebuilds it (a few seconds) instead
    shutil.rmtree(os.path.join(out, "palu", "reference_cache"), ignore_errors=True)
    run(stages, "precompute reference (2 ranks)", deepspeed("launch/precompute.py", args.ds,
                                                             "launch/configs/demo.yaml", unlearn, args.port))
    run(stages, "PALU unlearning (2 ranks)", deepspeed("launch/train.py", args.ds, "launch/configs/demo.yaml",
                                                        unlearn, args.port))
    evals = {}
    for name, model in (("retain", f"{out}/retain/model"), ("target", f"{out}/target/model"),
                        ("palu", f"{out}/palu/model")):
        extra = ["--no-forget-quality"] if name == "retain" else ["--retain-results", f"{out}/eval/retain"]
        run(stages, f"evaluate {name}", [sys.executable, "palu_eval/run.py", "--model", model, "--suite", "tofu",
                                         "--split", "forget10", "--data", f"{out}/data", "--splits", "forget,retain",
                                         "--max-new-tokens", "48", "--out", f"{out}/eval/{name}", "--name", name,
                                         *extra])
        with open(os.path.join(out, "eval", name, "summary.json")) as f:
            evals[name] = json.load(f)["metrics"]
    run(stages, "report", [sys.executable, "palu_eval/report.py", f"{out}/eval/target", f"{out}/eval/palu",
                           "--out", f"{out}/eval/report.png"])
    keys = ("forget_quality", "forget/truth_ratio", "forget/rougeL_recall", "forget/prob", "retain/prob", "model_utility")
    print("\n| model | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for name in ("target", "palu"):
        print(f"| {name} | " + " | ".join(_fmt(evals[name].get(k)) for k in keys) + " |")
    print(json.dumps({"stage_seconds": stages.seconds, "unlearned_model": f"{out}/palu/model",
                      "tensorboard": f"{out}/palu/tensorboard", "results": f"{out}/eval",
                      "report": f"{out}/eval/report.png"}, indent=1))
    return 0


REAL_DATA = os.path.join(ROOT, "launch", "data", "real_facts")
SIDES = ("forget", "retain", "holdout")  # holdout: never trained on (does it keep what it was not shown?)
DEV = "dev"  # development questions: asked only by --select (choosing the settings), never in the report


def real_rows(name: str) -> list[dict]:
    """The rows of ``REAL_DATA/<name>.jsonl``, as written there."""
    with open(os.path.join(REAL_DATA, f"{name}.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def known_rows(results: dict, name: str) -> list[dict]:
    """The rows of ``name`` the model answered correctly (the training records, as written in REAL_DATA)."""
    rows = real_rows(name)
    return [rows[rec["index"]] for rec in results[name]["records"] if rec["correct"]]


def paired(before: dict, after: dict, kept: dict, name: str) -> list[tuple[dict, dict]]:
    """(before, after) records of the kept questions of one side."""
    want = {r["question"] for r in kept[name]}
    now = {r["question"]: r for r in after[name]["records"]}
    return [(r, now[r["question"]]) for r in before[name]["records"] if r["question"] in want]


def scores(pairs: list[tuple[dict, dict]]) -> dict:
    n = max(1, len(pairs))
    return {f"{what}_{when}": sum(p[k][what] for p in pairs) / n
            for what in ("correct", "prob") for k, when in ((0, "before"), (1, "after"))}


def report(before: dict, after: dict, kept: dict) -> tuple[str, dict]:
    """Markdown: per kept question the answer before and after unlearning, forget and retain side by side; and the
    per-side scores (fraction that states the fact, mean probability of the reference answer)."""
    lines, all_scores = [], {}
    for name in SIDES:
        pairs = paired(before, after, kept, name)
        s = all_scores[name] = scores(pairs)
        lines += [f"\n## {name}: {len(pairs)} questions the base model answered correctly", "",
                  f"states the fact: {s['correct_before']:.0%} before -> {s['correct_after']:.0%} after; "
                  f"probability of the reference answer: {s['prob_before']:.3g} -> {s['prob_after']:.3g}", "",
                  "| question | fact | before | after |", "|---|---|---|---|"]
        for b, a in pairs:
            cell = [("ok: " if r["correct"] else "GONE: ") + r["generated"].replace("|", "/").replace("\n", " ")[:90]
                    for r in (b, a)]
            lines.append(f"| {b['question']} | {b['key']} | {cell[0]} | {cell[1]} |")
    return "\n".join(lines) + "\n", all_scores


REAL_CONFIG = "launch/configs/real_facts.yaml"
TRAINED = ("forget", "retain")  # the training sets (the rows of each the base model knows)
# A file of REAL_DATA whose every row joins the retain training set, known to the base model or not (true facts
# taught as given: authors.jsonl, "who wrote / painted / composed X" of authors in no other file); None: the known
# retain rows alone. A grid run may set it (EXTRA_RETAIN_KEY); make demo's is chosen by --select (round 3 kept None).
EXTRA_RETAIN = None
EXTRA_RETAIN_KEY = "extra_retain"
# How those rows are answered: "given" (the file's true answers, taught: round 3) or "base" (the base model's own
# greedy answers, so that the retain term holds what the model already says there instead of teaching it: round 4).
# A grid run may set it (EXTRA_ANSWERS_KEY, with EXTRA_RETAIN_KEY); make demo's is chosen by --select.
EXTRA_ANSWERS = "given"
EXTRA_ANSWERS_KEY = "extra_answers"
ANSWER_KINDS = ("given", "base")
GRID_ONLY = (EXTRA_RETAIN_KEY, EXTRA_ANSWERS_KEY)  # a grid run's settings that are not config keys


def fetch_base(stages: Stages) -> str:
    """The base model's folder (palu-ds fetch-model smollm2, cached after the first run), timed as a stage."""
    t = time.time()
    print("\n=== fetch SmolLM2-135M-Instruct (palu-ds fetch-model smollm2; cached after the first run)", flush=True)
    fetched = subprocess.run([sys.executable, "-m", "palu_ds.cli", "fetch-model", "smollm2"], cwd=ROOT, check=True,
                             stdout=subprocess.PIPE, text=True)
    stages.seconds["fetch model"] = round(time.time() - t, 1)
    return fetched.stdout.strip().splitlines()[-1]


def ask(stages: Stages, args, out: str, stage: str, model: str, name: str, sides) -> dict:
    """``model``'s answers to the questions of ``sides`` (2 ranks), kept in ``OUT/facts/<name>.json`` (a stage that
    is reused when that file and its command are unchanged, unless the pipeline is fresh)."""
    path = f"{out}/facts/{name}.json"
    data = [os.path.join(REAL_DATA, f"{side}.jsonl") for side in sides]
    run(stages, stage, launcher_cmd("palu_eval/facts.py", ["--model", model, "--data", *data, "--out", path], 2,
                                    args.port), done=path)
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def training_data(before: dict, out: str, sides) -> dict | None:
    """The rows of ``sides`` the base model knows; the forget and retain ones written as the training sets in
    ``OUT/data``. None (with the error printed) when there is nothing to unlearn or nothing to keep."""
    kept = {name: known_rows(before, name) for name in sides}
    if not kept["forget"] or not kept["retain"]:
        print(f"error: the base model answered {len(kept['forget'])} forget and {len(kept['retain'])} retain "
              "questions correctly: nothing to unlearn or nothing to keep", file=sys.stderr)
        return None
    for name in TRAINED:
        write_jsonl(f"{out}/data/{name}.jsonl", kept[name])
    return kept


def base_answers(stages: Stages, args, out: str, sides) -> tuple[str, dict, dict] | None:
    """The base model's folder, its answers to the questions of ``sides`` and the rows of each it knows (the training
    sets written, :func:`training_data`); None when there is nothing to unlearn or nothing to keep."""
    base = fetch_base(stages)
    before = ask(stages, args, out, "ask the base model (2 ranks)", base, "before", sides)
    kept = training_data(before, out, sides)
    return None if kept is None else (base, before, kept)


def retain_file(out: str, kept: dict, extra: str | None, said: dict | None = None) -> str:
    """The retain training set of ``out``: the retain rows the base model knows (written by :func:`training_data`),
    plus, when ``extra`` is set, every row of ``REAL_DATA/<extra>.jsonl`` as given or, with ``said`` (the base model's
    answers to them, :func:`ask`), as the base model answered it (:func:`said_rows`); written here, beside them."""
    if extra is None:
        return f"{out}/data/retain.jsonl"
    rows = real_rows(extra) if said is None else said_rows(said, extra)
    path = f"{out}/data/retain+{extra}{'' if said is None else '.base'}.jsonl"
    write_jsonl(path, kept["retain"] + rows)
    return path


def said_rows(said: dict, extra: str) -> list[dict]:
    """The questions of ``REAL_DATA/<extra>.jsonl`` with the base model's greedy answers (``said``: its answers, as
    :func:`ask` returns them) as the training answers, true or not. An answer that names a fact of a scored file
    (a forget, retain, holdout or development key) or is empty is left out, so no scored fact is taught or unlearned
    by these rows."""
    keys = [r["key"] for name in (*SIDES, DEV) for r in real_rows(name)]
    return [{"question": r["question"], "answer": r["generated"]} for r in said[extra]["records"]
            if r["generated"] and not any(names_key(r["generated"], k) for k in keys)]


def retain_set(stages: Stages, args, out: str, base: str, kept: dict, extra: str | None, answers: str) -> str:
    """:func:`retain_file` for ``extra`` answered as ``answers`` (ANSWER_KINDS): "base" first asks the base model its
    questions (a stage, ``OUT/facts/before_<extra>.json``)."""
    said = None
    if extra is not None and answers == "base":
        said = ask(stages, args, out, f"ask the base model {extra}.jsonl (2 ranks)", base, f"before_{extra}", [extra])
    return retain_file(out, kept, extra, said)


def unlearn_overrides(base: str, out: str, run_dir: str, extra=(), retain: str | None = None) -> list[str]:
    """The config overrides of an unlearning run (or its precompute) on the training sets of ``out`` (``retain``: the
    retain set's file, :func:`retain_file`; default the known retain rows)."""
    return [f"model.path={base}", f"data.forget.source={out}/data/forget.jsonl",
            f"data.retain.source={retain or f'{out}/data/retain.jsonl'}", f"train.output_dir={run_dir}", *extra]


def real_demo(args) -> int:
    """SmolLM2-135M-Instruct forgets who wrote the Shakespeare / Dickens / Orwell books and keeps the rest."""
    out = os.path.abspath(args.out)
    stages = pipeline(out)
    start = base_answers(stages, args, out, SIDES)
    if start is None:
        return 1
    base, before, kept = start
    overrides = unlearn_overrides(base, out, f"{out}/palu", ["train.resume=never"],
                                  retain_set(stages, args, out, base, kept, EXTRA_RETAIN, EXTRA_ANSWERS))
    shutil.rmtree(os.path.join(out, "palu", "reference_cache"), ignore_errors=True)  # another run's cache
    run(stages, "precompute reference (2 ranks)", deepspeed("launch/precompute.py", args.ds, REAL_CONFIG, overrides,
                                                             args.port))
    run(stages, "PALU unlearning (2 ranks)", deepspeed("launch/train.py", args.ds, REAL_CONFIG, overrides, args.port))
    after = ask(stages, args, out, "ask the unlearned model (2 ranks)", f"{out}/palu/model", "after", SIDES)
    text, s = report(before, after, kept)
    with open(f"{out}/report.md", "w", encoding="utf-8") as f:
        f.write("# make demo: what SmolLM2-135M-Instruct states before and after PALU unlearning\n" + text)
    print(text)
    print(json.dumps({"stage_seconds": stages.seconds, "scores": s, "unlearned_model": f"{out}/palu/model",
                      "tensorboard": f"{out}/palu/tensorboard", "report": f"{out}/report.md"}, indent=1))
    return 0


# --select: the demo's settings chosen on the development questions (BENCHMARKS.md, "Choosing the demo's settings on
# development questions", written before any selection run). A grid file (launch/demo_grids/round*.yaml, one
# per round) lists its runs, each a set of config overrides on REAL_CONFIG, and the step counts each run is scored
# after (a later count extends the same run from its checkpoint: the lr schedule is constant). A run may also set
# GRID_ONLY keys: EXTRA_RETAIN_KEY (a file of REAL_DATA joining the retain training set) and EXTRA_ANSWERS_KEY (how
# its rows are answered), the settings that are not config keys.
GRID = "launch/demo_grids/round4.yaml"  # the latest round's grid (--grid)
KEEP = 0.9  # retain kept share a point needs to be eligible (and the goal's share for retain and holdout)
SELECTED = (*TRAINED, DEV)  # what --select asks: the holdout is never asked there


def load_grid(path: str) -> tuple[list[dict], list[int]]:
    """A grid file's ``runs`` (each a mapping of dotted config keys to numbers) and ``steps`` (increasing positive
    step counts). Every problem is a ConfigError naming the file and the run or key; every point (run x steps) must be
    a valid config on REAL_CONFIG, so a misspelled key fails here, before anything is trained."""
    raw = read_yaml(path)
    extra = sorted(set(raw) - {"runs", "steps"})
    if extra:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(extra)}; a grid file has only runs: and steps:")
    steps, runs = raw.get("steps"), raw.get("runs")
    if (not isinstance(steps, list) or not steps or any(type(s) is not int or s < 1 for s in steps)
            or steps != sorted(set(steps))):
        raise ConfigError(f"{path}: steps must be a list of increasing positive step counts, e.g. [5, 10]; got "
                          f"{steps!r}")
    if not isinstance(runs, list) or not runs:
        raise ConfigError(f"{path}: runs must be a non-empty list of config overrides, e.g. "
                          "[{train.lr: 5.0e-5, method.params.alpha: 3.0}]")
    for i, r in enumerate(runs):
        if not isinstance(r, dict) or not r:
            raise ConfigError(f"{path}: runs[{i}] must be a mapping of dotted config keys to values; got {r!r}")
        for k, v in r.items():
            if k == EXTRA_RETAIN_KEY:
                if v in (*SIDES, DEV) or not os.path.isfile(os.path.join(REAL_DATA, f"{v}.jsonl")):
                    raise ConfigError(f"{path}: runs[{i}].{k} = {v!r} must name a file of {REAL_DATA} (without "
                                      f".jsonl) other than {', '.join((*SIDES, DEV))}")
                continue
            if k == EXTRA_ANSWERS_KEY:
                if v not in ANSWER_KINDS or EXTRA_RETAIN_KEY not in r:
                    raise ConfigError(f"{path}: runs[{i}].{k} = {v!r} must be one of {', '.join(ANSWER_KINDS)}, in a "
                                      f"run that sets {EXTRA_RETAIN_KEY}")
                continue
            if k == "train.max_steps":
                raise ConfigError(f"{path}: runs[{i}] sets train.max_steps; step counts go in steps:")
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"{path}: runs[{i}].{k} = {v!r} is not a number (YAML reads 5e-5 as a string: write "
                                  "5.0e-5)")
        if runs.index(r) != i:
            raise ConfigError(f"{path}: runs[{i}] repeats runs[{runs.index(r)}]; give each run once")
        try:
            load_config(os.path.join(ROOT, REAL_CONFIG), as_overrides({**r, "train.max_steps": steps[-1]}))
        except ConfigError as e:
            raise ConfigError(f"{path}: runs[{i}] is not a valid run on {REAL_CONFIG}: {e}") from None
    return runs, steps


def as_overrides(settings: dict) -> list[str]:
    """A grid point's settings as config overrides: ``{"train.lr": 5e-5}`` -> ``["train.lr=5e-05"]`` (its
    GRID_ONLY keys are not config keys: :func:`retain_set` reads them)."""
    return [f"{k}={v}" for k, v in settings.items() if k not in GRID_ONLY]


def _value(v) -> str:
    return v if isinstance(v, str) else f"{v:g}"


def point_name(settings: dict) -> str:
    """A point's folder / stage name: ``{"train.lr": 5e-5, "train.max_steps": 5}`` -> ``"lr5e-05_max_steps5"``."""
    return "_".join(f"{k.rsplit('.', 1)[-1]}{_value(v)}" for k, v in settings.items())


def score_point(settings: dict, order: int, before: dict, after: dict, kept: dict) -> dict:
    """One grid point: the share of the known questions of each side still stated after unlearning, and the mean
    probability of the development reference answers."""
    s = {name: scores(paired(before, after, kept, name)) for name in SELECTED}
    return {"settings": settings, "order": order, **{name: s[name]["correct_after"] for name in SELECTED},
            "dev_prob": s[DEV]["prob_after"], "questions": {name: len(kept[name]) for name in SELECTED}}


def choose(points: list[dict], keep: float = KEEP) -> dict:
    """The selection rule (BENCHMARKS.md): eligible = forget stated by 0% and retain kept >= ``keep``; among them the
    highest development share; ties: fewer steps, lower lr, higher mean development probability, grid order. No
    eligible point: the lowest forget share, then the highest retain share, then the highest development share (same
    ties). Returns ``{"point", "eligible", "reason"}``.

    >>> pts = [{"settings": {"train.lr": 5e-5, "train.max_steps": s}, "order": i, "forget": f, "retain": 1.0,
    ...         "dev": d, "dev_prob": 0.5} for i, (s, f, d) in enumerate([(5, 0.2, 1.0), (10, 0.0, 0.8)])]
    >>> choose(pts)["point"]["settings"]["train.max_steps"], choose(pts)["eligible"]
    (10, True)
    """
    if not points:
        raise ValueError("choose needs at least one measured grid point")

    def ties(p):
        return p["settings"]["train.max_steps"], p["settings"]["train.lr"], -p["dev_prob"], p["order"]

    eligible = [p for p in points if p["forget"] == 0 and p["retain"] >= keep]
    if eligible:
        return {"point": min(eligible, key=lambda p: (-p[DEV], *ties(p))), "eligible": True,
                "reason": f"the highest development share among the {len(eligible)} points with forget 0% and "
                          f"retain >= {keep:.0%}"}
    return {"point": min(points, key=lambda p: (p["forget"], -p["retain"], -p[DEV], *ties(p))), "eligible": False,
            "reason": f"no point has forget 0% and retain >= {keep:.0%}: the lowest forget share, then the highest "
                      "retain and development shares"}


def selection_markdown(points: list[dict], choice: dict, not_run: list[dict]) -> str:
    """The grid's table (shares of the known questions still stated; never the development questions themselves)."""
    keys = list(dict.fromkeys(k for p in points for k in p["settings"]))  # a key some runs leave out: "-"
    n = points[0]["questions"] if points else {}
    lines = ["# make demo: settings chosen on the development questions (launch/demo.py --select)", "",
             f"Rule (BENCHMARKS.md): {choice['reason']}.", "",
             "| " + " | ".join(keys) + f" | forget stated ({n.get('forget')}) | retain kept ({n.get('retain')}) | "
             f"development kept ({n.get(DEV)}) | development probability | seconds (train + ask) | |",
             "|" + "---|" * (len(keys) + 6)]
    for p in points:
        mark = "**chosen**" if p is choice["point"] else ""
        lines.append("| " + " | ".join(_value(p["settings"].get(k, "-")) for k in keys) + f" | {p['forget']:.0%} | "
                     f"{p['retain']:.0%} | {p[DEV]:.0%} | {p['dev_prob']:.3f} | {p.get('seconds', 0):.0f} | {mark} |")
    if not_run:
        lines += ["", "Not run (budget): " + ", ".join(point_name(s) for s in not_run)]
    return "\n".join(lines) + "\n"


def select_settings(args) -> int:
    """Run the grid on forget + retain with the development questions as the scored holdout, apply the rule and
    write ``OUT/selection.json`` and ``OUT/selection.md``. The base model's answers and the reference are computed
    once, the reference once per run; every stage is reused on a rerun (an interrupted selection resumes)."""
    grid, steps_of = load_grid(args.grid)  # a bad grid fails before anything runs
    n_runs = len(grid) if args.select_runs is None else args.select_runs
    if not 1 <= n_runs <= len(grid):
        raise ConfigError(f"--select-runs must be 1..{len(grid)} (the runs of {args.grid}), got {n_runs}")
    out = os.path.abspath(args.out)
    stages = Stages(out, tag="demo --select", echo=True, cwd=ROOT)
    start = base_answers(stages, args, out, SELECTED)
    if start is None:
        return 1
    base, before, kept = start
    runs = grid[:n_runs]
    points, not_run = [], [{**r, "train.max_steps": s} for r in grid[len(runs):] for s in steps_of]
    for i, grid_run in enumerate(runs):
        run_name = point_name(grid_run)
        run_dir = f"{out}/grid/{run_name}"
        cache = [f"reference.cache_dir={run_dir}/reference_cache"]  # the run's own: a grid may change K or N
        retain = retain_set(stages, args, out, base, kept, grid_run.get(EXTRA_RETAIN_KEY),
                            grid_run.get(EXTRA_ANSWERS_KEY, "given"))
        run(stages, f"precompute {run_name} (2 ranks)", deepspeed("launch/precompute.py", args.ds, REAL_CONFIG,
            unlearn_overrides(base, out, f"{run_dir}/precompute", [*cache, *as_overrides(grid_run)], retain),
            args.port), done=f"{run_dir}/reference_cache/manifest.json")
        for j, steps in enumerate(steps_of):
            settings = {**grid_run, "train.max_steps": steps}
            name = point_name(settings)
            answers = f"{out}/facts/{name}.json"
            extra = [*cache, *as_overrides(settings),
                     f"train.resume={'never' if j == 0 else 'auto'}"]  # a later step count extends the run
            train = f"train {name} (2 ranks)"
            if j == 0 and not os.path.exists(answers):  # a fresh run: no checkpoint of an earlier one to extend
                shutil.rmtree(f"{run_dir}/checkpoints", ignore_errors=True)
            run(stages, train, deepspeed("launch/train.py", args.ds, REAL_CONFIG,
                                         unlearn_overrides(base, out, run_dir, extra, retain), args.port),
                done=answers)
            after = ask(stages, args, out, f"ask {name} (2 ranks)", f"{run_dir}/model", name, SELECTED)
            point = score_point(settings, i * len(steps_of) + j, before, after, kept)
            point["seconds"] = stages.seconds.get(train, 0) + stages.seconds.get(f"ask {name} (2 ranks)", 0)
            points.append(point)
        shutil.rmtree(f"{run_dir}/checkpoints", ignore_errors=True)  # ~1.6 GB a run; its model is kept
    choice = choose(points)
    write_json(f"{out}/selection.json", {"grid": args.grid, "choice": choice, "points": points, "not_run": not_run,
                                         "stage_seconds": stages.seconds})
    text = selection_markdown(points, choice, not_run)
    write_text(f"{out}/selection.md", text)
    print(text)
    print(json.dumps({"chosen": choice["point"]["settings"], "eligible": choice["eligible"],
                      "selection": f"{out}/selection.md"}, indent=1))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--tiny", action="store_true", help="the fast synthetic pipeline (a tiny model from scratch)")
    p.add_argument("--ds", default="ds_configs/cpu/zero2.json")
    p.add_argument("--port", type=int, default=29611)
    p.add_argument("--select", action="store_true", help="choose the demo's settings on the development questions "
                                                         "(the grid and rule of BENCHMARKS.md); writes OUT/selection.*")
    p.add_argument("--grid", default=os.path.join(ROOT, GRID),
                   help="--select: the grid file (runs of config overrides, step counts; default: the latest round's)")
    p.add_argument("--select-runs", type=int, metavar="N",
                   help="--select: only the first N runs of the grid (the rule's budget clause; default: all)")
    args = p.parse_args()
    if args.select and args.tiny:
        p.error("--select chooses the real demo's settings; it does not combine with --tiny")
    return refusing(lambda: tiny_demo(args) if args.tiny else select_settings(args) if args.select else real_demo(args),
                    (StageFailed, ConfigError), status=1)


if __name__ == "__main__":
    sys.exit(main())
