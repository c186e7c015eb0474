"""The ``palu-ds`` command: data and planning tools around the launch scripts.

  palu-ds spans IN.jsonl OUT.jsonl [--n-init 3] [--source auto|labels|detector|model] [--model NAME]
      writes each row with its sensitive spans ("spans": [{word,start,end,init}]) so a person can check them
  palu-ds make-default OUT_DIR [--authors 20] [--forget 10] [--seed 0] [--hidden 128 --layers 2]
      writes the embedded default: generated TOFU-style data, a trained tokenizer and a tiny Llama model dir
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def cmd_spans(args) -> int:
    from palu_ds.data.errors import DataError
    from palu_ds.data.io import load_records
    from palu_ds.data.spans import detect_spans, model_spans, parse_target_words

    try:
        rows = load_records(args.input)
        pipe = None
        if args.source == "model":
            from transformers import pipeline

            pipe = pipeline("token-classification", model=args.model, aggregation_strategy="simple")
        out = []
        for i, r in enumerate(rows):
            for key in (args.question_key, args.answer_key):
                if not isinstance(r, dict) or not isinstance(r.get(key), str) or not r[key].strip():
                    raise DataError(args.input, i, key, "is missing or empty")
            q, a = r[args.question_key], r[args.answer_key]
            has = r.get("target_words") is not None
            if args.source == "labels" or (args.source == "auto" and has):
                spans = parse_target_words(r.get("target_words"), a, args.input, i)
            elif args.source == "model":
                spans = model_spans(pipe, a)
            else:
                spans = detect_spans(q, a)
            out.append({**r, "spans": [{"word": a[s:e], "start": s, "end": e} for s, e in spans]})
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tmp = args.output + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in out:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, args.output)
    print(f"wrote {len(out)} rows with {sum(len(r['spans']) for r in out)} spans to {args.output}")
    return 0


def cmd_make_default(args) -> int:
    from palu_ds.data.synthetic import REFUSALS, generate, write_splits
    from palu_ds.tiny import build_model_dir, qa_texts

    paths = write_splits(os.path.join(args.out, "data"), args.authors, args.forget, args.seed)
    build_model_dir(os.path.join(args.out, "base"), qa_texts(generate(args.authors, args.seed)) + REFUSALS,
                    vocab_size=args.vocab, seed=args.seed, hidden=args.hidden, layers=args.layers,
                    heads=args.heads, intermediate=args.intermediate)
    print(json.dumps({"data": paths, "model": os.path.join(args.out, "base")}, indent=1))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="palu-ds", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("spans", help="label sensitive spans of a QA file for inspection")
    s.add_argument("input")
    s.add_argument("output")
    s.add_argument("--source", default="auto", choices=["auto", "labels", "detector", "model"])
    s.add_argument("--model", help="token-classification model (with --source model)")
    s.add_argument("--question-key", default="question")
    s.add_argument("--answer-key", default="answer")
    s.set_defaults(fn=cmd_spans)
    d = sub.add_parser("make-default", help="write the embedded default data, tokenizer and tiny model")
    d.add_argument("out")
    d.add_argument("--authors", type=int, default=20)
    d.add_argument("--forget", type=int, default=10, help="forget percentage")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--vocab", type=int, default=1024)
    d.add_argument("--hidden", type=int, default=128)
    d.add_argument("--layers", type=int, default=2)
    d.add_argument("--heads", type=int, default=4)
    d.add_argument("--intermediate", type=int, default=344)
    d.set_defaults(fn=cmd_make_default)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
