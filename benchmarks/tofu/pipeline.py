"""The stages, written once for every preset (numbers as in the package doc): data, models, evaluation of the
retain model / base / target, each run's reference + unlearning + evaluation at its family's lr, the NLL by position
kind, the report.  :class:`Run` assembles every command; :func:`main` parses the command line."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

from palu_ds.atomic import write_json, write_text
from palu_ds.localrun import launcher_cmd, setdefaults
from palu_ds.process import refusing
from palu_ds.stages import Stages

from . import data as D
from .preset import ROOT, load, repo_path
from .report import add_relative, render_markdown, render_png
from .specs import batch_sources, reference_dir, run_lr, run_specs


def read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def content_key(*parts) -> str:
    """16 hex digits of a sha256 over JSON-encoded parts (the cache key of an SFT model)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


class Run:
    """One invocation: the preset, the output folder, the stage runner, the data's info, the commands every model
    goes through (SFT, reference, unlearning, evaluation) and, after :func:`setup`, the base model, its tokenizer,
    the runs and the SFT models."""

    def __init__(self, preset: dict, out: Path, args: argparse.Namespace, info: dict, argv=None):
        self.p, self.out, self.args, self.info, self.argv = preset, out, args, info, argv
        self.stages = Stages(out, args.fresh, tag=preset["report"], cwd=ROOT)
        self.labels = repo_path(preset["spans"]["labels"])
        self.failed: dict[str, str] = {}
        self.t0 = time.time()

    def launch(self, script: str, config: str, overrides: list[str]) -> list[str]:
        """``script`` on the preset's ranks (the deepspeed launcher above one) with its DeepSpeed config."""
        return launcher_cmd(script, ["--deepspeed", self.p["ds_config"], "--config", config, *overrides],
                            self.p["ranks"], self.args.port)

    def recipe(self, section: str) -> list[str]:
        return [f"train.{k}={v}" for k, v in self.p[section].items()]

    def drop(self, folder: Path) -> None:
        """``folder`` (a run's checkpoints, a model no one reads) removed unless ``--keep-checkpoints``."""
        if not self.args.keep_checkpoints:
            shutil.rmtree(folder, ignore_errors=True)

    def sft(self, name: str, base: Path, base_digest: str, split: str, epochs=None) -> Path | None:
        """SFT of ``base`` on ``OUT/data/<split>.jsonl`` into ``OUT/models/<name>-<key>``, key = sha256 of (base,
        rows, recipe): a rerun (or another ``--out`` sharing the folder) with the same three skips it."""
        rows = (self.out / "data" / f"{split}.jsonl").read_text(encoding="utf-8")
        recipe = self.recipe("sft") + ([f"train.epochs={epochs}"] if epochs else []) + [
            f"data.max_length={self.p['max_length']}", f"train.seed={self.p['seed']}", "train.resume=never",
            "log.log_every=10"]
        mdir = self.out / "models" / f"{name}-{content_key(base_digest, rows, recipe)}"
        cmd = self.launch("launch/finetune.py", self.p["configs"]["sft"], [
            f"model.path={base}", f"data.forget.source={self.out / 'data'}", f"data.forget.config={split}",
            f"train.output_dir={mdir}", *recipe])
        if not self.stages.run(f"sft_{name}", cmd, done=mdir / "model" / "config.json"):
            return None
        self.drop(mdir / "checkpoints")
        return mdir / "model"

    def method_overrides(self, spec: dict, target: Path, data: Path, labels: Path | None = None) -> list[str]:
        """Model, method, parameters and data of a run (its forget batch from PALU's labels for ``spans: labels``:
        ``labels``, default the preset's ``spans.labels``)."""
        out = [f"model.path={target}", f"method.name={spec['method']}", "method.params={}",
               f"data.max_length={self.p['max_length']}", f"train.seed={self.p['seed']}",
               f"train.batch_size={self.p['unlearn']['batch_size']}", *batch_sources(spec, self.info, data)]
        out += [f"method.params.{k}={'null' if v is None else v}" for k, v in spec["params"].items()]
        if spec["spans"] == "labels":
            out += [f"data.forget.source={labels or self.labels}", "data.forget.config=null",
                    "data.span_source=labels"]
        elif spec["spans"] == "detector":
            out.append("data.span_source=detector")
        return out

    def unlearn(self, stage: str, spec: dict, target: Path, data: Path, run_dir: Path, lr: float, extra=(),
                done: Path | None = None, labels: Path | None = None, script: str = "launch/train.py") -> bool:
        """``spec``'s method on ``target`` at ``lr`` into ``run_dir`` (stage ``stage``) after its reference cache
        (``launch/precompute.py`` once per target, shared by the runs of one key); ``extra``: more overrides (e.g. the
        in-run evaluation), ``done``: the file that marks it finished (default the saved model)."""
        common, rel = self.method_overrides(spec, target, data, labels), reference_dir(spec)
        ref = run_dir.parent.parent / rel if rel else None
        precompute = self.launch("launch/precompute.py", self.p["configs"]["unlearn"],
                                 common + [f"reference.cache_dir={ref}"])
        # the folder is shared by the methods of one reference key (its name), so the method's own overrides do not
        # decide it: another method of the key reuses it instead of rewriting it under the runs that read it
        if ref and not self.stages.run("precompute_" + str(ref.relative_to(self.out)).replace("/", "-"), precompute,
                                       done=ref / "manifest.json", inputs=[target / "model.safetensors", data],
                                       before=lambda: shutil.rmtree(ref, ignore_errors=True),  # stale: refused
                                       decides=lambda cmd: [a for a in cmd if not a.startswith("method.")]):
            return False
        cmd = self.launch(script, self.p["configs"]["unlearn"], common + self.recipe("unlearn") + [
            f"train.output_dir={run_dir}", f"train.lr={lr}", "train.resume=never", "log.log_every=5",
            f"reference.cache_dir={ref}" if ref else "reference.mode=none", *extra])
        ok = self.stages.run(stage, cmd, done=done or run_dir / "model" / "config.json",
                             inputs=[target / "model.safetensors", data] + ([ref] if ref else []), retries=1)
        self.drop(run_dir / "checkpoints")
        return ok

    def evaluate(self, stage: str, model: Path, folder: Path, name: str) -> dict | None:
        """TOFU evaluation (the preset's parts) of ``model`` on ``folder/data`` into
        ``folder/eval/<name>``, forget quality against ``folder/eval/retain`` (none for the retain model itself).  Its
        metrics, or None."""
        e, data, out = self.p["eval"], folder / "data", folder / "eval" / name
        retain_eval = None if name == "retain" else folder / "eval" / "retain"
        cmd = launcher_cmd("palu_eval/run.py", [
            "--model", str(model), "--suite", "tofu", "--split", self.info["forget_split"], "--data", str(data),
            "--splits", ",".join(e["parts"]), "--dtype", e["dtype"], "--max-new-tokens", str(self.max_new),
            "--max-length", str(self.p["max_length"]), "--out", str(out), "--name", out.name,
            *(["--no-forget-quality"] if retain_eval is None else ["--retain-results", str(retain_eval)])],
            e["ranks"], self.args.port + 1, torchrun=True)
        inputs = [model / "model.safetensors", data / f"{self.info['forget_split']}_perturbed.jsonl"]
        # one retry: palu_eval/run.py under torchrun sometimes aborts at exit after writing its results
        if not self.stages.run(stage, cmd, done=out / "summary.json",
                               inputs=inputs + ([retain_eval] if retain_eval else []), retries=1):
            return None
        return read_json(out / "summary.json")["metrics"]


# ------------------------------------------------------------------------------------------------ the stages
def stage_base(run: Run, data: dict) -> Path:
    """The base model: a tiny Llama and tokenizer built from the data's text in ``OUT/base`` (reused while its
    settings and text are unchanged), a ``palu_ds.models.fetch`` name, or a folder."""
    m = run.p["model"]
    if m["path"]:
        return repo_path(m["path"])
    if m["fetch"]:
        from palu_ds.models import fetch

        return Path(fetch(m["fetch"]))
    base = run.out / "base"
    texts = D.tokenizer_texts(data["files"], data["info"]["forget_split"])
    key = {"model": m["tiny"], "seed": run.p["seed"], "texts": len(texts), "chars": sum(map(len, texts))}
    stamp = base / "tofu_base.json"
    if run.args.fresh or not stamp.exists() or read_json(stamp) != key:
        from palu_ds.tiny import build_model_dir

        build_model_dir(str(base), texts, seed=run.p["seed"], **m["tiny"])
        write_json(stamp, key)
    return base


def stage_models(run: Run, base: Path) -> dict[str, Path] | None:
    """The target (SFT on its split) and the retain model (SFT on the retain split) from the base, pre-trained
    first on a ``pretrain`` file when the data has one; None when one failed."""
    from palu_ds.reference import model_fingerprint

    digest = model_fingerprint(str(base))
    if (run.out / "data" / "pretrain.jsonl").exists():
        base = run.sft("pretrained", base, digest, "pretrain", epochs=run.p["pretrain_epochs"])
        if base is None:
            return None
        digest = model_fingerprint(str(base))
    models = {}
    for name in ("target", "retain"):
        models[name] = run.sft(name, base, digest, run.info[f"{name}_split"])
        if models[name] is None:
            print(f"[{run.p['report']}] cannot go on without the {name} model", file=sys.stderr)
            return None
    return models


def stage_evaluate(run: Run, name: str, model: Path, results: dict, pair: str | None = None) -> bool:
    """``eval_[<pair>_]<name>``: ``model`` on ``OUT/[<pair>/]data`` into ``results[name]``, forget quality against
    the retain model's there; False (named in ``run.failed``) when it failed."""
    d, stage = (run.out / pair, f"eval_{pair}_{name}") if pair else (run.out, f"eval_{name}")
    m = run.evaluate(stage, model, d, name)
    if m is None:
        run.failed[f"{pair} {name}" if pair else name] = f"evaluation failed (see logs/{stage}.log)"
        return False
    results[name] = m
    return True


def stage_position_nll(run: Run, models: dict[str, Path], base: Path, labels: Path | None = None) -> dict:
    """Answer NLL by position kind (I_init / rest of span / common) on PALU's labelled forget set (``labels``,
    default the preset's)."""
    from transformers import AutoTokenizer

    from benchmarks.position_nll import position_nll
    from palu_ds.data import QADataset
    from palu_ds.data.qa import QAOptions

    t = time.time()
    ds = QADataset.from_source(str(labels or run.labels), AutoTokenizer.from_pretrained(str(base)),
                               QAOptions(max_length=run.p["max_length"], n_init=3, span_source="labels"))
    out = {n: position_nll(str(m), ds) for n, m in models.items()}
    run.stages.seconds["position NLL"] = run.stages.seconds.get("position NLL", 0) + round(time.time() - t, 1)
    return out


def stage_runs(run: Run, specs: dict, models: dict, family_lr: dict, results: dict) -> dict[str, Path]:
    """Each run's reference, unlearning and evaluation in turn (an interrupted invocation leaves its finished runs
    evaluated); the unlearned models."""
    done = {}
    for name, spec in specs.items():
        run_dir = run.out / "unlearn" / name
        if not run.unlearn(f"unlearn_{name}", spec, models["target"], run.out / "data", run_dir,
                           run_lr(spec, run.p, family_lr)):
            run.failed[name] = f"training failed (see logs/unlearn_{name}.log)"
            continue
        done[name] = run_dir / "model"
        stage_evaluate(run, name, done[name], results)
    return done


def setup(preset: dict, args: argparse.Namespace, data: dict, argv=None) -> Run | None:
    """Stages 1 and 2: threads, ``OUT`` and its data, ``run.base``, ``.tok``, ``.specs``, ``.models`` (the SFT models)
    and ``.max_new``; None when an SFT failed."""
    from transformers import AutoTokenizer

    from palu_ds.data.prompt import answer_ids

    setdefaults()
    if preset["threads"]:
        os.environ["OMP_NUM_THREADS"] = str(os.cpu_count() if preset["threads"] == "all" else preset["threads"])
    run = Run(preset, ROOT / (args.out or f"runs/tofu/{preset['name']}"), args, data["info"], argv)
    D.write_jsonl(run.out / "data", data["files"])
    print(f"[{preset['report']}] forget {run.info['forget_split']}: rows {run.info['rows']}", flush=True)
    run.base = stage_base(run, data)
    run.tok = AutoTokenizer.from_pretrained(str(run.base))
    run.specs = run_specs(run.p, len(run.tok))
    run.models = stage_models(run, run.base)
    if run.models is None:
        return None
    run.max_new = run.p["eval"]["max_new_tokens"] or max(
        len(answer_ids(run.tok, r["answer"])) for r in data["files"][data["info"]["target_split"]]) + 8
    return run


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tofu", description="The TOFU unlearning benchmark, one "
                                "pipeline for every preset: data, SFT target and retain models, every method (and "
                                "the preset's ablations), TOFU evaluation, report.")
    p.add_argument("--preset", required=True, help="mini | real | a preset YAML file of your own")
    p.add_argument("--out", help="output folder (default runs/tofu/<preset>)")
    p.add_argument("--data", help="folder of TOFU's jsonl files (default: the preset's data.tofu)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset key, e.g. --set sft.epochs=6 --set 'methods=[palu, npo]'")
    p.add_argument("--fresh", action="store_true", help="redo every stage even if its outputs exist")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep the DeepSpeed checkpoints of every run")
    p.add_argument("--port", type=int, default=29631)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)  # a bad preset or data file: its message, status 2
    return refusing(lambda: run_preset(args, argv), (ValueError, FileNotFoundError))


def run_preset(args: argparse.Namespace, argv=None) -> int:
    """The preset's data, :func:`setup`, then :func:`run_stages` or, for a preset with a ``protocol`` section,
    :func:`.protocol.run_protocol`; 0 when every run succeeded, 3 when one failed, 1 when it could not go on."""
    preset = load(args.preset, args.set, args.data)
    if preset["protocol"]["dev"]:
        from .protocol import protocol_data, run_protocol as stages

        data = protocol_data(preset)
    else:
        stages, data = run_stages, D.build(preset["data"], repo_path(preset["data"]["tofu"]), preset["seed"])
    run = setup(preset, args, data, argv)
    return 1 if run is None else stages(run, data)


def run_stages(run: Run, data: dict) -> int:
    """Stages 3 to 7 (module doc) after :func:`setup`."""
    preset, results, base, specs, models = run.p, {}, run.base, run.specs, run.models
    evals = {"retain": models["retain"], **({"base": base} if preset["eval"]["base"] else {}),
             "target": models["target"]}
    for name, model in evals.items():
        if not stage_evaluate(run, name, model, results) and name in ("retain", "target"):
            return 1  # every forget quality needs the retain model's; mu_rel the target's
    family_lr = dict(preset["lr"]["table"]) if preset["lr"]["choice"] == "table" else {}
    evals.update(stage_runs(run, specs, models, family_lr, results))
    add_relative(results)
    pos = stage_position_nll(run, {n: m for n, m in evals.items() if n in results}, base) \
        if preset["eval"]["position_nll"] and run.labels else {}
    return write_report(run, {
        "family_lr": family_lr, "default_lr": preset["lr"]["value"] or preset["sft"]["lr"],
        "unlearn_lr": {n: run_lr(s, preset, family_lr) for n, s in specs.items()},
        "sft": {n: sft_summary(m) for n, m in models.items()}, "results": results, "position_nll": pos})


def sft_summary(model: Path) -> dict:
    s = read_json(model.parent / "summary.json")
    return {"steps": s["steps"], "first_nll": s["first"]["loss/forget"], "last_nll": s["last"]["loss/forget"]}


def write_report(run: Run, numbers: dict, markdown=render_markdown, png=render_png) -> int:
    """``OUT/<report>.json`` (``numbers`` and the settings, models, runs, failures, stage seconds), ``.md`` and
    ``.png`` by the renderers ``markdown`` / ``png``; 0 when every run succeeded, 3 when one failed."""
    argv = sys.argv[1:] if run.argv is None else run.argv
    report = {"command": " ".join(["python", "-m", "benchmarks.tofu", *argv]), "preset": run.p,
              "base_model": str(run.base), "data": run.info, "vocab_size": len(run.tok), "max_new_tokens": run.max_new,
              "sft_models": {n: str(m.parent) for n, m in run.models.items()}, "specs": run.specs, **numbers,
              "failed": run.failed, "stage_seconds": run.stages.seconds, "stage_status": run.stages.status,
              "wall_seconds": round(time.time() - run.t0, 1)}
    stem = run.out / run.p["report"]
    write_json(f"{stem}.json", report)
    md = markdown(report)
    write_text(f"{stem}.md", md)
    png(report, f"{stem}.png")
    print("\n" + md)
    print(f"[{run.p['report']}] wrote {stem}.md, .json, .png ({report['wall_seconds'] / 60:.1f} min)")
    return 0 if not run.failed else 3
