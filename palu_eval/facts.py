"""Does the model still state a fact? Greedy answers to short factual questions, checked for the fact's key words.

Each row of a QA file has ``question``, ``answer`` (a reference answer) and ``key``: a regular expression (``|`` for
alternatives, matched case-insensitively at a word start) that a correct answer contains, e.g. ``"Charles Dickens"``
or ``"seven|7"``. Per row: the greedy answer (``max_new_tokens``), whether it names the key (``correct``), and the
probability of the reference answer (teacher-forced, the TOFU ``prob`` of :mod:`palu_eval.metrics`). Per file:
``accuracy`` (fraction correct) and ``prob`` (mean). Questions are formatted as in training
(:mod:`palu_ds.data.prompt`, chat template as open-unlearning applies it). Data-parallel when launched on several
ranks (rows split, records gathered)::

    python palu_eval/facts.py --model DIR --data forget.jsonl retain.jsonl --out facts.json
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from palu_ds.atomic import write_json
from palu_ds.data.prompt import DEFAULT_FORMAT, PromptFormat, encode_qa
from palu_ds.dist import gather_records, is_main, rank, shard_indices, world
from palu_eval import metrics as M
from palu_eval.scoring import generate_greedy, pad_id_of, score_targets


def names_key(text: str, key: str) -> bool:
    """Whether ``text`` names ``key`` (a regex; alternatives with ``|``) at a word start, case-insensitively."""
    return re.search(r"\b(?:" + key + ")", text, re.IGNORECASE) is not None


def check_rows(model, tokenizer, rows: list[dict], fmt: PromptFormat = DEFAULT_FORMAT, max_new_tokens: int = 24,
               batch_size: int = 16) -> list[dict]:
    """Per-row records (every rank gets all of them, ordered as ``rows``)."""
    idx = shard_indices(len(rows), rank(), world())
    pairs = [encode_qa(tokenizer, rows[i]["question"], [rows[i]["answer"]], fmt=fmt) for i in idx]
    stats = score_targets(model, [a[0] for _, a in pairs], pad_id=pad_id_of(tokenizer), batch_size=batch_size)
    gens = generate_greedy(model, tokenizer, [p for p, _ in pairs], max_new_tokens=max_new_tokens,
                           batch_size=batch_size)
    records = [{"index": i, "question": rows[i]["question"], "key": rows[i]["key"], "answer": rows[i]["answer"],
                "generated": g.strip(), "correct": names_key(g, rows[i]["key"]), "prob": M.probability(s.logps)}
               for i, s, g in zip(idx, stats, gens)]
    return sorted(gather_records(records), key=lambda r: r["index"])


def summarize(records: list[dict]) -> dict:
    n = max(1, len(records))
    return {"n": len(records), "accuracy": sum(r["correct"] for r in records) / n,
            "prob": sum(r["prob"] for r in records) / n}


def load_rows(path: str) -> list[dict]:
    from palu_ds.data.errors import DataError
    from palu_ds.data.io import load_records

    rows = load_records(path)
    for i, r in enumerate(rows):
        for field in ("question", "answer", "key"):
            if not isinstance(r, dict) or not isinstance(r.get(field), str) or not r[field].strip():
                raise DataError(path, i, field, "is missing or empty", "each row needs question, answer and key")
        try:
            re.compile(r["key"])
        except re.error as e:
            raise DataError(path, i, "key", f"is not a valid regular expression ({e})") from e
    return rows


def main(argv=None) -> dict:
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from palu_ds.dist import init_from_env
    from palu_eval.run import load_model

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", nargs="+", required=True, help="QA files (.jsonl/.json) with question, answer, key")
    p.add_argument("--out", required=True, help="results JSON: {file stem: {summary, records}}")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--system-prompt", default=DEFAULT_FORMAT.system_prompt)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    args = p.parse_args(argv)
    started_here = not (dist.is_available() and dist.is_initialized()) and init_from_env()
    fmt = PromptFormat(system_prompt=args.system_prompt or None)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = load_model(args.model, "auto")
    out = {}
    for path in args.data:
        records = check_rows(model, tokenizer, load_rows(path), fmt, args.max_new_tokens, args.batch_size)
        out[Path(path).stem] = {"summary": summarize(records), "records": records}
    if is_main():
        write_json(args.out, out)
        print(json.dumps({k: v["summary"] for k, v in out.items()}))
    if started_here:
        dist.destroy_process_group()
    return out


def cli() -> int:
    main()
    return 0


if __name__ == "__main__":
    from palu_ds.process import run_main

    run_main(cli)
