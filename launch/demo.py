"""The embedded default end to end on CPU, through the real CLIs, each stage timed: generate data -> tokenizer +
tiny Llama -> fine-tune the target (all authors) and retain (without the forget authors) models under DeepSpeed
(2 ranks) -> precompute the reference -> PALU unlearning (2 ranks) -> TOFU evaluation -> report.

    python launch/demo.py --out runs/demo
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(stage: str, cmd: list[str], timings: dict) -> None:
    print(f"\n=== {stage}: {' '.join(cmd)}", flush=True)
    t = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    timings[stage] = round(time.time() - t, 1)
    print(f"=== {stage} done in {timings[stage]} s", flush=True)


def deepspeed(script: str, ds: str, config: str, overrides: list[str], port: int) -> list[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
            script, "--deepspeed", ds, "--config", config, *overrides]


def summary(out: str, name: str) -> dict:
    with open(os.path.join(out, name, "summary.json")) as f:
        return json.load(f)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, (int, float)) else str(v)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--ds", default="ds_configs/cpu/zero2.json")
    p.add_argument("--port", type=int, default=29611)
    args = p.parse_args()
    out, timings = args.out, {}
    run("generate data, tokenizer, base model", [sys.executable, "-m", "palu_ds.cli", "make-default", out], timings)
    base = [f"model.path={out}/base", f"data.forget.source={out}/data"]
    for name, split in (("target", "full"), ("retain", "retain90")):
        run(f"fine-tune {name} model (2 ranks)", deepspeed(
            "launch/finetune.py", args.ds, "launch/configs/finetune.yaml",
            base + [f"data.forget.config={split}", f"train.output_dir={out}/{name}", "train.resume=never"],
            args.port), timings)
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
    run("precompute reference (2 ranks)", deepspeed("launch/precompute.py", args.ds, "launch/configs/demo.yaml",
                                                     unlearn, args.port), timings)
    run("PALU unlearning (2 ranks)", deepspeed("launch/train.py", args.ds, "launch/configs/demo.yaml", unlearn,
                                                args.port), timings)
    evals = {}
    for name, model in (("retain", f"{out}/retain/model"), ("target", f"{out}/target/model"),
                        ("palu", f"{out}/palu/model")):
        extra = ["--no-forget-quality"] if name == "retain" else ["--retain-results", f"{out}/eval/retain"]
        run(f"evaluate {name}", [sys.executable, "evaluation/run.py", "--model", model, "--suite", "tofu",
                                 "--split", "forget10", "--data", f"{out}/data", "--splits", "forget,retain",
                                 "--max-new-tokens", "48", "--out", f"{out}/eval/{name}", "--name", name, *extra],
            timings)
        with open(os.path.join(out, "eval", name, "summary.json")) as f:
            evals[name] = json.load(f)["metrics"]
    run("report", [sys.executable, "evaluation/report.py", f"{out}/eval/target", f"{out}/eval/palu",
                   "--out", f"{out}/eval/report.png"], timings)
    keys = ("forget_quality", "forget/truth_ratio", "forget/rougeL_recall", "forget/prob", "retain/prob", "model_utility")
    print("\n| model | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for name in ("target", "palu"):
        print(f"| {name} | " + " | ".join(_fmt(evals[name].get(k)) for k in keys) + " |")
    print(json.dumps({"stage_seconds": timings, "unlearned_model": f"{out}/palu/model",
                      "tensorboard": f"{out}/palu/tensorboard", "results": f"{out}/eval",
                      "report": f"{out}/eval/report.png"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
