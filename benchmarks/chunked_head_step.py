"""Benchmark (not a test): the whole training step on a real model, train.head_path dense vs chunked (issue 17).

    python benchmarks/chunked_head_step.py --model /tmp/smol/hf --data ../shared/data/tofu

Runs the real CLI (``launch/train.py``, DeepSpeed launcher, 2 ranks, ``ds_configs/cpu/zero3.json``, fp32) twice
with the same settings -- GradDiff on TOFU forget10 / retain90 (no reference needed), ``--steps`` optimizer steps
of ``--batch`` rows per rank -- once per head path, and prints rank 0's peak RSS (``memory/peak_bytes``: VmHWM
since the start of training) and the training tokens/s of the last step, from each run's TensorBoard events
(so that a failure of the final save -- e.g. a GGUF-exported folder that still carries its quantization config --
does not lose the measurement; the failure is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile

from benchmarks.output import tb_scalars
from palu_ds.localrun import cpu_env, launcher_cmd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(a, path: str, out: str) -> dict:
    env = cpu_env()
    cmd = launcher_cmd("launch/train.py", [
        "--deepspeed", "ds_configs/cpu/zero3.json", "--config", "launch/configs/demo.yaml",
        f"model.path={a.model}", "method.name=grad_diff", "method.params={}",
        f"data.forget.source={a.data}", "data.forget.config=forget10",
        f"data.retain.source={a.data}", "data.retain.config=retain90", f"data.max_length={a.max_length}",
        f"train.output_dir={out}", f"train.max_steps={a.steps}", f"train.batch_size={a.batch}",
        "train.save_every=0", "log.log_every=1", f"train.head_path={path}", "train.lr=1e-5"], 2, a.port)
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    last = scalars(out, a.steps)  # what the training steps logged (TensorBoard), whether or not the final save worked
    if last is None:
        raise SystemExit(f"{path} run failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    note = "" if p.returncode == 0 else (f"the run trained {a.steps} steps, then exited {p.returncode}: "
                                         + _last_error(p.stderr))
    return {"path": path, "peak_gib": last["memory/peak_bytes"] / 2**30,
            "tokens_per_s": last["throughput/tokens_per_s"],
            "loss": {k: v for k, v in last.items() if k.startswith("loss/")}, "note": note}


def _last_error(text: str) -> str:
    lines = [ln for ln in text.splitlines() if "Error:" in ln]
    return lines[0].strip()[:300] if lines else text[-300:]


def scalars(out: str, steps: int) -> dict | None:
    """Rank 0's scalars at the last training step, from the run's TensorBoard events (None if it did not get there)."""
    last = {tag: ev[-1][1] for tag, ev in tb_scalars(out).items() if ev and ev[-1][0] == steps}
    return last if "throughput/tokens_per_s" in last else None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a HF model folder, e.g. /tmp/smol/hf (SmolLM2-135M-Instruct)")
    p.add_argument("--data", required=True, help="the TOFU folder (forget10.jsonl, retain90.jsonl)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--port", type=int, default=29731)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    a.data = os.path.abspath(a.data)
    root = a.out or tempfile.mkdtemp(prefix="chunked_head_step_")
    res = [run(a, path, os.path.join(root, path)) for path in ("dense", "chunked")]
    for r in res:
        print(json.dumps(r))
    d, c = res
    print("\n| model | head path | peak RSS rank 0 (GiB) | tokens/s (last step) |\n|---|---|---|---|")
    for r in res:
        print(f"| {os.path.basename(os.path.normpath(a.model))} | {r['path']} | {r['peak_gib']:.2f} | "
              f"{r['tokens_per_s']:.1f} |")
    print(f"\nchunked/dense: peak RSS {c['peak_gib'] / d['peak_gib']:.3f}x, tokens/s "
          f"{c['tokens_per_s'] / d['tokens_per_s']:.3f}x")


if __name__ == "__main__":
    main()
