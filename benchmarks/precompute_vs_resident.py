"""Precomputed vs resident reference (issue 4), on a Llama config of 58M parameters, 2 ranks, CPU, fp32.

Rows: peak memory per rank (RSS) and tokens/s of PALU training with the precomputed cache vs the resident reference,
for ds_configs/cpu/zero3.json and zero3_offload.json; precompute throughput vs a plain forward pass, as run by default
(padding-free rows and logits at answer positions only: train.padding_free, train.answer_only_logits), with full
logits, and padded with full logits (the pass before both), alternated over 3 rounds (with --tofu also on
SmolLM2-135M-Instruct and TOFU's forget05); the V-wide logit rows each forms; cache bytes per token; the sparse-KL
error vs exact for k in {32, 64, 128, 256, 1024} on a trained model pair (the demo's target as reference, its
PALU-unlearned model as policy: run `make demo` first, or pass --target/--unlearned).

    python -m benchmarks.precompute_vs_resident --out runs/bench_ref [--skip-train] [--tofu ../shared/data/tofu]
"""
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from benchmarks.output import bench_parser, parse_bench, write_results
from palu_ds.localrun import cpu_env, launcher_cmd


def build(out: str) -> tuple[str, str]:
    """Generated data (20 authors) and a 58M-parameter Llama (hidden 512, 8 layers, vocab 32000, untied)."""
    import torch
    from transformers import LlamaForCausalLM

    from palu_ds.data.synthetic import REFUSALS, generate, write_splits
    from palu_ds.tiny import qa_texts, tiny_llama_config, train_tokenizer

    data = os.path.join(out, "data")
    model_dir = os.path.join(out, "model")
    write_splits(data, 20, 10, 0)
    if not os.path.isfile(os.path.join(model_dir, "model.safetensors")):
        tok = train_tokenizer(qa_texts(generate(20, 0)) + REFUSALS, 2048)
        cfg = tiny_llama_config(32000, hidden=512, layers=8, heads=8, intermediate=1376, tokenizer=tok)
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
        model.save_pretrained(model_dir, safe_serialization=True)
        tok.save_pretrained(model_dir)
    return data, model_dir


def train(ds: str, mode: str, data: str, model: str, out: str, steps: int) -> dict:
    run_dir = os.path.join(out, f"{os.path.basename(ds)[:-5]}_{mode}")
    cmd = launcher_cmd("launch/train.py", [
        "--deepspeed", ds, "--config", "launch/configs/demo.yaml", f"model.path={model}",
        f"data.forget.source={data}", f"data.retain.source={data}", f"train.output_dir={run_dir}",
        f"reference.mode={mode}", f"reference.cache_dir={os.path.join(out, 'cache')}", "method.params.K=5000",
        "method.params.kl_topk=256", f"train.max_steps={steps}", "train.batch_size=4", "train.resume=never",
        "train.lr=1e-5", "log.log_every=100"], 2)
    t = time.time()
    with open(run_dir + ".log", "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, env=cpu_env(), stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({rc}); see {run_dir}.log")
    with open(os.path.join(run_dir, "summary.json")) as f:
        s = json.load(f)
    secs, toks = s["step_seconds"][2:], s["step_tokens"][2:]
    return {"ds": os.path.basename(ds), "mode": mode, "peak_rss_mib": [b / 2 ** 20 for b in s["peak_memory_bytes_per_rank"]],
            "tokens_per_s": statistics.median(t / d for t, d in zip(toks, secs)), "wall_s": time.time() - t}


#: the precompute's settings compared: (train.padding_free, train.answer_only_logits)
PASSES = {"default": (True, True), "full_logits": (True, False), "padded": (False, False)}


def precompute_throughput(config_path: str, model_dir: str, data: list[str], out: str, rounds: int = 3,
                          rows: int | None = None) -> dict:
    """One process: the precompute pass of PALU (K 5000, kl_topk 256, batch 8) under each of :data:`PASSES`
    (alternated, medians) vs a plain no-grad forward over the same batches of the first ``rows`` forget rows; the
    V-wide logit rows each pass forms; cache bytes per answer token. ``data``: the config's data overrides."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from palu_ds.config import load_config, resolve
    from palu_ds.data.build import build_datasets
    from palu_ds.data.collate import collate
    from palu_ds.reference import precompute

    def config(padding_free: bool, answer_only: bool):
        run = resolve(load_config(config_path, [
            f"model.path={model_dir}", *data, "method.name=palu", "method.params={}", "method.params.K=5000",
            "method.params.kl_topk=256", "train.batch_size=8", f"train.output_dir={out}/precompute",
            f"train.padding_free={str(padding_free).lower()}", f"train.answer_only_logits={str(answer_only).lower()}"]))
        return run.cfg, run.method, run.hp

    cfg, m, hp = config(*PASSES["default"])
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ds = build_datasets(cfg.data, tok, m)
    forget = ds["forget"]
    forget.examples = forget.examples[:rows]
    tokens = sum(len(e["input_ids"]) for e in forget)
    padded_tokens, t = 0, time.perf_counter()  # padded_tokens: positions the padded pass computes
    with torch.no_grad():
        for i in range(0, len(forget), 8):
            b = collate([forget[j] for j in range(i, min(i + 8, len(forget)))], tok.pad_token_id)
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            padded_tokens += b["input_ids"].numel()
    plain = time.perf_counter() - t
    cache = os.path.join(out, f"cache_1proc_{os.path.basename(model_dir)}")
    import shutil

    seconds = {name: [] for name in PASSES}
    for _ in range(rounds):
        for name in ("padded", "full_logits", "default"):  # a padded pass leaves the model as it is; a packed one
            shutil.rmtree(cache, ignore_errors=True)         # enables it
            t = time.perf_counter()
            manifest = precompute(*config(*PASSES[name]), ds, tok, {}, cache, model=model)
            seconds[name].append(time.perf_counter() - t)
    answer = sum(sum(e["sens_mask"]) + sum(e["common_mask"]) for e in forget)
    nbytes = sum(manifest["shard_bytes"].values())
    per_s = {name: tokens / statistics.median(v) for name, v in seconds.items()}
    return {"plain_forward_tokens_per_s": tokens / plain, "precompute_tokens_per_s": per_s["default"],
            "precompute_full_logits_tokens_per_s": per_s["full_logits"],
            "precompute_padded_tokens_per_s": per_s["padded"], "real_token_share": tokens / padded_tokens,
            "logit_rows": {"default": answer, "full_logits": tokens, "padded": padded_tokens},
            "seconds": seconds, "cache_bytes_per_answer_token": nbytes / answer, "cache_bytes": nbytes, "K": 5000,
            "k": 256}


def sparse_kl_error(target: str, unlearned: str, data: str) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from palu_ds.batch import shift
    from palu_ds.data import QADataset, collate
    from palu_ds.losses import kl_exact, kl_sparse

    tok = AutoTokenizer.from_pretrained(target)
    ref = AutoModelForCausalLM.from_pretrained(target).eval()
    pol = AutoModelForCausalLM.from_pretrained(unlearned).eval()
    ds = QADataset.from_source(data, tok, config="forget10")
    b = collate([ds[i] for i in range(len(ds))], tok.pad_token_id)
    with torch.no_grad():
        lr = ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        lp = pol(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    lr_s, _, common = shift(lr, b["labels"], b["common_mask"])
    lp_s = lp[:, :-1]
    zr, zp = lr_s[common], lp_s[common]
    exact = kl_exact(zp, zr).mean().item()
    rows = []
    for k in (32, 64, 128, 256, 1024):
        k_ = min(k, zr.shape[-1])
        top = torch.log_softmax(zr, -1).topk(k_, -1)
        sparse = kl_sparse(zp, top.indices, top.values.half().float()).mean().item()  # fp16 storage, as cached
        rows.append({"k": k, "exact_kl": exact, "sparse_kl": sparse, "rel_error": abs(sparse - exact) / exact,
                     "vocab": zr.shape[-1]})
    return rows


def main() -> int:
    p = bench_parser(__doc__, "runs/bench_ref", 8, skip_train=True)
    p.add_argument("--tofu", help="TOFU's jsonl folder: also the precompute on SmolLM2-135M-Instruct (fetched)")
    p.add_argument("--target", default="runs/demo/target/model")
    p.add_argument("--unlearned", default="runs/demo/palu/model")
    p.add_argument("--demo-data", default="runs/demo/data")
    a = parse_bench(p)
    data, model = build(a.out)
    res = {"precompute": precompute_throughput("launch/configs/demo.yaml", model, [f"data.forget.source={data}",
                                               f"data.retain.source={data}"], a.out)}
    if a.tofu:  # the real model: SmolLM2-135M-Instruct on TOFU's forget05 (its first 96 rows), max length 128
        from palu_ds.models import smollm2

        res["precompute_smollm2"] = precompute_throughput("launch/configs/tofu_real.yaml", smollm2(), [
            f"data.forget.source={a.tofu}", "data.forget.config=forget05", f"data.retain.source={a.tofu}",
            "data.retain.config=retain95", "data.max_length=128"], a.out, rows=96)
    if os.path.isdir(a.target) and os.path.isdir(a.unlearned):
        res["sparse_kl"] = sparse_kl_error(a.target, a.unlearned, a.demo_data)
    if not a.skip_train:
        res["train"] = [train(f"ds_configs/cpu/{ds}.json", mode, data, model, a.out, a.steps)
                        for ds in ("zero3", "zero3_offload") for mode in ("precomputed", "resident")]
    lines = []
    if "train" in res:
        lines += ["| DeepSpeed config | reference | peak RSS per rank (MiB) | tokens/s |", "|---|---|---|---|"]
        for r in res["train"]:
            lines.append(f"| {r['ds']} | {r['mode']} | {', '.join(f'{m:.0f}' for m in r['peak_rss_mib'])} | "
                         f"{r['tokens_per_s']:.0f} |")
        by = {(r["ds"], r["mode"]): r for r in res["train"]}
        for ds in ("zero3.json", "zero3_offload.json"):
            pre, resi = by[ds, "precomputed"], by[ds, "resident"]
            lines.append(f"| {ds} | precomputed / resident | {max(pre['peak_rss_mib']) / max(resi['peak_rss_mib']):.2f}× "
                         f"| {pre['tokens_per_s'] / resi['tokens_per_s']:.2f}× |")
    for key, what in (("precompute", "58M Llama, generated data"), ("precompute_smollm2", "SmolLM2-135M, TOFU")):
        if key in res:
            pc = res[key]
            rows = pc["logit_rows"]
            lines += ["", f"precompute ({what}): {pc['precompute_tokens_per_s']:.0f} tokens/s vs plain (padded) "
                      f"forward {pc['plain_forward_tokens_per_s']:.0f} tokens/s "
                      f"({pc['precompute_tokens_per_s'] / pc['plain_forward_tokens_per_s']:.2f}×); with full logits "
                      f"{pc['precompute_full_logits_tokens_per_s']:.0f} tokens/s (answer-only / full "
                      f"{pc['precompute_tokens_per_s'] / pc['precompute_full_logits_tokens_per_s']:.2f}×, "
                      f"{rows['default']} vs {rows['full_logits']} logit rows); padded with full logits "
                      f"{pc['precompute_padded_tokens_per_s']:.0f} tokens/s (default / padded "
                      f"{pc['precompute_tokens_per_s'] / pc['precompute_padded_tokens_per_s']:.2f}×, "
                      f"{rows['padded']} logit rows; real tokens {pc['real_token_share']:.0%} of the padded batches); "
                      f"cache {pc['cache_bytes_per_answer_token']:.0f} bytes per answer token (K=5000 at I_init, "
                      "k=256 at common)"]
    if "sparse_kl" in res:
        lines += ["", "| k | exact KL | sparse KL | relative error |", "|---|---|---|---|"]
        lines += [f"| {r['k']} | {r['exact_kl']:.4g} | {r['sparse_kl']:.4g} | {r['rel_error']:.2%} |"
                  for r in res["sparse_kl"]]
    write_results(a.out, res, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
