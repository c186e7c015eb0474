"""palu_ds and open-unlearning side by side: same data, same model files, same machine, alternating rounds (issue 29).

    python -m benchmarks.vs_open_unlearning --open-unlearning ../open-unlearning --out runs/bench_ou
    python -m benchmarks.vs_open_unlearning --open-unlearning DIR --rounds 1 --steps 4 --workloads smol   # a smoke run

``--open-unlearning`` is a checkout of github.com/locuslab/open-unlearning at commit d3d7cf9 (the one measured;
``git clone https://github.com/locuslab/open-unlearning && git -C open-unlearning checkout d3d7cf9``).  The script
builds open-unlearning its own virtual environment (``--venv``, default ``<out>/ou_venv``, made once) from the package
registry: its requirements.txt (transformers 4.45.1, ...) with ``torch==2.13.0`` -- the torch palu_ds runs on, pinned
by a constraints file so that pip never pulls another -- instead of its torch 2.4.1 and without bitsandbytes (CUDA
only), plus ``lm-eval`` (its extra; imported at top level) and deepspeed built against that torch.

Pairs come from the registry (``Method.peer``: palu vs its NPO -- open-unlearning has no PALU --, pd_flat vs PDU,
npo vs NPO, grad_diff vs GradDiff).  Workloads (``--workloads``): ``smol`` = SmolLM2-135M-Instruct (``--model``),
1 process; ``tiny`` / ``tiny2`` = a 7.4M-parameter Llama (byte-level BPE with 8,192 tokens trained on TOFU, hidden 256,
4 layers, random init), 1 process / 2 ranks under ZeRO-3.  Data: TOFU forget10 / retain90 (local jsonl), 4 forget +
4 retain rows per rank per step, max length 128, lr 1e-5, AdamW, fp32, no warm-up, no evaluation.  palu_ds runs its
CLI (``ds_configs/cpu/zero0.json`` for 1 process, ``zero3.json`` for 2; reference methods precompute their cache
before step 1, not timed); open-unlearning runs ``src/train.py`` through benchmarks/ou_driver.py with the
adaptations its CPU run needs: ``warmup_epochs: 0`` (it divides by the CUDA device count), ``optim: adamw_torch``,
bf16 off, sdpa attention, ``device_map: cpu``, evaluation off; a copy of the model folder whose config.json carries
``rope_theta`` and ``torch_dtype`` and whose tokenizer loads as ``GPT2Tokenizer`` (what transformers 4.45 reads).

Measured per run: the median over steps 3..N of the step time and of tokens/s (tokens: every real token of the
forget and retain rows, prompt and answer, counted alike on both sides -- open-unlearning's collator masks every pad
token out of attention_mask, and SmolLM2's pad is its eos), and the peak RSS of the training process
(``ru_maxrss`` of the largest process the run waited for, the same on both sides).  Allocator: palu_ds's side runs
on what ``PALU_DS_MALLOC`` asks for (palu_ds.localrun; unset: glibc), open-unlearning's on glibc (``--ou-malloc``);
each run records its own.  Each round runs every pair
palu_ds first then open-unlearning; ``--rounds`` alternate so a noisy neighbour hits both alike.  Threads: 2 for
1 process, 1 per rank for 2.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

from benchmarks.output import write_results
from palu_ds.localrun import cpu_env, free_port, launcher_cmd, malloc_of, shm_buffers
from palu_ds.methods import METHODS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAXRSS = ("import resource,subprocess,sys; r=subprocess.call(sys.argv[1:]); "
          "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True); sys.exit(r)")
OU_COMMIT = "d3d7cf9"
OU_TORCH = "torch==2.13.0"
OU_EXTRA = ["lm-eval==0.4.8"]          # open-unlearning's [lm-eval] extra: src/evals imports it at top level
OU_DROP = ("torch", "bitsandbytes")    # ours instead of its torch 2.4.1; bitsandbytes is CUDA only
WORKLOADS = {"smol": ("smol", 1), "tiny": ("tiny", 1), "tiny2": ("tiny", 2)}


# ---------------------------------------------------------------------------------------------------- environment
def ou_venv(ou: str, venv: str) -> str:
    """open-unlearning's virtual environment (made once; ``<venv>/.installed`` marks a complete one): its python."""
    py = os.path.join(venv, "bin", "python")
    if os.path.isfile(os.path.join(venv, ".installed")):
        return py
    subprocess.run([sys.executable, "-m", "venv", "--clear", venv], check=True)
    constraints = os.path.join(venv, "constraints.txt")
    with open(constraints, "w") as f:
        f.write(OU_TORCH + "\n")
    reqs = os.path.join(venv, "requirements.txt")
    with open(os.path.join(ou, "requirements.txt")) as src, open(reqs, "w") as f:
        f.writelines(line for line in src if line.split("==")[0].strip().lower() not in OU_DROP)
    env = dict(os.environ, PIP_CONSTRAINT=constraints)  # also seen by pip inside isolated builds
    pip = [py, "-m", "pip", "install", "-q"]
    subprocess.run(pip + [OU_TORCH, "setuptools", "wheel", "packaging", "ninja"], check=True, env=env)
    # deepspeed's setup.py imports torch: build it against the one installed, never an isolated other one
    subprocess.run(pip + ["--no-build-isolation", "-r", reqs, *OU_EXTRA], check=True, env=env)
    got = subprocess.run([py, "-c", "import torch; print(torch.__version__)"], check=True, capture_output=True,
                         text=True).stdout.strip()
    if not got.startswith(OU_TORCH.split("==")[1]):
        raise SystemExit(f"{venv}: pip installed torch {got}, not {OU_TORCH}; remove the folder and rerun")
    open(os.path.join(venv, ".installed"), "w").close()
    return py


def ou_model(model: str, out: str) -> str:
    """A copy of ``model`` that transformers 4.45 loads: config.json with ``rope_theta`` (5.x keeps it in
    ``rope_parameters``) and ``torch_dtype``; tokenizer_config.json naming GPT2Tokenizer (5.x writes its own
    backend class) and carrying chat_template.jinja's template.  Weights and tokenizer.json are linked, not copied."""
    dst = os.path.join(out, "ou_models", os.path.basename(os.path.normpath(model)))
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(model):
        if name not in ("config.json", "tokenizer_config.json") and not os.path.exists(os.path.join(dst, name)):
            os.symlink(os.path.abspath(os.path.join(model, name)), os.path.join(dst, name))
    with open(os.path.join(model, "config.json")) as f:
        cfg = json.load(f)
    rope = cfg.get("rope_parameters") or {}
    cfg.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
    cfg.setdefault("torch_dtype", cfg.get("dtype", "float32"))
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    with open(os.path.join(model, "tokenizer_config.json")) as f:
        tok = json.load(f)
    tok["tokenizer_class"] = "GPT2Tokenizer"
    jinja = os.path.join(model, "chat_template.jinja")
    if os.path.isfile(jinja) and "chat_template" not in tok:
        with open(jinja) as f:
            tok["chat_template"] = f.read()
    with open(os.path.join(dst, "tokenizer_config.json"), "w") as f:
        json.dump(tok, f, indent=1)
    return dst


def build_model(tofu: str, out: str) -> str:
    """The tiny Llama (hidden 256, 4 layers, an 8,192-token BPE tokenizer trained on TOFU's QA) in ``out/model``."""
    from palu_ds.data.io import load_records
    from palu_ds.tiny import build_model_dir, qa_texts

    path = os.path.join(out, "model")
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return path
    return build_model_dir(path, qa_texts(load_records(os.path.join(tofu, "full.jsonl"))), vocab_size=8192, seed=0,
                           hidden=256, layers=4, heads=4, intermediate=688, max_positions=512)


# ---------------------------------------------------------------------------------------------------- one run each
def timed(cmd: list[str], threads: int, log: str, cwd: str = ROOT, **env) -> tuple[int, int, str]:
    """Exit code, the peak RSS (bytes) of the largest process ``cmd`` waited for, and its malloc (jemalloc where
    the environment preloads it, else glibc)."""
    env = cpu_env(OMP_NUM_THREADS=str(threads), **env)
    with open(log, "w") as f:
        p = subprocess.run([sys.executable, "-c", MAXRSS, *cmd], cwd=cwd, stdout=subprocess.PIPE, stderr=f, text=True,
                           env=env)
        f.write(p.stdout)
    kb = int(p.stdout.strip().split("MAXRSS_KB")[-1]) if "MAXRSS_KB" in p.stdout else 0
    return p.returncode, kb * 1024, malloc_of(env)


def medians(seconds: list[float], tokens: list[float]) -> dict:
    secs, toks = seconds[2:] or seconds, tokens[2:] or tokens
    return {"s_per_step": statistics.median(secs), "tokens_per_s": statistics.median(t / s for t, s in zip(toks, secs)),
            "steps": len(seconds)}


def palu_run(method: str, nproc: int, model: str, a, tag: str) -> dict:
    m = METHODS[method]
    run_dir = os.path.join(a.out, tag)
    shutil.rmtree(run_dir, ignore_errors=True)
    args = ["--deepspeed", f"ds_configs/cpu/{'zero3' if nproc > 1 else 'zero0'}.json", f"model.path={model}",
            f"data.forget.source={a.tofu}", "data.forget.config=forget10", f"data.retain.source={a.tofu}",
            "data.retain.config=retain90", "data.max_length=128", f"method.name={method}", "train.batch_size=4",
            f"train.max_steps={a.steps}", "train.lr=1e-5", f"train.output_dir={run_dir}", "train.resume=never",
            "train.save_every=0", "log.log_every=100",
            f"reference.mode={'none' if m.is_reference_free else 'precomputed'}",
            f"reference.cache_dir={os.path.join(a.out, 'cache', os.path.basename(model), method)}"]
    rc, rss, malloc = timed(launcher_cmd("launch/train.py", args, nproc, free_port()), 1 if nproc > 1 else 2,
                            run_dir + ".log")
    if rc != 0:
        return {"exit": rc, "log": run_dir + ".log"}
    with open(os.path.join(run_dir, "summary.json")) as f:
        s = json.load(f)
    return {"exit": 0, "peak_rss_mib": rss / 2 ** 20, "malloc": malloc, **medians(s["step_seconds"], s["step_tokens"])}


def ou_overrides(peer: str, peer_args: dict, model: str, chat: bool, a, out_dir: str) -> list[str]:
    o = ["--config-name=unlearn.yaml", "experiment=unlearn/tofu/default", f"trainer={peer}", "task_name=bench",
         f"paths.output_dir={out_dir}", "~eval", "~eval.tofu", "forget_split=forget10", "retain_split=retain90",
         f"model.model_args.pretrained_model_name_or_path={model}", "model.model_args.attn_implementation=sdpa",
         "model.model_args.torch_dtype=float32", "+model.model_args.device_map=cpu",
         f"model.tokenizer_args.pretrained_model_name_or_path={model}",
         "trainer.args.per_device_train_batch_size=4", "trainer.args.gradient_accumulation_steps=1",
         "trainer.args.learning_rate=1e-5", "trainer.args.warmup_epochs=0", "trainer.args.optim=adamw_torch",
         "trainer.args.bf16=false", "trainer.args.bf16_full_eval=false", "trainer.args.do_eval=false",
         "trainer.args.eval_on_start=false", "trainer.args.eval_strategy=no", f"+trainer.args.max_steps={a.steps}",
         "trainer.args.logging_steps=100000", "trainer.args.report_to=none", "+trainer.args.use_cpu=true",
         "trainer.args.save_strategy=no"]
    o += [f"trainer.method_args.{k}={v}" for k, v in peer_args.items()]
    for part, split in (("forget", "forget10"), ("retain", "retain90")):
        key = f"data.{part}.TOFU_QA_{part}.args"
        o += [f"{key}.hf_args.path=json", f"+{key}.hf_args.data_files={os.path.join(a.tofu, split + '.jsonl')}",
              f"~{key}.hf_args.name", f"{key}.max_length=128"]
    if not chat:  # palu_ds's plain format: "Question: {q}\nAnswer: {a}</s>"
        o += ["model.template_args.apply_chat_template=false", "model.template_args.system_prompt_with_special_tokens=",
              "model.template_args.user_start_tag='Question: '", "model.template_args.user_end_tag='\n'",
              "model.template_args.asst_start_tag='Answer: '", "model.template_args.asst_end_tag=''"]
    return o


def ou_run(method: str, nproc: int, model: str, chat: bool, py: str, a, tag: str) -> dict:
    m = METHODS[method]
    run_dir = os.path.join(a.out, tag)
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    times = os.path.join(run_dir, "times.json")
    args = ou_overrides(m.peer, dict(m.peer_args), model, chat, a, run_dir)
    driver = os.path.join(ROOT, "benchmarks", "ou_driver.py")
    if nproc > 1:  # DeepSpeed through its TrainingArguments (use_cpu would make accelerate fall back to DDP)
        args.remove("+trainer.args.use_cpu=true")
        args.append(f"+trainer.args.deepspeed={os.path.join(ROOT, 'ds_configs', 'cpu', 'zero3.json')}")
        port = free_port()
        cmd = [py, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port), driver,
               *args]
    else:
        cmd = [py, driver, *args]
    rc, rss, malloc = timed(cmd, 1 if nproc > 1 else 2, run_dir + ".log", cwd=run_dir, OU_DIR=a.open_unlearning,
                            PALU_DS_MALLOC=a.ou_malloc,  # as its users run it: its launchers preload no allocator
                            OU_TIMES=times, PYTHONPATH=os.path.join(a.open_unlearning, "src"),
                            LOCAL_SIZE=str(nproc),  # its DeepSpeed 0.15's CPU accelerator asks numactl for it otherwise
                            # its DeepSpeed builds its own CPU ops (shm all-reduce, Adam) from its own sources: in
                            # palu_ds's extensions folder they would replace palu_ds's builds with another version's
                            TORCH_EXTENSIONS_DIR=os.path.join(os.path.dirname(os.path.dirname(py)), "torch_extensions"))
    if nproc > 1:  # its DeepSpeed never unlinks its shm all-reduce buffers (66 MB a rank; palu_ds.dist does)
        for f in shm_buffers(port):
            os.remove(f)
    for f in os.listdir(run_dir):  # the model it saves at the end (~0.5 GiB a SmolLM2 run), never read here
        if f.endswith((".safetensors", ".bin")):
            os.remove(os.path.join(run_dir, f))
    if not os.path.isfile(times):
        return {"exit": rc or 1, "log": run_dir + ".log"}
    with open(times) as f:
        t = json.load(f)
    toks = list(t["step_tokens"])
    for r in range(1, nproc):  # every rank's tokens; rank 0's step times
        with open(f"{times}.rank{r}") as f:
            toks = [x + y for x, y in zip(toks, json.load(f)["step_tokens"])]
    if len(t["step_seconds"]) < a.steps:
        return {"exit": rc or 1, "log": run_dir + ".log"}
    return {"exit": 0, "peak_rss_mib": rss / 2 ** 20, "malloc": malloc, **medians(t["step_seconds"], toks)}


# ---------------------------------------------------------------------------------------------------- main
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--open-unlearning", required=True, help=f"a checkout of locuslab/open-unlearning ({OU_COMMIT})")
    p.add_argument("--venv", help="open-unlearning's virtual environment (default <out>/ou_venv; made if missing)")
    p.add_argument("--tofu", default=os.path.join(ROOT, "..", "shared", "data", "tofu"))
    p.add_argument("--model", default=os.path.expanduser("~/.cache/palu_ds/models/SmolLM2-135M-Instruct"))
    p.add_argument("--out", default="runs/bench_ou")
    p.add_argument("--methods", default=",".join(n for n, m in METHODS.items() if m.peer),
                   help="palu_ds methods, each timed against its Method.peer")
    p.add_argument("--workloads", default="smol,tiny,tiny2", help=f"of {sorted(WORKLOADS)}")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--ou-malloc", choices=("system", "jemalloc"), default="system",
                   help="open-unlearning's allocator: system (default, as its launchers run it) or jemalloc (what "
                        "PALU_DS_MALLOC=jemalloc gives palu_ds's side, palu_ds.localrun)")
    a = p.parse_args()
    a.open_unlearning, a.tofu, a.out = (os.path.abspath(x) for x in (a.open_unlearning, a.tofu, a.out))
    a.venv = a.venv and os.path.abspath(a.venv)  # open-unlearning runs in its checkout
    if not os.path.isfile(os.path.join(a.open_unlearning, "src", "train.py")):
        raise SystemExit(f"--open-unlearning {a.open_unlearning}: no src/train.py (clone github.com/locuslab/"
                         f"open-unlearning and check out {OU_COMMIT})")
    methods = a.methods.split(",")
    bad = [m for m in methods if m not in METHODS or not METHODS[m].peer]
    if bad:
        raise SystemExit(f"--methods {bad}: not a method with an open-unlearning peer; valid: "
                         f"{[n for n, m in METHODS.items() if m.peer]}")
    workloads = a.workloads.split(",")
    if set(workloads) - set(WORKLOADS):
        raise SystemExit(f"--workloads {a.workloads}: valid {sorted(WORKLOADS)}")
    os.makedirs(a.out, exist_ok=True)
    py = ou_venv(a.open_unlearning, a.venv or os.path.join(a.out, "ou_venv"))
    models = {}
    for w in workloads:
        kind = WORKLOADS[w][0]
        if kind not in models:
            ours = os.path.abspath(a.model) if kind == "smol" else build_model(a.tofu, a.out)
            models[kind] = (ours, ou_model(ours, a.out), kind == "smol")
    rows = []
    for r in range(a.rounds):
        for w in workloads:
            kind, nproc = WORKLOADS[w]
            ours, theirs, chat = models[kind]
            for method in methods:
                t0 = time.time()
                mine = palu_run(method, nproc, ours, a, f"r{r}_{w}_{method}_palu")
                peer = ou_run(method, nproc, theirs, chat, py, a, f"r{r}_{w}_{method}_ou")
                rows.append({"round": r, "workload": w, "nproc": nproc, "method": method,
                             "peer": METHODS[method].peer, "palu_ds": mine, "open_unlearning": peer})
                print(json.dumps(rows[-1]), f"({time.time() - t0:.0f} s)", flush=True)
    write_results(a.out, {"rows": rows, "open_unlearning_commit": OU_COMMIT}, table(rows))
    return 0 if all(x["palu_ds"]["exit"] == 0 and x["open_unlearning"]["exit"] == 0 for x in rows) else 1


def table(rows: list[dict]) -> str:
    """One line per workload x pair: medians over rounds, the range, and the ratios."""
    lines = ["| workload | palu_ds method | open-unlearning | palu_ds tokens/s | open-unlearning tokens/s | tokens/s "
             "ratio | palu_ds peak RSS | open-unlearning peak RSS | RSS difference | rounds |", "|---" * 10 + "|"]
    keys = dict.fromkeys((x["workload"], x["method"]) for x in rows)
    for w, method in keys:
        sel = [x for x in rows if (x["workload"], x["method"]) == (w, method)]
        ok = [x for x in sel if x["palu_ds"]["exit"] == 0 and x["open_unlearning"]["exit"] == 0]
        if not ok:
            lines.append(f"| {w} | {method} | {sel[0]['peer']} | failed (see the logs) | | | | | | {len(sel)} |")
            continue

        def stat(side, key):
            v = [x[side][key] for x in ok]
            return statistics.median(v), min(v), max(v)

        mt, ot = stat("palu_ds", "tokens_per_s"), stat("open_unlearning", "tokens_per_s")
        mr, orss = stat("palu_ds", "peak_rss_mib"), stat("open_unlearning", "peak_rss_mib")
        ratio = statistics.median(x["palu_ds"]["tokens_per_s"] / x["open_unlearning"]["tokens_per_s"] for x in ok)
        lines.append(f"| {w} | {method} | {sel[0]['peer']} | {mt[0]:.0f} ({mt[1]:.0f}-{mt[2]:.0f}) | "
                     f"{ot[0]:.0f} ({ot[1]:.0f}-{ot[2]:.0f}) | {ratio:.2f}x | {mr[0] / 1024:.2f} GiB "
                     f"({ok[0]['palu_ds'].get('malloc', 'glibc')}) | {orss[0] / 1024:.2f} GiB "
                     f"({ok[0]['open_unlearning'].get('malloc', 'glibc')}) | {(mr[0] - orss[0]) / 1024:+.2f} GiB | "
                     f"{len(ok)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
