"""Speed and memory on the shape of work open-unlearning was measured on (issue 9), with palu_ds.

Model: byte-level BPE tokenizer with 8,192 tokens trained on TOFU full.jsonl; Llama hidden 256, 4 layers, 4 heads,
intermediate 688, untied embeddings, fp32, random init (7.36M parameters). Data: TOFU forget10 / retain90, 4 forget
+ 4 retain samples per rank per step, max length 128, AdamW. Timing = median of steps 3-20; throughput = non-pad
training tokens per second over all ranks (reference forwards not counted; the precompute runs before step 1).
Shapes: 1 process (DeepSpeed stage 0, 2 threads) and DeepSpeed ZeRO-3 on 2 ranks (1 thread each), CPU, fp32.

    python -m benchmarks.vs_open_unlearning --tofu ../shared/data/tofu --out runs/bench_ou
"""
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

from benchmarks.output import bench_parser, parse_bench, write_results
from palu_ds.localrun import cpu_env, launcher_cmd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

OPEN_UNLEARNING = {  # measured by the project on a machine of this kind (issue 9), another run
    ("npo", 1): (0.53, 1112, 1096), ("pd_flat", 1): (0.39, 1666, 987), ("grad_diff", 1): (0.58, 1103, 1190),
    ("npo", 2): (1.89, 682, 1543), ("pd_flat", 2): (1.52, 821, 1188),
}
MAXRSS = ("import resource,subprocess,sys; r=subprocess.call(sys.argv[1:]); "
          "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True); sys.exit(r)")


def build_model(tofu: str, out: str) -> str:
    """The tiny Llama (hidden 256, 4 layers, an 8,192-token BPE tokenizer trained on TOFU's QA) in ``out/model``."""
    from palu_ds.data.io import load_records
    from palu_ds.tiny import build_model_dir, qa_texts

    path = os.path.join(out, "model")
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return path
    return build_model_dir(path, qa_texts(load_records(os.path.join(tofu, "full.jsonl"))), vocab_size=8192, seed=0,
                           hidden=256, layers=4, heads=4, intermediate=688, max_positions=512)


def run(cmd: list[str], threads: int, log: str) -> tuple[int, float, int]:
    t = time.time()
    with open(log, "w") as f:
        p = subprocess.run([sys.executable, "-c", MAXRSS, *cmd], cwd=ROOT, env=cpu_env(OMP_NUM_THREADS=str(threads)), stdout=subprocess.PIPE,
                           stderr=f, text=True)
    f_out = p.stdout
    kb = int(f_out.strip().split("MAXRSS_KB")[-1]) if "MAXRSS_KB" in f_out else 0
    return p.returncode, time.time() - t, kb * 1024


def train(method: str, nproc: int, model: str, tofu: str, out: str, steps: int) -> dict:
    run_dir = os.path.join(out, f"{method}_{nproc}")
    args = ["launch/train.py", "--deepspeed", f"ds_configs/cpu/{'zero3' if nproc > 1 else 'zero0'}.json",
            f"model.path={model}", f"data.forget.source={tofu}", "data.forget.config=forget10",
            f"data.retain.source={tofu}", "data.retain.config=retain90", "data.max_length=128",
            f"method.name={method}", "train.batch_size=4", f"train.max_steps={steps}", "train.lr=1e-5",
            f"train.output_dir={run_dir}", "train.resume=never", "log.log_every=100",
            f"reference.mode={'precomputed' if method in ('palu', 'npo') else 'none'}",
            f"reference.cache_dir={os.path.join(out, 'cache_' + method)}" if method in ("palu", "npo") else ""]
    args = [a for a in args if a]
    if method == "palu":
        args.append("method.params.K=1000")
    cmd = launcher_cmd(args[0], args[1:], nproc)
    rc, wall, _ = run(cmd, 1 if nproc > 1 else 2, os.path.join(out, f"{method}_{nproc}.log"))
    if rc != 0:
        return {"method": method, "nproc": nproc, "exit": rc}
    with open(os.path.join(run_dir, "summary.json")) as f:
        s = json.load(f)
    secs, toks = s["step_seconds"][2:20], s["step_tokens"][2:20]
    return {"method": method, "nproc": nproc, "exit": rc, "s_per_step": statistics.median(secs),
            "tokens_per_s": statistics.median(t / d for t, d in zip(toks, secs)),
            "peak_rss_mib": max(s["peak_memory_bytes_per_rank"]) / 2 ** 20, "wall_s": wall}


def evaluate(model: str, tofu: str, out: str, nproc: int) -> dict:
    args = ["evaluation/run.py", "--model", model, "--suite", "tofu", "--split", "forget10", "--data", tofu,
            "--no-forget-quality", "--out", os.path.join(out, f"eval_{nproc}")]
    cmd = launcher_cmd(args[0], args[1:], nproc)
    rc, wall, rss = run(cmd, 1 if nproc > 1 else 2, os.path.join(out, f"eval_{nproc}.log"))
    return {"nproc": nproc, "exit": rc, "wall_s": wall, "peak_rss_mib": rss / 2 ** 20}


def main() -> int:
    p = bench_parser(__doc__, "runs/bench_ou", 20, tofu=True, skip_train=True)
    p.add_argument("--methods", default="palu,pd_flat,npo,grad_diff")
    p.add_argument("--shapes", default="1,2")
    p.add_argument("--skip-eval", action="store_true")
    a = parse_bench(p)
    model = build_model(a.tofu, a.out)
    for m in ("palu", "npo"):  # made afresh by the first run of each method (before its timed steps)
        shutil.rmtree(os.path.join(a.out, "cache_" + m), ignore_errors=True)
    rows = [] if a.skip_train else [train(m, int(n), model, a.tofu, a.out, a.steps)
                                    for n in a.shapes.split(",") for m in a.methods.split(",")]
    evals = [] if a.skip_eval else [evaluate(model, a.tofu, a.out, int(n)) for n in a.shapes.split(",")]
    lines = ["| config | palu_ds s/step | palu_ds tokens/s | palu_ds peak RSS | open-unlearning s/step | "
             "open-unlearning tokens/s | open-unlearning peak RSS | tokens/s ratio | exit |", "|---" * 9 + "|"]
    for r in rows:
        shape = "1 process" if r["nproc"] == 1 else "DeepSpeed ZeRO-3, 2 processes"
        ou = OPEN_UNLEARNING.get((r["method"], r["nproc"]))
        if r["exit"] != 0:
            lines.append(f"| {shape}, {r['method']} | failed | | | | | | | {r['exit']} |")
            continue
        ref = f"{ou[0]} | {ou[1]} | {ou[2]} MiB | {r['tokens_per_s'] / ou[1]:.2f}×" if ou else "– | – | – | –"
        lines.append(f"| {shape}, {r['method']} | {r['s_per_step']:.3f} | {r['tokens_per_s']:.0f} | "
                     f"{r['peak_rss_mib']:.0f} MiB | {ref} | {r['exit']} |")
    for e in evals:
        lines.append(f"| TOFU evaluation (forget10 suite), {e['nproc']} process(es) | {e['wall_s']:.0f} s wall | | "
                     f"{e['peak_rss_mib']:.0f} MiB | 413 s wall | | 1607 MiB | {413 / e['wall_s']:.1f}× faster | "
                     f"{e['exit']} |")
    write_results(a.out, {"train": rows, "eval": evals}, "\n".join(lines))
    return 0 if all(r["exit"] == 0 for r in rows + evals) else 1


if __name__ == "__main__":
    sys.exit(main())
