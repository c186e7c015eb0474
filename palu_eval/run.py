"""Evaluate a saved model on TOFU or MUSE; writes ``results.json`` (every per-example value) and ``summary.json``.

Single process::

    python palu_eval/run.py --model DIR --suite tofu --split forget10 --data ../shared/data/tofu \\
        --retain-results runs/eval/retain/results.json --out runs/eval/my_run

Data-parallel (torchrun or the DeepSpeed launcher; each rank holds the model, examples are split and gathered)::

    deepspeed --num_gpus 2 palu_eval/run.py --model DIR --suite muse --split news --no-forget-quality --out DIR
    torchrun --nproc_per_node 2 palu_eval/run.py ...

First evaluate the retain model with ``--no-forget-quality`` and pass its ``results.json`` as ``--retain-results``
for forget quality (TOFU) and PrivLeak (TOFU, MUSE).  For TOFU, ``--retain-results`` also takes open-unlearning's
``TOFU_EVAL.json`` of the retain model (the file its ``retain_logs_path`` names; Min-K% k = 0.4).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from palu_ds.data.prompt import PromptFormat
from palu_ds.process import refusing, run_main
from palu_eval.checks import BadInput, check_finite_weights, check_model_path
from palu_eval.config import MUSE_PARTS, TOFU_PARTS, SuiteConfig


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face model folder (or hub name)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: --model)")
    p.add_argument("--suite", choices=["tofu", "muse"], required=True)
    p.add_argument("--split", required=True, help="TOFU: forget01 | forget05 | forget10; MUSE: news | books")
    p.add_argument("--data", help="local folder or hub name (default locuslab/TOFU, muse-bench/MUSE-<Corpus>)")
    p.add_argument("--splits", help=f"comma list; TOFU {','.join(TOFU_PARTS)}; MUSE {','.join(MUSE_PARTS)}")
    p.add_argument("--out", required=True, help="output folder for results.json and summary.json")
    p.add_argument("--name", help="run name shown in reports (default: the --out folder name)")
    p.add_argument("--retain-results", help="results.json (or its folder) of the same suite on the retain model; "
                   "TOFU: also open-unlearning's TOFU_EVAL.json of the retain model (its retain_logs_path)")
    p.add_argument("--no-forget-quality", action="store_true",
                   help="omit forget quality and PrivLeak (needed e.g. when evaluating the retain model itself)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, help="override (TOFU 200; MUSE VerbMem 128, KnowMem 32)")
    p.add_argument("--max-length", type=int, help="longest scored sequence (TOFU 512, MUSE 2048)")
    p.add_argument("--max-examples", type=int, help="first N rows of each split")
    p.add_argument("--k", type=float, default=0.4, help="Min-K%% / Min-K%%++ fraction")
    p.add_argument("--chat-template", choices=["auto", "true", "false"], default="auto",
                   help="auto: the tokenizer's chat template when it has one (as open-unlearning applies it)")
    p.add_argument("--system-prompt", default="You are a helpful assistant.",
                   help="system message of chat prompts ('' for none: the template's own default)")
    p.add_argument("--date-string", default="10 Apr 2025", help="date for templates that print one (Llama-3)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--timeout", type=float, default=0,
                   help="seconds: the whole evaluation's bound; past it every rank exits with status 124 and a "
                   "message (0: no bound)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    return p.parse_args(argv)


def load_model(path: str, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    if dtype == "auto":
        dtype = "bfloat16" if cuda else "float32"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    if cuda:
        model = model.to(torch.device("cuda", torch.cuda.current_device()))
    return model.eval()


def main(argv=None) -> dict:
    """Evaluate as the command line says; returns the summary. ``--timeout``: a watchdog ends the process (status 124,
    a message naming the bound) when the evaluation is not done in time; it is disarmed before anything is written,
    so a bounded run leaves both JSONs or neither."""
    from palu_ds import dist as ranks

    args = parse_args(argv)
    if args.timeout < 0:
        raise BadInput(f"--timeout must be >= 0 seconds, got {args.timeout}")
    watchdog = ranks.StepWatchdog(args.timeout, setting="--timeout", then="no result was written") \
        if args.timeout else None
    if watchdog is not None:
        watchdog.arm(f"the evaluation of {args.model}")
    try:
        return _evaluate(args, watchdog)
    finally:
        if watchdog is not None:
            watchdog.close()


def _evaluate(args, watchdog) -> dict:
    from palu_ds import dist as ranks

    check_model_path(args.model)  # before the heavy imports: bad input fails in a second
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from palu_eval.api import evaluate

    started_here = not (dist.is_available() and dist.is_initialized()) and ranks.init_from_env()
    rank, world = ranks.rank(), ranks.world()
    cfg = SuiteConfig(suite=args.suite, split=args.split, data=args.data, splits=args.splits,
                      batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, max_length=args.max_length,
                      max_examples=args.max_examples, k=args.k, retain_results=args.retain_results,
                      forget_quality=not args.no_forget_quality,
                      prompt=PromptFormat(chat_template={"auto": None, "true": True, "false": False}[args.chat_template],
                                          system_prompt=args.system_prompt or None, date_string=args.date_string))
    t0 = time.time()
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
        model = load_model(args.model, args.dtype)
    except (OSError, ValueError) as e:  # what the model check cannot see (a hub name, a broken config.json)
        raise BadInput(f"--model {args.model}: does not load ({type(e).__name__}: {str(e)[:300]})") from None
    check_finite_weights(model, args.model)
    out = evaluate(model, tokenizer, cfg)  # the suites refuse non-finite scores (palu_eval.checks)
    if watchdog is not None:
        watchdog.disarm()  # done in time: the two JSONs are written whole
    out.meta.update({"name": args.name or Path(args.out).name, "model": args.model, "world_size": world,
                     "seconds": round(time.time() - t0, 2)})
    if rank == 0:
        res, summ = out.write(args.out)
        shown = {k: v for k, v in out.summary.items() if isinstance(v, (int, float))}
        print(json.dumps(shown, indent=1))
        for note in out.summary.get("notes", []):
            print("note:", note)
        print(f"wrote {res} and {summ} ({out.meta['seconds']} s, {world} rank(s))")
    if started_here:
        dist.destroy_process_group()
    return out.summary


def cli() -> int:
    """The command line: :func:`main` returns the summary (for callers in Python); the process status is 0, or 2 with
    the path and what is wrong for input it refuses (:mod:`palu_eval.checks`)."""
    return refusing(lambda: main() and 0, BadInput)  # main returns the summary; the status is 0


if __name__ == "__main__":
    run_main(cli)
