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
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from palu_ds.atomic import write_jsonl
from palu_ds.localrun import launcher_cmd
from palu_ds.stages import Stages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class StageFailed(Exception):
    pass


def pipeline(out: str) -> Stages:
    """The benchmarks' stage runner, every stage run (nothing reused), its output on the console and in
    ``OUT/logs``."""
    return Stages(out, fresh=True, tag="demo", echo=True, cwd=ROOT)


def run(stages: Stages, stage: str, cmd: list[str]) -> None:
    if not stages.run(stage, cmd):
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
        run(stages, f"evaluate {name}", [sys.executable, "evaluation/run.py", "--model", model, "--suite", "tofu",
                                         "--split", "forget10", "--data", f"{out}/data", "--splits", "forget,retain",
                                         "--max-new-tokens", "48", "--out", f"{out}/eval/{name}", "--name", name,
                                         *extra])
        with open(os.path.join(out, "eval", name, "summary.json")) as f:
            evals[name] = json.load(f)["metrics"]
    run(stages, "report", [sys.executable, "evaluation/report.py", f"{out}/eval/target", f"{out}/eval/palu",
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


def known_rows(results: dict, name: str) -> list[dict]:
    """The rows of ``name`` the model answered correctly (the training records, as written in REAL_DATA)."""
    with open(os.path.join(REAL_DATA, f"{name}.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
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


def real_demo(args) -> int:
    """SmolLM2-135M-Instruct forgets who wrote the Shakespeare / Dickens / Orwell books and keeps the rest."""
    out = os.path.abspath(args.out)
    stages = pipeline(out)
    t = time.time()
    print("\n=== fetch SmolLM2-135M-Instruct (palu-ds fetch-model smollm2; cached after the first run)", flush=True)
    fetched = subprocess.run([sys.executable, "-m", "palu_ds.cli", "fetch-model", "smollm2"], cwd=ROOT, check=True,
                             stdout=subprocess.PIPE, text=True)
    base = fetched.stdout.strip().splitlines()[-1]
    stages.seconds["fetch model"] = round(time.time() - t, 1)
    data = [os.path.join(REAL_DATA, f"{name}.jsonl") for name in SIDES]

    def ask(stage: str, model: str, name: str) -> dict:
        run(stages, stage, launcher_cmd("evaluation/facts.py", ["--model", model, "--data", *data,
                                                                "--out", f"{out}/facts/{name}.json"], 2, args.port))
        with open(f"{out}/facts/{name}.json", encoding="utf-8") as f:
            return json.load(f)

    before = ask("ask the base model (2 ranks)", base, "before")
    kept = {name: known_rows(before, name) for name in SIDES}
    if not kept["forget"] or not kept["retain"]:
        print(f"error: the base model answered {len(kept['forget'])} forget and {len(kept['retain'])} retain "
              "questions correctly: nothing to unlearn or nothing to keep", file=sys.stderr)
        return 1
    for name in ("forget", "retain"):  # the training sets
        write_jsonl(f"{out}/data/{name}.jsonl", kept[name])
    overrides = [f"model.path={base}", f"data.forget.source={out}/data/forget.jsonl",
                 f"data.retain.source={out}/data/retain.jsonl", f"train.output_dir={out}/palu", "train.resume=never"]
    shutil.rmtree(os.path.join(out, "palu", "reference_cache"), ignore_errors=True)  # another run's cache
    cfg = "launch/configs/real_facts.yaml"
    run(stages, "precompute reference (2 ranks)", deepspeed("launch/precompute.py", args.ds, cfg, overrides,
                                                             args.port))
    run(stages, "PALU unlearning (2 ranks)", deepspeed("launch/train.py", args.ds, cfg, overrides, args.port))
    after = ask("ask the unlearned model (2 ranks)", f"{out}/palu/model", "after")
    text, s = report(before, after, kept)
    with open(f"{out}/report.md", "w", encoding="utf-8") as f:
        f.write("# make demo: what SmolLM2-135M-Instruct states before and after PALU unlearning\n" + text)
    print(text)
    print(json.dumps({"stage_seconds": stages.seconds, "scores": s, "unlearned_model": f"{out}/palu/model",
                      "tensorboard": f"{out}/palu/tensorboard", "report": f"{out}/report.md"}, indent=1))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--tiny", action="store_true", help="the fast synthetic pipeline (a tiny model from scratch)")
    p.add_argument("--ds", default="ds_configs/cpu/zero2.json")
    p.add_argument("--port", type=int, default=29611)
    args = p.parse_args()
    try:
        return tiny_demo(args) if args.tiny else real_demo(args)
    except StageFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
