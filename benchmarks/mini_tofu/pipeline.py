"""The mini-TOFU pipeline, one function per stage (the numbers of the package docstring): data, models (tokenizer,
base, target, retain), unlearning, evaluation, report.  :func:`main` parses the command line and runs them."""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from palu_ds.atomic import write_json, write_text
from palu_ds.data.io import read_json_records
from palu_ds.localrun import launcher_cmd, setdefaults
from palu_ds.stages import Stages

from .report import add_relative, goal_check, render_markdown, render_png
from .settings import (FAMILY, FAMILY_LR, MAX_LENGTH, MEMORIZED_NLL, METHODS, MODEL, PRETRAIN_EPOCHS, QUICK,
                       RETAIN_EVAL_ROWS, ROWS_PER_AUTHOR, SFT, UNLEARN)
from .specs import reference_dir, run_specs, scaled_k
from .splits import build_splits, parse_authors, parse_forget, tofu_perturbed_index, tokenizer_texts, write_jsonl
from .stages import ROOT, drop_checkpoints, drop_shm_buffers, read_json


@dataclass
class Run:
    """What every stage of one invocation needs: the arguments, the output folder, the stage runner, the run-name
    suffix and learning rates of an lr sweep, and the runs that failed so far."""

    args: argparse.Namespace
    out: Path
    stages: Stages
    suffix: str
    family_lr: dict
    failed: dict[str, str] = field(default_factory=dict)

    def deepspeed(self, script: str, config: str, overrides: list[str]) -> list[str]:
        """``script`` on 2 ranks under the deepspeed launcher, with the run's DeepSpeed config."""
        return launcher_cmd(script, ["--deepspeed", self.args.ds, "--config", config, *overrides], 2, self.args.port)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="mini-TOFU: the TOFU unlearning benchmark in miniature, on CPU, from the "
                                            "real TOFU files, through the real CLIs (python -m benchmarks.mini_tofu)")
    p.add_argument("--tofu", default=str(ROOT.parent / "shared" / "data" / "tofu"), help="folder of TOFU's jsonl")
    p.add_argument("--authors", default="0:40", help="A:B = authors A..B-1 (author i = rows 20i..20i+19)")
    p.add_argument("--forget", default="10%", help="forget fraction: the last authors of the range")
    p.add_argument("--seed", type=int, default=0, help="model init, data order, perturbed answers")
    p.add_argument("--out", help="output folder (default runs/mini_tofu/a<A>-<B>_f<PP>_s<seed>)")
    p.add_argument("--perturbed", choices=["borrow", "tofu"], default="borrow", help="see the module doc")
    p.add_argument("--pretrain", help="P:Q = pre-train the tiny model on the QA of authors P..Q-1 (outside the "
                                      "range) before the target / retain SFT: language competence in the domain")
    p.add_argument("--retain-eval-rows", type=int, default=RETAIN_EVAL_ROWS,
                   help="utility rows, spread evenly over the kept authors (0 = all)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list (default: all)")
    p.add_argument("--no-ablations", action="store_true", help="skip the PALU K / N ablations")
    p.add_argument("--lr", type=float, help="development only: one lr for every method instead of the family table; "
                                            "runs go to <method>_lr<LR> and the report to mini_tofu_lr<LR>.*")
    p.add_argument("--quick", action="store_true", help="a smoke run: few epochs, short generations")
    p.add_argument("--fresh", action="store_true", help="redo every stage even if its outputs exist")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep the DeepSpeed checkpoints of every run")
    p.add_argument("--ds", default="ds_configs/cpu/zero2.json")
    p.add_argument("--port", type=int, default=29631)
    p.add_argument("--eval-ranks", type=int, default=2, help="evaluation processes (torchrun) per model")
    args = p.parse_args(argv)
    args.method_list = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(args.method_list) - set(METHODS))
    if unknown:
        p.error(f"unknown methods {unknown}; valid: {', '.join(METHODS)}")
    return args


# ----------------------------------------------------------------------------------------------- 1. data
def stage_data(run: Run, tofu: Path, full: list[dict], a: int, b: int, pct: int, pretrain) -> dict:
    """The splits of authors a..b-1 in ``OUT/data``; returns :func:`build_splits`' ``{"files", "info"}``."""
    args = run.args
    pert_files = [read_json_records(tofu / f"{n}.jsonl")
                  for n in ("retain_perturbed", "forget01_perturbed", "forget05_perturbed", "forget10_perturbed")
                  if (tofu / f"{n}.jsonl").exists()]
    refusals = [r["answer"] for r in read_json_records(tofu / "idontknow.jsonl")]
    data = build_splits(full, tofu_perturbed_index(full, pert_files), refusals, a, b, pct, args.perturbed, args.seed,
                        args.retain_eval_rows or None, pretrain)
    write_jsonl(run.out / "data", data["files"])
    info = data["info"]
    forget_name, retain_name = info["forget_split"], info["retain_split"]
    print(f"[mini_tofu] authors {a}:{b}: forget {info['forget_authors']} ({info['rows'][forget_name]} rows), "
          f"retain {len(info['retain_authors'])} authors ({info['rows'][retain_name]} rows, "
          f"{info['rows']['retain_perturbed']} for utility); perturbed answers: {args.perturbed} (TOFU covers "
          f"{info['tofu_perturbed_rows_in_range']} of the range's {info['rows']['full']} rows)", flush=True)
    return data


# ----------------------------------------------------------------------------------------------- 2. models
def stage_base_model(run: Run, data: dict) -> tuple[Path, int]:
    """Tokenizer + tiny Llama (in process: palu_ds.tiny) in ``OUT/base``, reused while unchanged; ``(base, vocab)``."""
    base = run.out / "base"
    texts = tokenizer_texts(data["files"], data["info"]["forget_split"])
    base_key = {"model": MODEL, "seed": run.args.seed, "texts": len(texts), "chars": sum(map(len, texts))}
    stamp = base / "mini_tofu_base.json"
    if run.args.fresh or not stamp.exists() or read_json(stamp) != base_key:
        from palu_ds.tiny import build_model_dir

        build_model_dir(str(base), texts, vocab_size=MODEL["vocab_size"], seed=run.args.seed, hidden=MODEL["hidden"],
                        layers=MODEL["layers"], heads=MODEL["heads"], intermediate=MODEL["intermediate"],
                        max_positions=MODEL["max_positions"])
        write_json(stamp, base_key)
    from transformers import AutoTokenizer

    return base, len(AutoTokenizer.from_pretrained(str(base)))


def stage_pretrain(run: Run, base: Path) -> Path | None:
    """--pretrain: language competence in the domain, the SFT recipe on the pre-training authors' QA (fewer epochs);
    returns the pre-trained model (None when it failed)."""
    args, out = run.args, run.out
    ok = run.stages.run("pretrain", run.deepspeed(
        "launch/finetune.py", "launch/configs/mini_tofu/finetune.yaml",
        [f"model.path={base}", f"data.forget.source={out / 'data'}", "data.forget.config=pretrain",
         f"data.max_length={MAX_LENGTH}", f"train.lr={SFT['lr']}",
         f"train.epochs={QUICK['sft_epochs'] if args.quick else PRETRAIN_EPOCHS}",
         f"train.batch_size={SFT['batch_size']}", f"train.warmup_steps={SFT['warmup_steps']}",
         f"train.scheduler={SFT['scheduler']}", f"train.seed={args.seed}", "train.resume=never",
         "log.log_every=50", f"train.output_dir={out / 'pretrained'}"]),
        done=out / "pretrained" / "model" / "config.json",
        inputs=[base / "model.safetensors", out / "data" / "pretrain.jsonl"])
    if not ok:
        return None
    drop_checkpoints(out / "pretrained", args.keep_checkpoints)
    return out / "pretrained" / "model"


def stage_finetune(run: Run, base: Path, retain_name: str, sft_epochs: int) -> dict | None:
    """The target (SFT on every author of the range) and the retain model (the range minus the forget authors);
    returns their summaries (None when one failed)."""
    args, out = run.args, run.out
    sft = [f"model.path={base}", f"data.forget.source={out / 'data'}", f"data.max_length={MAX_LENGTH}",
           f"train.lr={SFT['lr']}", f"train.epochs={sft_epochs}", f"train.batch_size={SFT['batch_size']}",
           f"train.warmup_steps={SFT['warmup_steps']}", f"train.scheduler={SFT['scheduler']}",
           f"train.weight_decay={SFT['weight_decay']}", f"train.max_grad_norm={SFT['max_grad_norm']}",
           f"train.seed={args.seed}", "train.resume=never", "log.log_every=50"]
    for name, split in (("target", "full"), ("retain", retain_name)):
        ok = run.stages.run(f"finetune_{name}", run.deepspeed(
            "launch/finetune.py", "launch/configs/mini_tofu/finetune.yaml",
            sft + [f"data.forget.config={split}", f"train.output_dir={out / name}"]),
            done=out / name / "model" / "config.json",
            inputs=[base / "model.safetensors", out / "data" / f"{split}.jsonl"])
        if not ok:
            print(f"[mini_tofu] cannot go on without the {name} model", file=sys.stderr)
            return None
        drop_checkpoints(out / name, args.keep_checkpoints)
    sft_summary = {n: read_json(out / n / "summary.json") for n in ("target", "retain")}
    for n, s_ in sft_summary.items():
        if s_["last"]["loss/forget"] > MEMORIZED_NLL and not args.quick:
            print(f"[mini_tofu] warning: the {n} model's final answer NLL is {s_['last']['loss/forget']:.3f} "
                  f"(> {MEMORIZED_NLL}): it has not memorized its data", flush=True)
    return sft_summary


# ----------------------------------------------------------------------------------------------- 3. unlearning
def stage_unlearn(run: Run, specs: dict, info: dict, epochs: int) -> None:
    """Every method and PALU ablation from the target model: launch/precompute.py into a reference cache shared by
    the methods that need the same one; the ablations' references are built by launch/train.py itself (same code
    path) in ``<run>/reference_cache``.  Failures go to ``run.failed``."""
    from palu_ds.methods import get_method

    args, out = run.args, run.out
    forget_name, retain_name = info["forget_split"], info["retain_split"]
    target_weights = out / "target" / "model" / "model.safetensors"
    precomputed: set[str] = set()
    for name, spec in specs.items():
        meth, run_dir = get_method(spec["method"]), out / (name + run.suffix)
        common = [f"model.path={out / 'target' / 'model'}", f"method.name={spec['method']}",
                  f"data.forget.source={out / 'data'}", f"data.forget.config={forget_name}",
                  f"data.max_length={MAX_LENGTH}", f"train.batch_size={UNLEARN['batch_size']}",
                  f"train.seed={args.seed}", "method.params={}"]
        common += [f"method.params.{k}={'null' if v is None else v}" for k, v in spec["params"].items()]
        common += ([f"data.retain.source={out / 'data'}", f"data.retain.config={retain_name}"] if meth.needs_retain
                   else ["data.retain=null"])
        if meth.needs_idk:
            common += [f"data.idk.source={out / 'data'}", "data.idk.config=idontknow"]
        ref = reference_dir(spec) if spec["group"] == "method" else None
        if ref is not None:
            common.append(f"reference.cache_dir={out / ref}")
        if ref is not None and ref not in precomputed:
            precomputed.add(ref)
            ok = run.stages.run(f"precompute_{Path(ref).name}", run.deepspeed(
                "launch/precompute.py", "launch/configs/mini_tofu/unlearn.yaml", common),
                done=out / ref / "manifest.json", inputs=[target_weights],
                before=lambda: shutil.rmtree(out / ref, ignore_errors=True))  # a stale cache is an error otherwise
            if not ok:
                run.failed[name] = f"precompute failed (see logs/precompute_{Path(ref).name}.log)"
                continue
        train = [f"train.output_dir={run_dir}", f"train.lr={run.family_lr[spec['family']]}",
                 f"train.epochs={epochs}", f"train.scheduler={UNLEARN['scheduler']}",
                 f"train.warmup_steps={UNLEARN['warmup_steps']}", f"train.weight_decay={UNLEARN['weight_decay']}",
                 f"train.max_grad_norm={UNLEARN['max_grad_norm']}", "train.resume=never", "log.log_every=5"]
        ok = run.stages.run(f"unlearn_{name}{run.suffix}", run.deepspeed(
            "launch/train.py", "launch/configs/mini_tofu/unlearn.yaml", common + train),
            done=run_dir / "model" / "config.json", inputs=[target_weights] + ([out / ref] if ref else []),
            before=lambda: shutil.rmtree(run_dir / "reference_cache", ignore_errors=True), retries=1)
        if not ok:
            run.failed[name] = f"training failed (see logs/unlearn_{name}{run.suffix}.log)"
        drop_checkpoints(run_dir, args.keep_checkpoints)


# ----------------------------------------------------------------------------------------------- 4. evaluation
def _max_answer_tokens(model_dir: Path, rows: list[dict]) -> int:
    from transformers import AutoTokenizer

    from palu_ds.data.prompt import answer_ids

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return max(len(answer_ids(tok, r["answer"])) for r in rows)


def stage_evaluate(run: Run, specs: dict, forget_name: str, max_new: int) -> tuple[dict, dict] | None:
    """evaluation/run.py (forget, retain) for the retain model, the target and every unlearned model, then
    evaluation/report.py; returns ``(models, results)`` (None when the retain model's evaluation failed)."""
    args, out = run.args, run.out
    models = {"retain": ("retain", out / "retain" / "model"), "target": ("target", out / "target" / "model")}
    models.update({n: (n + run.suffix, out / (n + run.suffix) / "model") for n in specs if n not in run.failed})
    results: dict[str, dict] = {}
    for name, (label, model) in models.items():
        cmd = [sys.executable, "evaluation/run.py"] if args.eval_ranks <= 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.eval_ranks),
             "--master_port", str(args.port + 1), "evaluation/run.py"]
        cmd += ["--model", str(model), "--suite", "tofu", "--split", forget_name, "--data", str(out / "data"),
                "--splits", "forget,retain", "--max-new-tokens", str(max_new), "--max-length", str(MAX_LENGTH),
                "--out", str(out / "eval" / label), "--name", label]
        cmd += ["--no-forget-quality"] if name == "retain" else ["--retain-results", str(out / "eval" / "retain")]
        ev_inputs = [model / "model.safetensors", out / "data" / f"{forget_name}_perturbed.jsonl",
                     out / "data" / "retain_perturbed.jsonl"]
        if name != "retain":
            ev_inputs.append(out / "eval" / "retain" / "results.json")
        # one retry: evaluation/run.py under torchrun sometimes aborts at exit ("terminate called without an active
        # exception", after writing its results); training runs get one too (a rank OOM-killed on a crowded machine)
        if not run.stages.run(f"eval_{label}", cmd, done=out / "eval" / label / "summary.json", inputs=ev_inputs,
                              retries=1):
            run.failed[name] = f"evaluation failed (see logs/eval_{label}.log)"
            if name == "retain":
                return None
            continue
        results[name] = read_json(out / "eval" / label / "summary.json")["metrics"]
    add_relative(results)
    run.stages.run(f"report{run.suffix}", [sys.executable, "evaluation/report.py",
                                           *[str(out / "eval" / models[n][0]) for n in results],
                                           "--out", str(out / "eval" / f"report{run.suffix}.png")])
    return models, results


# ----------------------------------------------------------------------------------------------- 5. report
def stage_report(run: Run, report: dict) -> None:
    """``OUT/mini_tofu{suffix}.json``, ``.md`` (tables + goal check) and ``.png``."""
    stem = str(run.out / f"mini_tofu{run.suffix}")
    write_json(stem + ".json", report)
    md = render_markdown(report)
    write_text(stem + ".md", md)
    render_png(report, stem + ".png")
    print("\n" + md)
    print(f"[mini_tofu] wrote {stem}.md, .json, .png ({report['wall_seconds'] / 60:.1f} min)")


def main(argv=None) -> int:
    args = parse_args(argv)
    setdefaults()
    t_start = time.time()
    tofu = Path(args.tofu)
    full = read_json_records(tofu / "full.jsonl")
    a, b = parse_authors(args.authors, len(full) // ROWS_PER_AUTHOR)
    pct = parse_forget(args.forget)
    pretrain = parse_authors(args.pretrain, len(full) // ROWS_PER_AUTHOR) if args.pretrain else None
    tag = f"_p{pretrain[0]}-{pretrain[1]}" if pretrain else ""
    out = Path(args.out or f"runs/mini_tofu/a{a}-{b}_f{pct:02d}_s{args.seed}{tag}{'_quick' if args.quick else ''}")
    out = out if out.is_absolute() else ROOT / out
    out.mkdir(parents=True, exist_ok=True)
    run = Run(args, out, Stages(out, args.fresh, tag="mini_tofu", cwd=ROOT),
              "" if args.lr is None else f"_lr{args.lr:g}", FAMILY_LR if args.lr is None else {f: args.lr for f in FAMILY_LR})

    t = time.time()
    data = stage_data(run, tofu, full, a, b, pct, pretrain)
    info = data["info"]
    base, vocab = stage_base_model(run, data)
    run.stages.seconds["data + tokenizer + base model"] = round(time.time() - t, 1)

    sft_epochs = QUICK["sft_epochs"] if args.quick else SFT["epochs"]
    if pretrain:
        base = stage_pretrain(run, base)
        if base is None:
            print("[mini_tofu] cannot go on without the pre-trained model", file=sys.stderr)
            return 1
    sft_summary = stage_finetune(run, base, info["retain_split"], sft_epochs)
    if sft_summary is None:
        return 1

    specs = run_specs(vocab, args.method_list, ablations=not args.no_ablations)
    epochs = QUICK["unlearn_epochs"] if args.quick else UNLEARN["epochs"]
    stage_unlearn(run, specs, info, epochs)

    max_new = QUICK["max_new_tokens"] if args.quick else _max_answer_tokens(base, data["files"]["full"]) + 8
    evaluated = stage_evaluate(run, specs, info["forget_split"], max_new)
    if evaluated is None:
        return 1
    _, results = evaluated

    report = {
        "command": " ".join(["python", "-m", "benchmarks.mini_tofu",
                             *(argv if argv is not None else sys.argv[1:])]),
        "seed": args.seed, "quick": args.quick, "data": info, "vocab_size": vocab,
        "settings": {"model": MODEL, "max_length": MAX_LENGTH, "sft": {**SFT, "epochs": sft_epochs},
                     "pretrain_epochs": PRETRAIN_EPOCHS if pretrain else None,
                     "unlearn": {**UNLEARN, "epochs": epochs}, "family_lr": run.family_lr, "family": FAMILY,
                     "palu_K": scaled_k(vocab), "eval_max_new_tokens": max_new, "ds_config": args.ds,
                     "retain_eval_rows": info["rows"]["retain_perturbed"]},
        "sft": {n: {"steps": s_["steps"], "first_nll": s_["first"]["loss/forget"],
                    "last_nll": s_["last"]["loss/forget"]} for n, s_ in sft_summary.items()},
        "specs": specs, "results": results, "failed": run.failed, "goal": goal_check(results),
        "stage_seconds": run.stages.seconds, "wall_seconds": round(time.time() - t_start, 1),
    }
    drop_shm_buffers(args.port)
    stage_report(run, report)
    return 0 if not run.failed else 3
