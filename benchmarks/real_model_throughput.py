"""Training throughput on the real pretrained model (SmolLM2-135M-Instruct, 134.5M parameters, V = 49,152), all in one
run so that the numbers are ratios taken on the same machine state:

- the CPU's own limit: the fp32 matmul rate torch reaches on 2048^3 products (2 threads), best of 5;
- a plain fine-tuning step (transformers + torch AdamW, 2 threads, no DeepSpeed): forward + backward + step of the
  answer-token NLL on the same batches our runs see (4 forget + 4 retain TOFU rows per step, max 96 tokens);
- our unlearning step through launch/train.py: palu (precomputed and resident reference), pd_flat, npo on 1 process
  (2 threads, ZeRO stage 0) and on 2 ranks under ZeRO-3 (1 thread each);

each reported as training tokens/s (median over the steps after the first two), peak RSS per rank, and the model-FLOPs
utilisation MFU = 6 x parameters x tokens/s / matmul rate.

    python -m benchmarks.real_model_throughput --tofu ../shared/data/tofu --out runs/bench_real
    python -m benchmarks.real_model_throughput --profile --out runs/bench_real_profile   # where a step's time goes
"""
import json
import math
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from benchmarks.output import bench_parser, parse_bench, write_results
from palu_ds.localrun import cpu_env, launcher_cmd
from palu_ds.models import smollm2

MATMUL = r"""
import json, time, torch
def rate(m, k, n):
    a, b = torch.randn(m, k), torch.randn(k, n)
    best = 1e9
    for _ in range(5):
        t = time.perf_counter(); a @ b; best = min(best, time.perf_counter() - t)
    return 2 * m * k * n / best / 1e9
# the model's own products for 768 tokens (8 x 96): q/o, k/v (3 of 9 heads), gate/up, down, the full LM head
shapes = {"q_proj/o_proj": (768, 576, 576), "k_proj/v_proj": (768, 576, 192), "gate/up_proj": (768, 576, 1536),
          "down_proj": (768, 1536, 576), "lm_head (all positions)": (768, 576, 49152)}
print("RESULT", json.dumps({"gflops": rate(2048, 2048, 2048), "shapes": {k: rate(*v) for k, v in shapes.items()}}))
"""

PLAIN = r"""
import json, statistics, sys, time, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from palu_ds.batch import shift
from palu_ds.data import QADataset, QAOptions, collate
from palu_ds.data.io import load_records
from palu_ds.monitor import peak_memory_bytes, reset_peak_memory
model_dir, tofu, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
o = QAOptions(max_length=96)
forget = QADataset(load_records(f"{tofu}/forget01.jsonl"), tok, o)
retain = QADataset(load_records(f"{tofu}/retain90.jsonl")[:40], tok, o)
rates = []
reset_peak_memory()
for s in range(steps):
    rows = [forget[(4 * s + i) % len(forget)] for i in range(4)] + [retain[(4 * s + i) % len(retain)] for i in range(4)]
    b = collate(rows, tok.pad_token_id)
    t = time.perf_counter()
    lg, lb = shift(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
    loss = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1), ignore_index=-100)
    opt.zero_grad(); loss.backward(); opt.step()
    rates.append(int(b["attention_mask"].sum()) / (time.perf_counter() - t))
print("RESULT", json.dumps({"tokens_per_s": statistics.median(rates[2:]), "peak_rss": peak_memory_bytes()}))
if len(sys.argv) > 4:  # --profile: where one step's time goes, by operator (self CPU time)
    from torch.profiler import profile
    with profile() as prof:
        b = collate([forget[i] for i in range(4)] + [retain[i] for i in range(4)], tok.pad_token_id)
        lg, lb = shift(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
        loss = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1), ignore_index=-100)
        opt.zero_grad(); loss.backward(); opt.step()
    ev = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ev)
    mm = sum(e.self_cpu_time_total for e in ev if e.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul"))
    print(f"PROFILE matrix products {mm / total:.0%} of the step's self CPU time; top operators:")
    for e in sorted(ev, key=lambda e: -e.self_cpu_time_total)[:12]:
        print(f"PROFILE {e.key:45s} {e.self_cpu_time_total / total:6.1%}")
"""

RUNS = [  # (name, method, reference mode, ranks, DeepSpeed config): each on 1 process (ZeRO-0), then 2 ranks (ZeRO-3)
    (name, method, mode, ranks, ds)
    for ranks, ds in ((1, "ds_configs/cpu/zero0.json"), (2, "ds_configs/cpu/zero3.json"))
    for name, method, mode in (("palu, precomputed", "palu", "precomputed"), ("palu, resident", "palu", "resident"),
                               ("pd_flat", "pd_flat", "none"), ("npo, precomputed", "npo", "precomputed"))
]


def result(cmd: list[str], threads: int, log: str) -> dict:
    with open(log, "w") as f:
        p = subprocess.run(cmd, cwd=ROOT, env=cpu_env(OMP_NUM_THREADS=str(threads)), stdout=subprocess.PIPE, stderr=f, text=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not lines:
        raise SystemExit(f"{' '.join(cmd[:4])} failed ({p.returncode}); see {log}")
    return json.loads(lines[-1][7:])


def train(model: str, tofu: str, out: str, method: str, mode: str, ranks: int, ds: str, steps: int) -> dict:
    args = ["launch/train.py", "--deepspeed", ds, f"model.path={model}", f"data.forget.source={tofu}/forget01.jsonl",
            f"data.retain.source={tofu}/retain90.jsonl", "data.max_length=96", f"method.name={method}",
            f"reference.mode={mode}", "train.batch_size=4", f"train.max_steps={steps}", "train.lr=1e-5",
            f"train.output_dir={out}", "train.resume=never", "log.log_every=1000"]
    if method != "palu":
        args.append("method.params={}")
    with open(out + ".log", "w") as f:
        p = subprocess.run(launcher_cmd(args[0], args[1:], ranks), cwd=ROOT,
                           env=cpu_env(OMP_NUM_THREADS="1" if ranks > 1 else "2"), stdout=f, stderr=f)
    if p.returncode:
        raise SystemExit(f"{method} ({mode}, {ranks} ranks) failed ({p.returncode}); see {out}.log")
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    rates = [n / t for t, n in zip(s["step_seconds"][2:], s["step_tokens"][2:])]
    return {"tokens_per_s": statistics.median(rates), "peak_rss": s["last"]["memory/peak_bytes"]}


def main() -> int:
    p = bench_parser(__doc__, "runs/bench_real", 8, tofu=True)
    p.add_argument("--matmul-only", action="store_true", help="only the CPU's matmul rates (2048^3, the model's shapes)")
    p.add_argument("--profile", action="store_true", help="the matmul rates and a torch.profiler breakdown of a plain step")
    a = parse_bench(p)
    model, tofu = smollm2(), os.path.abspath(a.tofu)
    from safetensors import safe_open

    with safe_open(os.path.join(model, "model.safetensors"), "pt") as f:  # tied: the embedding counted once
        n_params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    mm = result([sys.executable, "-c", MATMUL], 2, os.path.join(a.out, "matmul.log"))
    gflops = mm["gflops"]
    print("fp32 matmul rate at the model's own shapes (768 tokens), GFLOP/s: "
          + ", ".join(f"{k} {v:.0f}" for k, v in mm["shapes"].items()))
    if a.matmul_only or a.profile:
        print(f"2048^3: {gflops:.1f} GFLOP/s")
        if a.profile:
            log = os.path.join(a.out, "profile.log")
            with open(log, "w") as f:
                p = subprocess.run([sys.executable, "-c", PLAIN, model, tofu, "4", "profile"], cwd=ROOT, env=cpu_env(OMP_NUM_THREADS="2"),
                                   stdout=subprocess.PIPE, stderr=f, text=True)
            print("\n".join(ln[8:] for ln in p.stdout.splitlines() if ln.startswith("PROFILE ")))
        return 0
    rows = [("plain transformers + AdamW", 1,
             result([sys.executable, "-c", PLAIN, model, tofu, str(a.steps)], 2, os.path.join(a.out, "plain.log")))]
    for name, method, mode, ranks, ds in RUNS:
        out = os.path.join(a.out, f"{method}_{mode}_{ranks}")
        rows.append((name, ranks, train(model, tofu, out, method, mode, ranks, ds, a.steps)))
    plain = rows[0][2]["tokens_per_s"]
    report = {"matmul_gflops": gflops, "matmul_shapes_gflops": mm["shapes"], "params": n_params, "runs": []}
    print(f"{n_params / 1e6:.1f}M parameters; fp32 matmul (2048^3, 2 threads): {gflops:.1f} GFLOP/s\n")
    print("| run | ranks | tokens/s | vs plain step | MFU (vs matmul rate) | peak RSS per rank |\n|---|---|---|---|---|---|")
    for name, ranks, r in rows:
        mfu = 6 * n_params * r["tokens_per_s"] / (gflops * 1e9)
        report["runs"].append({"name": name, "ranks": ranks, **r, "vs_plain": r["tokens_per_s"] / plain, "mfu": mfu})
        print(f"| {name} | {ranks} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / plain:.2f}x | {mfu:.0%} | "
              f"{r['peak_rss'] / 2**30:.2f} GiB |")
    write_results(a.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
