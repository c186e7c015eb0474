"""Where the 2-rank overhead goes on a 2-core CPU: 1 -> 2 rank scaling of training tokens/s, and the collectives.

The same work as benchmarks/vs_open_unlearning.py (its model, TOFU forget10/retain90, 4 + 4 samples per rank per
step, max length 128, pd_flat, no reference), run as:

- 1 process, 1 thread and 2 threads (DeepSpeed stage 0);
- two independent 1-thread processes at once (the two cores' aggregate when nothing is shared);
- 2 ranks (1 thread each) under ``ds_configs/cpu/zero2.json`` and ``ds_configs/cpu/zero3.json``;

plus the gloo collectives a step needs at this model size (all-reduce, reduce-scatter, all-gather of 7.36M fp32
values, 2 ranks on loopback), timed alone.

    python -m benchmarks.rank_scaling --tofu ../shared/data/tofu --out runs/bench_scaling
"""
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from benchmarks.output import bench_parser, parse_bench, write_results
from benchmarks.vs_open_unlearning import build_model
from palu_ds.localrun import cpu_env, free_port, launcher_cmd

COLLECTIVES = r"""
import json, statistics, sys, time, torch, torch.distributed as dist
dist.init_process_group("gloo")
n, out = int(sys.argv[1]), {}
t = torch.randn(n)
half = torch.empty(n // 2)
ops = {"all_reduce": lambda: dist.all_reduce(t), "reduce_scatter": lambda: dist.reduce_scatter_tensor(half, t),
       "all_gather": lambda: dist.all_gather_into_tensor(t, half)}
for name, op in ops.items():
    ts = []
    for _ in range(7):
        dist.barrier(); s = time.perf_counter(); op(); ts.append(time.perf_counter() - s)
    out[name] = statistics.median(ts)
if dist.get_rank() == 0:
    print("COLLECTIVES", json.dumps(out))
dist.destroy_process_group()
"""


def train_args(model: str, tofu: str, run_dir: str, ds: str, steps: int) -> list[str]:
    return ["launch/train.py", "--deepspeed", ds, f"model.path={model}", f"data.forget.source={tofu}",
            "data.forget.config=forget10", f"data.retain.source={tofu}", "data.retain.config=retain90",
            "data.max_length=128", "method.name=pd_flat", "train.batch_size=4", f"train.max_steps={steps}",
            "train.lr=1e-5", f"train.output_dir={run_dir}", "train.resume=never", "log.log_every=1000",
            "reference.mode=none"]


def rate(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "summary.json")) as f:
        s = json.load(f)
    secs, toks = s["step_seconds"][2:], s["step_tokens"][2:]
    return {"s_per_step": statistics.median(secs), "tokens_per_s": statistics.median(t / d for t, d in zip(toks, secs))}


def launch(cmds: list[tuple[list[str], int]], log: str) -> list[int]:
    """Start every (command, threads) at once and wait for all."""
    with open(log, "w") as f:
        procs = [subprocess.Popen(c, cwd=ROOT, env=cpu_env(OMP_NUM_THREADS=str(th)), stdout=f, stderr=f) for c, th in cmds]
        return [p.wait() for p in procs]


def main() -> int:
    p = bench_parser(__doc__, "runs/bench_scaling", 24, tofu=True)
    p.add_argument("--zero3-variants", action="store_true",
                   help="also 2 ranks under variants of cpu/zero3.json (overlap_comm, reduce_scatter, persistence)")
    a = parse_bench(p)
    model = build_model(a.tofu, os.path.join(ROOT, "runs", "bench_ou"))
    py, rows = sys.executable, []

    def one(name: str, cmds: list[tuple[list[str], int]], dirs: list[str], ranks: int) -> None:
        t = time.time()
        rcs = launch(cmds, os.path.join(a.out, name + ".log"))
        if any(rcs):
            rows.append({"config": name, "exit": rcs})
            return
        r = [rate(d) for d in dirs]
        rows.append({"config": name, "ranks": ranks, "exit": 0, "wall_s": round(time.time() - t, 1),
                     "s_per_step": max(x["s_per_step"] for x in r),
                     "tokens_per_s": sum(x["tokens_per_s"] for x in r)})
        print(rows[-1], flush=True)

    d = lambda n: os.path.join(a.out, n)  # noqa: E731
    for th in (1, 2):
        one(f"1 process, {th} thread(s)", [([py] + train_args(model, a.tofu, d(f"p1_t{th}"),
                                                               "ds_configs/cpu/zero0.json", a.steps), th)],
            [d(f"p1_t{th}")], 1)
    one("2 independent 1-thread processes", [([py] + train_args(model, a.tofu, d(f"ind{i}"),
                                                                "ds_configs/cpu/zero0.json", a.steps), 1)
                                             for i in (0, 1)], [d("ind0"), d("ind1")], 1)
    for stage in ("zero2", "zero3"):
        one(f"2 ranks, {stage}", [(launcher_cmd("launch/train.py", train_args(
            model, a.tofu, d(f"r2_{stage}"), f"ds_configs/cpu/{stage}.json", a.steps)[1:], 2), 1)],
            [d(f"r2_{stage}")], 2)
    variants = {"overlap_comm": {"overlap_comm": True}, "reduce_scatter off": {"reduce_scatter": False},
                "overlap_comm + reduce_scatter off": {"overlap_comm": True, "reduce_scatter": False},
                "persistence 1e4": {"stage3_param_persistence_threshold": 10000},
                "persistence 1e5": {"stage3_param_persistence_threshold": 100000}}
    for name, change in (variants.items() if a.zero3_variants else []):
        with open(os.path.join(ROOT, "ds_configs", "cpu", "zero3.json")) as f:
            ds = json.load(f)
        ds["zero_optimization"].update(change)
        path = d("zero3_" + name.replace(" ", "_").replace("+", "and") + ".json")
        with open(path, "w") as f:
            json.dump(ds, f, indent=1)
        one(f"2 ranks, zero3, {name}", [(launcher_cmd("launch/train.py", train_args(
            model, a.tofu, path[:-5], path, a.steps)[1:], 2), 1)],
            [path[:-5]], 2)
    coll = subprocess.run([py, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                           "--no-python", py, "-c", COLLECTIVES, "7360000"], cwd=ROOT, env=cpu_env(),
                          capture_output=True, text=True)
    line = [ln for ln in coll.stdout.splitlines() if ln.startswith("COLLECTIVES")]
    collectives = json.loads(line[0].split(" ", 1)[1]) if line else {"error": coll.stderr[-2000:]}

    write_results(a.out, {"train": rows, "collectives": collectives}, table(rows, collectives))
    return 0 if all(not r["exit"] for r in rows) and "error" not in collectives else 1


def table(rows: list[dict], collectives: dict) -> str:
    """The markdown tables: each run's speed relative to 1 process with 2 threads, then the collectives' times."""
    base = next((r["tokens_per_s"] for r in rows if r["config"] == "1 process, 2 thread(s)" and r["exit"] == 0), None)
    lines = ["| run | s/step | tokens/s | vs 1 process, 2 threads |", "|---|---|---|---|"]
    for r in rows:
        if r["exit"]:
            lines.append(f"| {r['config']} | failed {r['exit']} | | |")
            continue
        ratio = f"{r['tokens_per_s'] / base:.2f}×" if base else "–"
        lines.append(f"| {r['config']} | {r['s_per_step']:.3f} | {r['tokens_per_s']:.0f} | {ratio} |")
    lines += ["", "| gloo collective, 7.36M fp32, 2 ranks | ms |", "|---|---|"]
    lines += [f"| {k} | {v * 1000:.1f} |" for k, v in collectives.items() if isinstance(v, float)]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
