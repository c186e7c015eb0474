"""The fact check of `make demo` (evaluation/facts.py) and its report (launch/demo.py)."""
import importlib.util
import json
import os

import pytest

from evaluation.facts import check_rows, load_rows, names_key, summarize
from palu_ds.data.errors import DataError
from tests.e2e import ROOT

_spec = importlib.util.spec_from_file_location("demo", os.path.join(ROOT, "launch", "demo.py"))
demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo)


def test_names_key_at_a_word_start_case_insensitive():
    assert names_key("The play was written by William Shakespeare.", "William Shakespeare")
    assert names_key("a week is 7 days", "seven|7") and names_key("Seven days", "seven|7")
    assert not names_key("written by Williams", "Liam")  # inside a word: no
    assert not names_key("The novel by,,,, was written by,,,,.", "Charles Dickens")


def test_bad_rows_are_named(tmp_path):
    p = tmp_path / "q.jsonl"
    p.write_text(json.dumps({"question": "Who?", "answer": "Me.", "key": "Me"}) + "\n"
                 + json.dumps({"question": "Who?", "answer": "Me."}) + "\n")
    with pytest.raises(DataError, match=r"q.jsonl.*field 'key': is missing or empty"):
        load_rows(str(p))
    p.write_text(json.dumps({"question": "Who?", "answer": "Me.", "key": "(Me"}) + "\n")
    with pytest.raises(DataError, match="field 'key': is not a valid regular expression"):
        load_rows(str(p))


def test_shipped_facts_are_valid_and_labelled():
    """Every shipped row loads, its key names its own answer, and its label is the key's first alternative."""
    for name in (*demo.SIDES, demo.DEV):
        rows = load_rows(os.path.join(demo.REAL_DATA, f"{name}.jsonl"))
        assert rows
        for r in rows:
            assert names_key(r["answer"], r["key"]), r
            (w,) = r["target_words"]
            assert r["answer"][w["start"]:w["end"]] == w["word"] == r["key"].split("|")[0]


def test_dev_questions_are_apart_from_the_reported_ones():
    """The development questions (chosen on by ``demo.py --select``) share no question and no fact with forget, retain
    or holdout: no development key names a reported answer and no reported key names a development answer."""
    reported = [r for name in demo.SIDES for r in load_rows(os.path.join(demo.REAL_DATA, f"{name}.jsonl"))]
    dev = load_rows(os.path.join(demo.REAL_DATA, f"{demo.DEV}.jsonl"))
    assert len(dev) >= 10 and len({r["question"] for r in dev}) == len(dev)
    assert not {r["question"] for r in dev} & {r["question"] for r in reported}
    for d in dev:
        for r in reported:
            assert not names_key(r["answer"], d["key"]) and not names_key(d["answer"], r["key"]), (d["key"], r["key"])


def test_check_rows_on_a_model(tiny):
    """Records in row order with the generated answer, whether it names the key, and the reference answer's
    probability; the summary averages them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny["model"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny["model"]).eval()
    rows = [{"question": "Where was Arlo born?", "answer": "In Oslo.", "key": "."},
            {"question": "Who?", "answer": "Nobody.", "key": "zzzzzz"}]
    recs = check_rows(model, tok, rows, max_new_tokens=4)
    assert [r["index"] for r in recs] == [0, 1] and [r["correct"] for r in recs] == [True, False]
    assert all(0 < r["prob"] <= 1 for r in recs)
    assert summarize(recs)["accuracy"] == 0.5


def test_demo_keeps_known_rows_and_reports_before_after():
    """Training data = the rows the base model answered correctly; the report pairs each kept question's answer
    before and after and scores each side."""
    rows = [json.loads(line) for line in open(os.path.join(demo.REAL_DATA, "forget.jsonl"))]

    def result(correct, generated):
        return {"records": [{"index": i, "question": r["question"], "key": r["key"], "correct": c,
                             "generated": g, "prob": 0.5 if c else 0.1}
                            for i, (r, c, g) in enumerate(zip(rows, correct, generated))]}

    n = len(rows)
    before = {"forget": result([True] * (n - 1) + [False], [r["answer"] for r in rows])}
    after = {"forget": result([False] * n, ["I do not know."] * n)}
    kept = {"forget": demo.known_rows(before, "forget")}
    assert kept["forget"] == rows[:-1]
    pairs = demo.paired(before, after, kept, "forget")
    s = demo.scores(pairs)
    assert s == pytest.approx({"correct_before": 1.0, "correct_after": 0.0, "prob_before": 0.5, "prob_after": 0.1})
    assert len(pairs) == n - 1 and pairs[0][1]["generated"] == "I do not know."
