"""Training throughput on the real pretrained model (SmolLM2-135M-Instruct, 134.5M parameters, V = 49,152), all in one
run so that the numbers are ratios taken on the same machine state:

- the CPU's own limit: the fp32 and bf16 matmul rates torch reaches on 2048^3 products (2 threads), best of 5;
- a plain fine-tuning step (transformers + torch AdamW with its defaults, 2 threads, no DeepSpeed), fp32 and bf16
  (torch.autocast): forward + backward + step of the answer-token NLL on the same batches our runs see (4 forget +
  4 retain TOFU rows per step, max 96 tokens);
- our unlearning step through launch/train.py for each ``--methods`` (registry names; a method that needs the
  reference reads it precomputed, ``--resident`` adds its resident-reference run) and each ``--precisions``, on 1
  process (2 threads, ZeRO stage 0) and on 2 ranks under ZeRO-3 (1 thread each); bf16 = autocast at both;

each reported as training tokens/s (median over the steps after the first two), its ratio to the plain step of the
same precision, peak RSS per rank, and the model-FLOPs utilisation MFU = 6 x parameters x tokens/s / matmul rate of
the run's precision; and each bf16 run's loss curve against its fp32 twin's (the objective at every step, from the
runs' TensorBoard events: the largest and the last relative difference). ``--rounded-start`` adds, per method and
ranks, a control for that comparison: an fp32 run whose starting weights are rounded to bf16 (each weight moved by at
most 2^-9 of itself, bf16's rounding), nothing else changed: how far the fp32 curve itself moves under a perturbation of
bf16's size, to tell bf16's arithmetic from the run's own sensitivity.  ``--fp32-modules PATTERNS`` (repeatable) adds,
per method, a 1-process bf16 run whose modules matching PATTERNS (comma-separated fnmatch patterns on the model's
module names, e.g. ``*.mlp`` or ``*.self_attn,lm_head``; :func:`keep_fp32`) run in fp32, forward and backward: which
products carry bf16's lag; ``--bf16-operand weight|input`` adds, per such set, a run whose kept products round only
that operand to bf16 (which rounding carries it); ``--bf16-dither`` adds, per method and ranks, a bf16 run from the
dithered start (``train.bf16_dither``: palu_ds.dither), the remedy those runs point to.  ``--padded`` adds, per
method, precision and ranks, the run with right-padded rows (``train.padding_free=false``): what the padding-free
forward (palu_ds.packing, the default) gains.  The plain step always pads its rows, as a transformers loop does.

    python -m benchmarks.real_model_throughput --tofu ../shared/data/tofu --out runs/bench_real
    python -m benchmarks.real_model_throughput --steps 2 --methods palu --ranks 1 --out runs/bench_smoke   # smoke
    python -m benchmarks.real_model_throughput --profile --out runs/bench_real_profile   # where a step's time goes
    python -m benchmarks.real_model_throughput --steps 30 --methods palu --ranks 1 --rounded-start \
        --out runs/bench_curve   # bf16's loss curve and its control
    python -m benchmarks.real_model_throughput --steps 30 --methods palu --ranks 1 --fp32-modules '*.mlp' \
        --fp32-modules '*.self_attn' --fp32-modules lm_head --out runs/bench_bf16_modules   # which products lag
    python -m benchmarks.real_model_throughput --steps 30 --methods palu --ranks 1 --fp32-modules \
        '*.self_attn,*.mlp' --bf16-operand weight --bf16-operand input --out runs/bench_bf16_operands   # which rounding
    python -m benchmarks.real_model_throughput --steps 30 --methods palu --ranks 1 --bf16-dither --out runs/bench_dither

``--profile`` runs torch.profiler over the plain step and over our palu step (1 process, ZeRO stage 0, each
``--precisions``), with the phases of each step labelled (our step's: data, global counts, forward, LM head,
reference lookup, loss terms, backward, optimizer step, stats all-reduce, logging), and prints each phase's share of
the step's self CPU time with its top operators, then the top operators overall (key_averages): relative shares,
which load on the machine does not distort the way it distorts tokens/s.
"""
import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from benchmarks.output import bench_parser, parse_bench, tb_scalars, write_results
from palu_ds.localrun import cpu_env, launcher_cmd
from palu_ds.methods import METHODS
from palu_ds.models import smollm2

PRECISIONS = ("fp32", "bf16")
ONE_PROCESS, TWO_RANKS = "ds_configs/cpu/zero0.json", "ds_configs/cpu/zero3.json"  # the runs' DeepSpeed configs

MATMUL = r"""
import json, time, torch
def rate(m, k, n, dtype):
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    best = 1e9
    for _ in range(5):
        t = time.perf_counter(); a @ b; best = min(best, time.perf_counter() - t)
    return 2 * m * k * n / best / 1e9
# the model's own products for 768 tokens (8 x 96): q/o, k/v (3 of 9 heads), gate/up, down, the full LM head
shapes = {"q_proj/o_proj": (768, 576, 576), "k_proj/v_proj": (768, 576, 192), "gate/up_proj": (768, 576, 1536),
          "down_proj": (768, 1536, 576), "lm_head (all positions)": (768, 576, 49152)}
print("RESULT", json.dumps({p: {"gflops": rate(2048, 2048, 2048, d), "shapes": {k: rate(*v, d) for k, v in shapes.items()}}
                            for p, d in (("fp32", torch.float32), ("bf16", torch.bfloat16))}))
"""

# where a profiled step's time goes: each operator's self CPU time attributed to its innermost "## " phase
PHASES = r"""
import collections
def phase_report(prof, n, top=6):
    ev = prof.events()
    total = sum(e.self_cpu_time_total for e in ev)
    own, ops = collections.Counter(), collections.defaultdict(collections.Counter)
    for e in ev:
        p = e.cpu_parent
        while p is not None and not (p.name.startswith("## ") and p.name != "## step"):
            p = p.cpu_parent
        phase = p.name[3:] if p is not None else "(outside a phase)"
        own[phase] += e.self_cpu_time_total
        ops[phase][e.name] += e.self_cpu_time_total
    print(f"PROFILE {total / n / 1e6:.2f} s of self CPU time per step; by phase (share, top operators):")
    for phase, t in own.most_common():
        tops = ", ".join(f"{k} {v / total:.1%}" for k, v in ops[phase].most_common(top) if not k.startswith("## "))
        print(f"PROFILE   {phase:34s} {t / total:6.1%}   {tops}")
    avg = [e for e in prof.key_averages() if not e.key.startswith("## ")]
    mm = sum(e.self_cpu_time_total for e in avg if e.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul"))
    print(f"PROFILE matrix products {mm / total:.0%} of the step's self CPU time; top operators (calls per step):")
    for e in sorted(avg, key=lambda e: -e.self_cpu_time_total)[:15]:
        print(f"PROFILE   {e.key:45s} {e.self_cpu_time_total / total:6.1%}  x{e.count // n}")
"""

PLAIN = PHASES + r"""
import contextlib, json, statistics, sys, time, torch
from torch.profiler import profile, record_function
from transformers import AutoModelForCausalLM, AutoTokenizer
from palu_ds.batch import shift
from palu_ds.data import QADataset, QAOptions, collate
from palu_ds.data.io import load_records
from palu_ds.monitor import peak_memory_bytes, reset_peak_memory
model_dir, tofu, steps, precision, profiled = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
o = QAOptions(max_length=96)
forget = QADataset(load_records(f"{tofu}/forget01.jsonl"), tok, o)
retain = QADataset(load_records(f"{tofu}/retain90.jsonl")[:40], tok, o)
cast = (lambda: torch.autocast("cpu", torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext
rates, prof = [], profile()
reset_peak_memory()
for s in range(steps + profiled):
    if s == steps:
        prof.start()
    with record_function("## step"):
        with record_function("## data"):
            rows = [forget[(4 * s + i) % len(forget)] for i in range(4)] + [retain[(4 * s + i) % len(retain)] for i in range(4)]
            b = collate(rows, tok.pad_token_id)
        t = time.perf_counter()
        with record_function("## forward"), cast():
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        with record_function("## loss"):
            lg, lb = shift(logits.float(), b["labels"])
            loss = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1), ignore_index=-100)
        with record_function("## backward"):
            opt.zero_grad(); loss.backward()
        with record_function("## optimizer step"):
            opt.step()
        rates.append(int(b["attention_mask"].sum()) / (time.perf_counter() - t))
if profiled:
    prof.stop()
    phase_report(prof, profiled)
print("RESULT", json.dumps({"tokens_per_s": statistics.median(rates[2:steps] or rates[-1:]), "peak_rss": peak_memory_bytes()}))
"""

# our step through palu_ds.run (what launch/train.py runs), its phases labelled here (benchmark-side wrappers);
# torch.profiler over optimizer steps WARM+1 .. WARM+N (Hooks: the engine's extension points)
OURS = PHASES + r"""
import functools, sys
from torch.profiler import profile, record_function
import deepspeed.runtime.engine as ds_engine
from palu_ds import engine, lm_head, methods
from palu_ds.reference import readers
WARM, N = int(sys.argv[1]), int(sys.argv[2])
def label(owner, attr, tag):
    f = getattr(owner, attr)
    @functools.wraps(f)
    def labelled(*a, **k):
        with record_function("## " + tag):
            return f(*a, **k)
    setattr(owner, attr, labelled)
for owner, attr, tag in [
        (engine.Trainer, "train_step", "step"), (engine.Trainer, "_next_micro", "data: next micro-batch"),
        (engine.Trainer, "_global_counts", "global counts (all-reduce)"), (engine.Trainer, "_forward", "forward"),
        (lm_head, "lm_logits", "LM head"), (readers.CachedReference, "lookup", "reference lookup"),
        (readers.ResidentReference, "lookup", "reference lookup"), (methods.Method, "terms", "loss terms"),
        (methods.Method, "objective", "objective"), (engine.StepStats, "add", "stats add"),
        (ds_engine.DeepSpeedEngine, "backward", "backward"), (engine.StepStats, "reduce", "stats all-reduce"),
        (engine.Trainer, "_optimizer_step", "optimizer step"), (engine.Trainer, "_scalars", "scalars"),
        (engine.Trainer, "_after_step", "after step (log, checkpoint)")]:
    label(owner, attr, tag)
prof = profile()
class Profiled(engine.Hooks):
    def before_step(self, trainer):
        if trainer.step == WARM:
            prof.start()
    def after_step(self, trainer):
        if trainer.step == WARM + N:
            prof.stop()
            phase_report(prof, N)
from palu_ds.run import main
sys.argv = ["train.py"] + sys.argv[3:]
sys.exit(main("profiled palu_ds step", hooks=Profiled()))
"""


# our step in bf16 with some modules kept in fp32 (keep_fp32, applied before the first step); argv: PATTERNS, the
# operand their products round to bf16 (weight | input | -: none), then launch/train.py's arguments
KEEP_FP32 = r"""
import sys
from benchmarks.real_model_throughput import keep_fp32
from palu_ds import engine
from palu_ds.run import main
class KeepFp32(engine.Hooks):
    kept = None
    def before_step(self, trainer):
        if self.kept is None:
            self.kept = keep_fp32(trainer.engine.module, patterns.split(","), None if rounded == "-" else rounded)
            print(f"kept in fp32: {len(self.kept)} modules ({', '.join(self.kept[:3])}, ...)", flush=True)
patterns, rounded, sys.argv = sys.argv[1], sys.argv[2], ["train.py"] + sys.argv[3:]
sys.exit(main("palu_ds step, bf16 with modules kept in fp32", hooks=KeepFp32()))
"""


def keep_fp32(model, patterns: list[str], rounded: str | None = None) -> list[str]:
    """Run the modules of ``model`` whose names match one of ``patterns`` (fnmatch: ``*.mlp`` matches
    ``model.layers.3.mlp``) outside autocast, their floating-point inputs cast to fp32: their products, forward and
    backward, in fp32 while the rest of the model runs in bf16.  When the output head matches (``lm_head``), so does
    the engine's answer-only head (:func:`palu_ds.lm_head.lm_logits`, which runs the head's weight outside the module).
    ``rounded`` (``weight`` | ``input``): the ``nn.Linear`` products inside the matched modules take that operand
    rounded to bf16 (``w.bfloat16().float()``), the other and the product in fp32 -- which rounding of a bf16 product
    matters (not the engine's answer-only head, which is no module's product).  A pattern that matches no module is
    an error naming it and a few module names.  The matched names, in order."""
    import fnmatch
    import functools

    import torch

    from palu_ds import lm_head

    def to_fp32(x):
        return x.float() if torch.is_tensor(x) and x.is_floating_point() else x

    def in_fp32(f):
        @functools.wraps(f)
        def run(*a, **k):
            with torch.autocast("cpu", enabled=False):
                return f(*map(to_fp32, a), **{n: to_fp32(v) for n, v in k.items()})
        return run

    names = [n for n, _ in model.named_modules() if n]
    for p in patterns:
        if not fnmatch.filter(names, p):
            raise ValueError(f"--fp32-modules: {p!r} matches no module of the model (its modules: "
                             f"{', '.join(names[:4])}, ...)")
    kept = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    modules = dict(model.named_modules())
    linears = {m for n in kept for m in modules[n].modules() if isinstance(m, torch.nn.Linear)}
    for m in linears if rounded else ():  # first: a matched Linear's own wrapper below then runs it outside autocast
        m.forward = functools.partial(_rounded_linear, m, rounded)
    for n in kept:
        modules[n].forward = in_fp32(modules[n].forward)
    if any(modules[n] is lm_head.output_head(model) for n in kept):
        lm_head.lm_logits = in_fp32(lm_head.lm_logits)
    return kept


def _rounded_linear(m, rounded: str, x):
    """``m``'s product in fp32 with one operand (``weight`` | ``input``) rounded to bf16 (:func:`keep_fp32`)."""
    import torch

    w, x = m.weight, x.float()
    if rounded == "weight":
        w = w.to(torch.bfloat16).float()
    else:
        x = x.to(torch.bfloat16).float()
    return torch.nn.functional.linear(x, w, m.bias)


def result(cmd: list[str], threads: int, log: str) -> tuple[dict | None, list[str]]:
    """The ``RESULT`` JSON (None when the command printed none) and the ``PROFILE`` lines of a subprocess."""
    with open(log, "w") as f:
        p = subprocess.run(cmd, cwd=ROOT, env=cpu_env(OMP_NUM_THREADS=str(threads)), stdout=subprocess.PIPE, stderr=f,
                           text=True)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])} failed ({p.returncode}); see {log}")
    lines = p.stdout.splitlines()
    res = [ln for ln in lines if ln.startswith("RESULT ")]
    return (json.loads(res[-1][7:]) if res else None), [ln[8:] for ln in lines if ln.startswith("PROFILE ")]


def train_args(model: str, tofu: str, out: str, method: str, mode: str, ds: str, precision: str,
               steps: int) -> list[str]:
    return ["--deepspeed", ds, f"model.path={model}", f"data.forget.source={tofu}/forget01.jsonl",
            f"data.retain.source={tofu}/retain90.jsonl", "data.max_length=96", f"method.name={method}",
            f"reference.mode={mode}", "train.batch_size=4", f"train.max_steps={steps}", "train.lr=1e-5",
            f"train.precision={precision}", f"train.output_dir={out}", "train.resume=never", "log.log_every=1000"] + (
                [] if "retain" in METHODS[method].batches else ["data.retain=null"])


def rounded_start(model: str, out: str) -> str:
    """A copy of ``model`` (in ``out``, made once) whose floating-point weights are rounded to bf16 and stored as
    fp32: the start of ``--rounded-start``'s control run."""
    if os.path.isfile(os.path.join(out, "model.safetensors")):
        return out
    import torch
    from safetensors.torch import load_file, save_file

    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model, tmp, ignore=shutil.ignore_patterns("*.safetensors"))
    weights = load_file(os.path.join(model, "model.safetensors"))
    save_file({k: v.to(torch.bfloat16).to(v.dtype) if v.is_floating_point() else v for k, v in weights.items()},
              os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    os.replace(tmp, out)
    return out


def train(model: str, tofu: str, out: str, method: str, mode: str, ranks: int, ds: str, precision: str,
          steps: int, fp32_modules: str | None = None, rounded: str | None = None, extra=()) -> dict:
    """One run of launch/train.py (``fp32_modules``: in this process's :data:`KEEP_FP32` instead, 1 process, the
    products of those modules taking the ``rounded`` operand rounded to bf16; ``extra``: more overrides)."""
    args = train_args(model, tofu, out, method, mode, ds, precision, steps) + list(extra)
    cmd = launcher_cmd("launch/train.py", args, ranks) if fp32_modules is None else [
        sys.executable, "-c", KEEP_FP32, fp32_modules, rounded or "-", *args]
    with open(out + ".log", "w") as f:
        p = subprocess.run(cmd, cwd=ROOT,
                           env=cpu_env(OMP_NUM_THREADS="1" if ranks > 1 else "2"), stdout=f, stderr=f)
    if p.returncode:
        raise SystemExit(f"{method} ({mode}, {precision}, {ranks} ranks) failed ({p.returncode}); see {out}.log")
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    rates = [n / t for t, n in zip(s["step_seconds"], s["step_tokens"])]
    for part in ("checkpoints", "model"):  # ~1.6 GiB a run that nothing here reads again
        shutil.rmtree(os.path.join(out, part), ignore_errors=True)
    return {"tokens_per_s": statistics.median(rates[2:] or rates[-1:]), "peak_rss": s["last"]["memory/peak_bytes"],
            "loss": [v for _, v in tb_scalars(out).get("loss/total", [])]}


def variant_runs(a, model: str, ranks: int) -> list[tuple[str, str, str, str, dict]]:
    """The runs beside each method's fp32 and bf16 ones on ``ranks``: ``(precision, variant, folder tag, starting
    model, train() keywords)`` for ``--rounded-start``, ``--bf16-dither``, ``--padded`` (each precision) and each
    ``--fp32-modules`` set (1 process; with each ``--bf16-operand``)."""
    out = []
    if a.rounded_start:
        out.append(("fp32", "start rounded to bf16", "fp32_rounded_start",
                    rounded_start(model, os.path.join(a.out, "model_rounded_to_bf16")), {}))
    if a.bf16_dither:
        out.append(("bf16", "dithered start", "bf16_dither", model, {"extra": ["train.bf16_dither=true"]}))
    out += [(p, "padded rows", f"{p}_padded", model, {"extra": ["train.padding_free=false"]})
            for p in (a.precisions if a.padded else [])]
    for i, patterns in enumerate(a.fp32_modules if ranks == 1 else []):
        for rounded in [None, *a.bf16_operand]:
            out.append(("bf16", f"fp32 modules: {patterns}" + (f", {rounded} rounded to bf16" if rounded else ""),
                        f"bf16_fp32-modules-{i}{rounded or ''}", model,
                        {"fp32_modules": patterns, "rounded": rounded}))
    return out


def precision_label(run: dict) -> str:
    """A run's precision as the tables print it: ``bf16``, ``fp32``, ``fp32 (start rounded to bf16)``, ``bf16 (fp32
    modules: *.mlp)``."""
    return run["precision"] + (f" ({run['variant']})" if run.get("variant") else "")


def is_fp32_twin(run: dict) -> bool:
    """Whether ``run`` is the fp32 run the others' loss curves are compared with (not the rounded-start control)."""
    return run["precision"] == "fp32" and not run.get("variant")


def loss_agreement(runs: list[dict]) -> list[str]:
    """bf16's loss curve (and each variant's: the rounded-start control, the dithered start, each ``--fp32-modules``
    run) against fp32's, per method and ranks: the largest relative difference of the objective over the run's steps
    (issue 29's goal: within 2% over 30 steps)."""
    lines = []
    for r in runs:
        if is_fp32_twin(r) or not r.get("loss"):
            continue
        ref = next((x for x in runs if is_fp32_twin(x) and (x["name"], x["ranks"]) == (r["name"], r["ranks"])), None)
        if ref is None or len(ref.get("loss", [])) != len(r["loss"]):
            continue
        rel = [abs(b - f) / max(abs(f), 1e-8) for f, b in zip(ref["loss"], r["loss"])]
        r["loss_vs_fp32"] = {"max_rel": max(rel), "final_rel": rel[-1], "steps": len(rel)}
        what = precision_label(r)
        lines.append(f"{r['name']}, {r['ranks']} rank(s): {what} objective vs fp32 over {len(rel)} steps: max "
                     f"{max(rel):.2%}, last step {rel[-1]:.2%} (fp32 {ref['loss'][0]:.4f} -> {ref['loss'][-1]:.4f}, "
                     f"{what} {r['loss'][0]:.4f} -> {r['loss'][-1]:.4f})")
    return lines


def reference_modes(method: str, resident: bool) -> list[str]:
    """From the registry: ``none`` for a reference-free method, else precomputed (and resident with --resident)."""
    m = METHODS[method]
    if not m.needed_parts(m.hparams({})):
        return ["none"]
    return ["precomputed", "resident"] if resident else ["precomputed"]


def choices(text: str, valid, what: str) -> list[str]:
    items = [x for x in text.split(",") if x]
    bad = [x for x in items if x not in valid]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"{what} {bad or text!r}: choose from {', '.join(valid)}")
    return items


def parse_args():
    p = bench_parser(__doc__, "runs/bench_real", 8, tofu=True)
    unlearning = [n for n, m in METHODS.items() if m.unlearning]
    p.add_argument("--methods", default="palu,pd_flat,npo", type=lambda s: choices(s, unlearning, "--methods"),
                   help=f"comma-separated, of: {', '.join(unlearning)}")
    p.add_argument("--precisions", default="fp32,bf16", type=lambda s: choices(s, PRECISIONS, "--precisions"))
    p.add_argument("--ranks", default="1,2", type=lambda s: [int(x) for x in choices(s, ("1", "2"), "--ranks")],
                   help="1: one process, ZeRO stage 0; 2: two ranks, ZeRO-3")
    p.add_argument("--one-process-config", default=ONE_PROCESS,
                   help="the DeepSpeed config of the 1-process runs (e.g. ds_configs/cpu/zero2.json)")
    p.add_argument("--resident", action="store_true", help="also the resident reference of methods that need one")
    p.add_argument("--matmul-only", action="store_true", help="only the CPU's matmul rates (2048^3, the model's shapes)")
    p.add_argument("--rounded-start", action="store_true",
                   help="also, per method and ranks, an fp32 run from the weights rounded to bf16 (the control "
                        "for bf16's loss curve)")
    p.add_argument("--bf16-dither", action="store_true",
                   help="also, per method and ranks, a bf16 run from the dithered start (train.bf16_dither)")
    p.add_argument("--padded", action="store_true",
                   help="also each method and precision with right-padded rows (train.padding_free=false)")
    p.add_argument("--fp32-modules", action="append", default=[], metavar="PATTERNS",
                   help="also, per method, a 1-process bf16 run with the modules matching PATTERNS (comma-separated "
                        "fnmatch patterns on module names, e.g. '*.mlp' or '*.self_attn,lm_head') in fp32; repeatable")
    p.add_argument("--bf16-operand", action="append", default=[], choices=("weight", "input"),
                   help="also, per --fp32-modules set, a run whose kept modules' Linear products take this operand "
                        "rounded to bf16 (the other and the product in fp32): which rounding carries bf16's lag")
    p.add_argument("--profile", action="store_true",
                   help="torch.profiler breakdowns of the plain step and of our palu step, by phase")
    a = parse_bench(p)
    if a.rounded_start and "fp32" not in a.precisions:
        p.error("--rounded-start is compared with the fp32 run: add fp32 to --precisions")
    if a.bf16_dither and not {"fp32", "bf16"} <= set(a.precisions):
        p.error("--bf16-dither's run is compared with the fp32 run: it needs --precisions fp32,bf16")
    if a.bf16_operand and not a.fp32_modules:
        p.error("--bf16-operand applies to the --fp32-modules runs: name the modules")
    if a.fp32_modules and not ({"fp32", "bf16"} <= set(a.precisions) and 1 in a.ranks):
        p.error("--fp32-modules runs are bf16 runs of 1 process compared with the fp32 run: they need --precisions "
                "fp32,bf16 and 1 in --ranks")
    return a


def profile(a, model: str, tofu: str) -> None:
    """``--profile``: torch.profiler breakdowns of the plain step and of our step of one method, by phase."""
    method = "palu" if "palu" in a.methods else a.methods[0]
    for prec in a.precisions:
        _, lines = result([sys.executable, "-c", PLAIN, model, tofu, "2", prec, "2"], 2,
                          os.path.join(a.out, f"profile_plain_{prec}.log"))
        print(f"\n== plain step, {prec}\n" + "\n".join(lines))
        out = os.path.join(a.out, f"profile_{method}_{prec}")
        _, lines = result([sys.executable, "-c", OURS, "2", "2", *train_args(
            model, tofu, out, method, reference_modes(method, False)[0], a.one_process_config, prec, 4)], 2,
            out + ".log")
        print(f"\n== our {method} step (1 process, {a.one_process_config}), {prec}\n" + "\n".join(lines))


def main() -> int:
    a = parse_args()
    model, tofu = smollm2(), os.path.abspath(a.tofu)
    from safetensors import safe_open

    with safe_open(os.path.join(model, "model.safetensors"), "pt") as f:  # tied: the embedding counted once
        n_params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    mm, _ = result([sys.executable, "-c", MATMUL], 2, os.path.join(a.out, "matmul.log"))
    for prec, r in mm.items():
        print(f"{prec} matmul rate, GFLOP/s: 2048^3 {r['gflops']:.0f}; at the model's own shapes (768 tokens): "
              + ", ".join(f"{k} {v:.0f}" for k, v in r["shapes"].items()))
    if a.matmul_only:
        return 0
    if a.profile:
        profile(a, model, tofu)
        return 0
    report = {"params": n_params, "matmul": mm, "runs": []}
    plain = {}
    for prec in a.precisions:
        plain[prec], _ = result([sys.executable, "-c", PLAIN, model, tofu, str(a.steps), prec, "0"], 2,
                                os.path.join(a.out, f"plain_{prec}.log"))
        report["runs"].append({"name": "plain transformers + AdamW", "precision": prec, "ranks": 1, **plain[prec]})
    for ranks in a.ranks:
        ds = a.one_process_config if ranks == 1 else TWO_RANKS
        runs = [(prec, None, prec, model, {}) for prec in a.precisions] + variant_runs(a, model, ranks)
        for method in a.methods:
            for mode in reference_modes(method, a.resident):
                name = method + (f", {mode}" if mode != "none" else "")
                for prec, variant, tag, start, kw in runs:
                    out = os.path.join(a.out, f"{method}_{mode}_{tag}_{ranks}")
                    r = train(start, tofu, out, method, mode, ranks, ds, prec, a.steps, **kw)
                    report["runs"].append({"name": name, "precision": prec, "ranks": ranks, "ds_config": ds, **r,
                                           **({"variant": variant} if variant else {})})
    rows = ["| run | precision | ranks | tokens/s | vs plain step (same precision) | MFU vs fp32 / bf16 matmul rate "
            "| peak RSS per rank |", "|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        r["vs_plain"] = r["tokens_per_s"] / plain[r["precision"]]["tokens_per_s"]
        r["mfu"] = {prec: 6 * n_params * r["tokens_per_s"] / (mm[prec]["gflops"] * 1e9) for prec in PRECISIONS}
        rows.append(f"| {r['name']} | {precision_label(r)} | {r['ranks']} | {r['tokens_per_s']:.1f} "
                    f"| {r['vs_plain']:.2f}x | {r['mfu']['fp32']:.0%} / {r['mfu']['bf16']:.0%} "
                    f"| {r['peak_rss'] / 2**30:.2f} GiB |")
    agreement = loss_agreement(report["runs"])
    print(f"\n{n_params / 1e6:.1f}M parameters; matmul 2048^3, 2 threads: fp32 {mm['fp32']['gflops']:.0f}, "
          f"bf16 {mm['bf16']['gflops']:.0f} GFLOP/s\n")
    write_results(a.out, report, "\n".join(rows + [""] + agreement))
    return 0


if __name__ == "__main__":
    sys.exit(main())
