"""The embedded default end to end on CPU: generate data -> tokenizer + tiny Llama -> fine-tune the target model
under DeepSpeed (2 ranks) -> ... Each stage prints its wall time; the stages are the real CLIs.

    python launch/demo.py --out runs/demo
"""
import argparse
import json
import os
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--ds", default="ds_configs/cpu/zero2.json")
    p.add_argument("--port", type=int, default=29611)
    args = p.parse_args()
    out, timings = args.out, {}
    run("generate data, tokenizer, base model", [sys.executable, "-m", "palu_ds.cli", "make-default", out], timings)
    base = [f"model.path={out}/base", f"data.forget.source={out}/data"]
    run("fine-tune target (2 ranks)", deepspeed("launch/finetune.py", args.ds, "launch/configs/finetune.yaml",
        base + ["data.forget.config=full", f"train.output_dir={out}/target"], args.port), timings)
    with open(os.path.join(out, "target", "summary.json")) as f:
        s = json.load(f)
    first, last = s["first"]["loss/forget"], s["last"]["loss/forget"]
    print(f"\ntarget fine-tune: answer NLL {first:.3f} -> {last:.3f} over {s['steps']} steps")
    if not last < first:
        print("error: the fine-tune did not lower the loss", file=sys.stderr)
        return 1
    print(json.dumps({"stage_seconds": timings, "target_model": s["model"],
                      "tensorboard": os.path.join(out, "target", "tensorboard")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
