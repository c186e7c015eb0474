"""Run both suites on the real TOFU and MUSE files with tiny random models, to show that the loaders and metrics
accept the real formats, and print the timing.  (The numbers themselves mean nothing: the models are random.)

    python -m benchmarks.real_formats ../shared/data [--max-examples 20] [--out /tmp/real_formats]

``DATA`` holds ``tofu/*.jsonl`` and ``muse/{news,books}/...`` (see ``shared/data/README.md``).  Every row of
every file used is loaded and checked; the first ``--max-examples`` rows of each part are evaluated (0 = all).
For each suite a "retain" model (seed 0) is evaluated first with ``forget_quality=False`` and its results feed
forget quality / PrivLeak of an "unlearned" model (seed 1), as in real use; a report PNG + table is written.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from palu_ds.tiny import make_tiny_model
from palu_eval import SuiteConfig, evaluate
from palu_eval.report import load_summary, render


def tokenizer_texts(data: Path, limit_chars: int = 3_000_000) -> list[str]:
    """Text from the real files to train the tiny tokenizer on (so real text tokenizes to sensible lengths)."""
    texts, total = [], 0
    for f in sorted((data / "tofu").glob("*.jsonl")):
        for line in f.read_text().splitlines():
            row = json.loads(line)
            texts += [v for v in row.values() if isinstance(v, str)]
    for f in sorted((data / "muse").glob("*/*/*.json")):
        if f.parent.name in ("raw", "sust", "scal"):
            continue
        for row in json.loads(f.read_text()):
            t = row if isinstance(row, str) else " ".join(v for v in row.values() if isinstance(v, str))
            texts.append(t[:4000])
    out = []
    for t in texts:
        total += len(t)
        if total > limit_chars:
            break
        out.append(t)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("data", help="folder with tofu/ and muse/ (e.g. ../shared/data)")
    p.add_argument("--max-examples", type=int, default=20, help="rows evaluated per part (0 = all)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="override the suite defaults (200 / 128 / 32)")
    p.add_argument("--max-length", type=int, default=None, help="override (TOFU 512, MUSE 2048)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    args = p.parse_args(argv)
    data = Path(args.data).resolve()
    out = Path(args.out or tempfile.mkdtemp(prefix="real_formats_"))
    timings: dict[str, float] = {}

    t = time.perf_counter()
    texts = tokenizer_texts(data)
    models = {}
    for name, seed in (("retain", 0), ("unlearned", 1)):
        models[name] = make_tiny_model(out / f"model_{name}", texts, vocab_size=4000, seed=seed, hidden=64)
    timings["setup: tokenizer + 2 tiny models"] = time.perf_counter() - t

    runs = [("tofu", "forget10", data / "tofu"), ("muse", "news", data / "muse"), ("muse", "books", data / "muse")]
    summaries = []
    for suite, split, path in runs:
        for name in ("retain", "unlearned"):
            model, tok = models[name]
            cfg = SuiteConfig(suite=suite, split=split, data=str(path), batch_size=args.batch_size,
                              max_examples=args.max_examples or None, max_new_tokens=args.max_new_tokens,
                              max_length=args.max_length, forget_quality=(name != "retain"),
                              retain_results=str(out / f"{suite}_{split}_retain") if name != "retain" else None)
            t = time.perf_counter()
            res = evaluate(model, tok, cfg, out_dir=out / f"{suite}_{split}_{name}")
            timings[f"{suite} {split} ({name} model)"] = time.perf_counter() - t
            n = {part: len(recs) for part, recs in res.examples.items()}
            print(f"{suite} {split} {name}: examples {n}, seconds {res.meta['part_seconds']}")
            shown = {k: round(v, 4) for k, v in res.summary.items() if isinstance(v, float)}
            print("  " + json.dumps(shown))
            summaries.append(load_summary(out / f"{suite}_{split}_{name}"))
            summaries[-1]["name"] = f"{split}-{name}"
    png, md = render(summaries, out / "report.png")
    print(f"\nreport: {png} and {md}")
    print("\ntiming (s):")
    for k, v in timings.items():
        print(f"  {k:40s} {v:8.1f}")
    print(f"  {'total':40s} {sum(timings.values()):8.1f}")
    return timings


if __name__ == "__main__":
    main()
