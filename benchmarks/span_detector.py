"""Span detector vs PALU's GPT labels (character precision / recall / F1, and start coverage: the fraction of
labelled spans whose FIRST character is inside a predicted span -- I_init is the first N tokens of each span).

    python benchmarks/span_detector.py [SAVE_TO_DISK_FOLDER ...] [--show N]

Default data: tests/fixtures/palu/forget01_with_common_words_gpt (PALU's forget01, 40 rows; the development set).
Compared with "every non-stop word" (each word outside the stop list, alone) as a baseline.
"""
import argparse
import json
import os

from palu_ds.data.io import load_records
from palu_ds.data.spans import STOP_WORDS, _WORD, _base, detect_spans, parse_target_words

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(ROOT, "tests", "fixtures", "palu", "forget01_with_common_words_gpt")


def every_non_stop_word(question, answer):
    return [(m.start(), m.end()) for m in _WORD.finditer(answer) if _base(m.group(0)) not in STOP_WORDS]


def score(rows, detector):
    tp = fp = fn = starts = n_spans = 0
    misses = []
    for i, r in enumerate(rows):
        gold = parse_target_words(r["target_words"], r["answer"], "labels", i)
        g = {c for s, e in gold for c in range(s, e)}
        pred = detector(r["question"], r["answer"])
        p = {c for s, e in pred for c in range(s, e)}
        tp, fp, fn = tp + len(g & p), fp + len(p - g), fn + len(g - p)
        for s, e in gold:
            n_spans += 1
            starts += s in p
            if s not in p:
                misses.append((i, r["answer"][s:e]))
    prec, rec = tp / max(1, tp + fp), tp / max(1, tp + fn)
    return {"precision": prec, "recall": rec, "f1": 2 * prec * rec / max(1e-12, prec + rec),
            "start_coverage": starts / max(1, n_spans), "spans": n_spans, "rows": len(rows)}, misses


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("data", nargs="*", default=[DEFAULT])
    ap.add_argument("--show", type=int, default=0, help="print the first N missed span starts")
    args = ap.parse_args()
    rows = [r for d in args.data for r in load_records(d)]
    for name, det in (("detector (palu_ds.data.spans.detect_spans)", detect_spans),
                      ("every non-stop word", every_non_stop_word)):
        s, misses = score(rows, det)
        print(f"{name}: " + json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in s.items()}))
        for i, w in misses[: args.show]:
            print(f"   missed start: row {i}: {w!r}")


if __name__ == "__main__":
    main()
