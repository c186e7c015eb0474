"""Every stage on the real pretrained model (SmolLM2-135M-Instruct), through the real CLIs on 2 ranks (DeepSpeed,
gloo, fp32 on CPU): fine-tune, precompute, unlearn with every method under ZeRO-2 and ZeRO-3, exact resume, LoRA,
save -> reload, TOFU and MUSE evaluation. Each stage is checked (exit 0, finite losses, the saved folder tied and
reloadable, resume == uninterrupted) and timed; the table goes to stdout and <out>/stages.json.

Short runs (2 optimizer steps, 2 rows per rank, 96 tokens): this shows that each stage works on a real checkpoint,
not how well a method unlearns (benchmarks/real_model_throughput.py measures speed; make demo shows forgetting).

    python benchmarks/real_model_stages.py --tofu ../shared/data/tofu --muse ../shared/data/muse --out runs/bench_stages
"""
import argparse
import json
import math
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from palu_ds.atomic import write_json
from palu_ds.localrun import cpu_env, launcher_cmd
from palu_ds.methods import METHODS, get_method
from palu_ds.models import smollm2
from palu_ds.stages import Stages

FACTS = os.path.join(ROOT, "launch", "data", "real_facts")
CONFIG = "launch/configs/real_facts.yaml"


def config_params() -> dict:
    from palu_ds.config import load_config

    return load_config(CONFIG, validate=False).method.params


def ds(script: str, args: list[str], ranks: int = 2) -> list[str]:
    return launcher_cmd(script, args, ranks)


def train_args(model: str, out: str, method: str, stage: int, steps: int = 2, extra=()) -> list[str]:
    args = ["--deepspeed", f"ds_configs/cpu/zero{stage}.json", "--config", CONFIG,
            f"model.path={model}", f"train.output_dir={out}", f"method.name={method}", f"train.max_steps={steps}",
            "train.batch_size=2", "data.max_length=96", "train.lr=1e-5", "log.log_every=1"]
    m = get_method(method)  # what the run needs comes from the registry entry, never from the method's name
    if not set(config_params()) <= set(m.params):  # the config's PALU parameters, kept where all of them apply
        args.append("method.params={}")
    if "retain" not in m.batches:
        args.append("data.retain=null")
    if "idk" in m.batches:  # refusals: the project's own list (palu_ds.data.synthetic.REFUSALS) written by the script
        args += [f"data.idk.source={os.path.join(os.path.dirname(out), 'idk.jsonl')}"]
    if m.uses_dual:
        args.append("method.params.lambda0=1.0")
    return args + list(extra)


def check_model(model_dir: str) -> str:
    """Reload the saved folder: tied embeddings, finite logits, identical logits after a second save/reload."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    m = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr(), "embeddings not tied"
    x = tok("Who wrote 'Hamlet'?", return_tensors="pt")
    with torch.no_grad():
        a = m(**x).logits
    assert torch.isfinite(a).all(), "non-finite logits"
    with tempfile.TemporaryDirectory() as d:
        m.save_pretrained(d)
        with torch.no_grad():
            b = AutoModelForCausalLM.from_pretrained(d).eval()(**x).logits
    assert torch.equal(a, b), "save -> reload changed the logits"
    return "tied, reloads identically"


def summary(out: str, keep_checkpoints: bool = False) -> dict:
    """The run's summary, checked finite; its checkpoints (~2 GB each: weights + Adam states) deleted unless kept."""
    if not keep_checkpoints:
        shutil.rmtree(os.path.join(out, "checkpoints"), ignore_errors=True)
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    bad = [k for k, v in s["last"].items() if isinstance(v, float) and not math.isfinite(v)]
    assert not bad and s["skipped_steps"] == 0, f"non-finite {bad} / skipped steps"
    return s


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tofu", default=os.path.join(ROOT, "..", "shared", "data", "tofu"))
    p.add_argument("--muse", default=os.path.join(ROOT, "..", "shared", "data", "muse"))
    p.add_argument("--out", default="runs/bench_stages")
    p.add_argument("--methods", default=",".join(n for n, m in METHODS.items() if m.unlearning))
    p.add_argument("--stages", default="2,3", help="ZeRO stages for the methods")
    a = p.parse_args()
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    from palu_ds.data.synthetic import REFUSALS

    with open(os.path.join(out, "idk.jsonl"), "w") as f:
        f.writelines(json.dumps({"answer": r}) + "\n" for r in REFUSALS)
    model = smollm2()
    st = Stages(out, fresh=True, tag="stages", cwd=ROOT, env=cpu_env(OMP_NUM_THREADS="1"))
    ft = os.path.join(out, "finetune")
    st.run("fine-tune (SFT), ZeRO-2", ds("launch/finetune.py", [
        "--deepspeed", "ds_configs/cpu/zero2.json", "--config", "launch/configs/finetune.yaml", f"model.path={model}",
        f"data.forget.source={FACTS}/retain.jsonl", "data.forget.config=null", "data.max_length=96",
        "train.max_steps=2", "train.batch_size=2", f"train.output_dir={ft}", "train.lr=1e-5"]),
        check=lambda: check_model(summary(ft)["model"]))
    pre = os.path.join(out, "precompute")
    st.run("precompute (palu), ZeRO-3", ds("launch/precompute.py", train_args(model, pre, "palu", 3)),
           check=lambda: "manifest written" if os.path.isfile(os.path.join(pre, "reference_cache", "manifest.json"))
           else "FAILED: no manifest")
    for stage in map(int, a.stages.split(",")):
        for method in a.methods.split(","):
            o = os.path.join(out, f"{method}_zero{stage}")
            st.run(f"{method}, ZeRO-{stage}", ds("launch/train.py", train_args(model, o, method, stage)),
                   check=lambda o=o: check_model(summary(o)["model"]))
    # exact resume: 2 steps, then a rerun to 4 steps resumes from the step-2 checkpoint; == 4 steps uninterrupted
    full, resumed = os.path.join(out, "resume_full"), os.path.join(out, "resume_split")
    st.run("palu 4 steps uninterrupted, ZeRO-3", ds("launch/train.py", train_args(model, full, "palu", 3, 4)))
    st.run("palu 2 steps, ZeRO-3", ds("launch/train.py", train_args(model, resumed, "palu", 3, 2)))

    def same_weights():
        from safetensors.torch import load_file

        x, y = (load_file(os.path.join(d, "model", "model.safetensors")) for d in (full, resumed))
        diff = max(float((x[k] - y[k]).abs().max()) for k in x)
        assert diff == 0.0, f"resumed weights differ from the uninterrupted run by up to {diff:.3g}"
        return "bit-identical to the uninterrupted run"

    st.run("palu resumed to 4 steps, ZeRO-3", ds("launch/train.py", train_args(model, resumed, "palu", 3, 4)),
           check=same_weights)
    lora = os.path.join(out, "lora")
    st.run("palu + LoRA (merged at save), ZeRO-2", ds("launch/train.py", train_args(
        model, lora, "palu", 2, extra=["model.lora={r: 8, lora_alpha: 16, target_modules: [q_proj, v_proj]}"])),
        check=lambda: check_model(summary(lora)["model"]))
    tuned = os.path.join(out, f"palu_zero{a.stages.split(',')[0]}", "model")  # the first palu run's model
    st.run("TOFU evaluation (forget01, 4 rows per part)", ds("palu_eval/run.py", [
        "--model", tuned, "--suite", "tofu", "--split", "forget01", "--data", os.path.abspath(a.tofu),
        "--max-examples", "4", "--max-new-tokens", "24", "--no-forget-quality", "--out", os.path.join(out, "tofu")]))
    st.run("MUSE evaluation (news, 2 rows per part)", ds("palu_eval/run.py", [
        "--model", tuned, "--suite", "muse", "--split", "news", "--data", os.path.join(os.path.abspath(a.muse), "news"),
        "--max-examples", "2", "--max-length", "256", "--no-forget-quality", "--out", os.path.join(out, "muse")]))
    return report(st, out)


def report(st: Stages, out: str) -> int:
    """The stages' table on stdout and in ``<out>/stages.json``; 1 when one failed."""
    rows = [{"stage": n, "status": st.status[n], "seconds": st.seconds[n], "log": str(st.log(n))} for n in st.status]
    print("| stage | result | seconds |\n|---|---|---|\n" + "\n".join(f"| {r['stage']} | {r['status']} | "
                                                               f"{r['seconds']} |" for r in rows))
    write_json(os.path.join(out, "stages.json"), rows)
    return 0 if not any(r["status"].startswith("FAILED") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
