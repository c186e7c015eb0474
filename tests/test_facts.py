"""The fact check of `make demo` (palu_eval/facts.py) and its report (launch/demo.py)."""
import glob
import importlib.util
import json
import os

import pytest

from palu_ds.data.errors import DataError
from palu_eval.facts import check_rows, load_rows, names_key, summarize
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
    for name in (*demo.SIDES, demo.DEV, "authors"):
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


def test_extra_retain_rows_are_apart_from_every_scored_question(tmp_path):
    """authors.jsonl (a grid run's extra_retain, taught as given) names no forget, retain, holdout or development fact
    and asks none of their questions; its rows join the known retain rows in the retain training file."""
    extra = load_rows(os.path.join(demo.REAL_DATA, "authors.jsonl"))
    scored = [r for name in (*demo.SIDES, demo.DEV) for r in load_rows(os.path.join(demo.REAL_DATA, f"{name}.jsonl"))]
    assert len({r["question"] for r in extra}) == len(extra) >= 30
    for e in extra:
        for r in scored:
            assert e["question"] != r["question"]
            assert not names_key(r["answer"], e["key"]) and not names_key(e["answer"], r["key"]), (e["key"], r["key"])
    kept = {"retain": demo.real_rows("retain")[:2]}
    assert demo.retain_file(str(tmp_path), kept, None) == f"{tmp_path}/data/retain.jsonl"
    path = demo.retain_file(str(tmp_path), kept, "authors")
    with open(path) as f:
        assert [json.loads(line) for line in f] == kept["retain"] + demo.real_rows("authors")
    assert f"data.retain.source={path}" in demo.unlearn_overrides("b", str(tmp_path), "r", retain=path)


def test_extra_retain_rows_answered_by_the_base_model_leave_out_scored_facts(tmp_path):
    """extra_answers: base -- each question of the extra file with the base model's own answer (true or not), except
    an empty answer or one naming a forget, retain, holdout or development fact (it would teach or unteach it)."""
    questions = [r["question"] for r in demo.real_rows("authors")[:5]]
    said_answers = ["by J.A. Smith, a writer.", "by William Shakespeare.", "", "is a classic by Oscar Wilde.",
                    "by Robert Louis Mabillan."]
    said = {"authors": {"records": [{"index": i, "question": q, "generated": g, "correct": False}
                                    for i, (q, g) in enumerate(zip(questions, said_answers))]}}
    assert demo.said_rows(said, "authors") == [{"question": questions[0], "answer": said_answers[0]},
                                               {"question": questions[4], "answer": said_answers[4]}]
    kept = {"retain": demo.real_rows("retain")[:2]}
    path = demo.retain_file(str(tmp_path), kept, "authors", said)
    assert path == f"{tmp_path}/data/retain+authors.base.jsonl"
    with open(path) as f:
        assert [json.loads(line) for line in f] == kept["retain"] + demo.said_rows(said, "authors")
    assert demo.as_overrides({demo.EXTRA_RETAIN_KEY: "authors", demo.EXTRA_ANSWERS_KEY: "base",
                              "train.lr": 5e-5}) == ["train.lr=5e-05"]


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


def _point(order, steps, lr, forget, retain, dev, dev_prob=0.5):
    return {"settings": {"train.lr": lr, "method.params.alpha": 3.0, "train.max_steps": steps}, "order": order,
            "forget": forget, "retain": retain, demo.DEV: dev, "dev_prob": dev_prob,
            "questions": {"forget": 6, "retain": 16, demo.DEV: 10}}


def test_selection_rule_eligible_then_dev_then_ties():
    """--select's rule (BENCHMARKS.md): only forget 0% and retain >= 90% are eligible; the highest development share
    wins; ties go to fewer steps, then the lower lr, then the higher development probability, then grid order."""
    pts = [_point(0, 5, 5e-5, 0.17, 1.0, 1.0),   # best dev, but still states a forget fact
           _point(1, 10, 5e-5, 0.0, 0.875, 1.0),  # retain below 90%
           _point(2, 10, 5e-5, 0.0, 1.0, 0.8),
           _point(3, 5, 2.5e-5, 0.0, 0.9375, 0.6)]
    c = demo.choose(pts)
    assert c["eligible"] and c["point"]["order"] == 2 and "2 points" in c["reason"]
    tied = [_point(0, 10, 2.5e-5, 0.0, 1.0, 0.8), _point(1, 5, 5e-5, 0.0, 1.0, 0.8, 0.4),
            _point(2, 5, 2.5e-5, 0.0, 1.0, 0.8, 0.3), _point(3, 5, 2.5e-5, 0.0, 1.0, 0.8, 0.6)]
    assert demo.choose(tied)["point"]["order"] == 3  # fewer steps, lower lr, higher probability
    none = [_point(0, 5, 5e-5, 0.33, 1.0, 1.0), _point(1, 10, 5e-5, 0.17, 0.8, 0.5), _point(2, 10, 1e-4, 0.17, 0.9, 0.2)]
    c = demo.choose(none)
    assert not c["eligible"] and c["point"]["order"] == 2 and "no point" in c["reason"]
    with pytest.raises(ValueError, match="at least one"):
        demo.choose([])


def test_selection_scores_known_questions_and_names_points():
    """A point's shares count only the questions the base model knew; the table shows shares, never a development
    question; the point name is the settings' short keys and values."""
    def result(name, correct):
        rows = load_rows(os.path.join(demo.REAL_DATA, f"{name}.jsonl"))[:len(correct)]
        return {"records": [{"index": i, "question": r["question"], "key": r["key"], "correct": c, "generated": "",
                             "prob": 0.9 if c else 0.1} for i, (r, c) in enumerate(zip(rows, correct))]}

    before = {"forget": result("forget", [True, True, False]), "retain": result("retain", [True, True]),
              demo.DEV: result(demo.DEV, [True, True, True, False])}
    after = {"forget": result("forget", [False, False, True]), "retain": result("retain", [True, True]),
             demo.DEV: result(demo.DEV, [True, False, True, True])}
    kept = {name: demo.known_rows(before, name) for name in demo.SELECTED}
    settings = {"train.lr": 5e-5, "method.params.alpha": 10.0, "train.max_steps": 5}
    p = demo.score_point(settings, 0, before, after, kept)
    assert (p["forget"], p["retain"], p[demo.DEV]) == (0.0, 1.0, pytest.approx(2 / 3))
    assert p["questions"] == {"forget": 2, "retain": 2, demo.DEV: 3}
    assert demo.point_name(settings) == "lr5e-05_alpha10_max_steps5"
    text = demo.selection_markdown([p], demo.choose([p]), [])
    assert "**chosen**" in text and "| 67% |" in text
    wider = {**p, "settings": {demo.EXTRA_RETAIN_KEY: "authors", **settings}, "order": 1}
    text = demo.selection_markdown([p, wider], demo.choose([p, wider]), [])
    assert "| 5e-05 | 10 | 5 | - |" in text and "| 5e-05 | 10 | 5 | authors |" in text  # a run without the key: -
    assert demo.point_name(wider["settings"]) == "extra_retainauthors_lr5e-05_alpha10_max_steps5"
    assert not any(r["question"] in text for r in load_rows(os.path.join(demo.REAL_DATA, f"{demo.DEV}.jsonl")))


def test_shipped_grids_load_and_every_point_is_a_valid_config():
    """Every round's grid file loads (each point is a valid run config on the demo's config: the keys exist, values in
    range) and the default --grid is the latest round."""
    from palu_ds.config import load_config

    rounds = sorted(glob.glob(os.path.join(ROOT, "launch", "demo_grids", "round*.yaml")))
    assert len(rounds) >= 2 and rounds[-1].endswith(demo.GRID)
    for path in rounds:
        runs, steps = demo.load_grid(path)
        assert runs and steps == sorted(steps)
        for grid_run in runs:
            cfg = load_config(os.path.join(ROOT, demo.REAL_CONFIG), demo.as_overrides(grid_run))
            assert cfg.train.lr == grid_run["train.lr"]
            assert cfg.method.params["alpha"] == grid_run["method.params.alpha"]


@pytest.mark.parametrize("text, message", [
    ("steps: [10, 5]\nruns: [{train.lr: 5.0e-5}]\n", "steps must be a list of increasing"),
    ("steps: [5]\nruns: []\n", "runs must be a non-empty list"),
    ("steps: [5]\nruns: [{train.lr: 5e-5}]\n", r"runs\[0\].train.lr = '5e-5' is not a number .*write 5.0e-5"),
    ("steps: [5]\nruns: [{train.max_steps: 3}]\n", r"runs\[0\] sets train.max_steps"),
    ("steps: [5]\nruns: [{train.lr: 1.0e-5}, {train.lr: 1.0e-5}]\n", r"runs\[1\] repeats runs\[0\]"),
    ("steps: [5]\nruns: [{train.lrr: 1.0e-5}]\n", r"runs\[0\] is not a valid run on .*lrr"),
    ("steps: [5]\nruns: [{method.params.K: 0}]\n", r"runs\[0\] is not a valid run on .*K"),
    ("steps: [5]\nrun: [{train.lr: 1.0e-5}]\n", "unknown key.*run;"),
    ("steps: [5]\nruns: [{extra_retain: nothing}]\n", r"runs\[0\].extra_retain = 'nothing' must name a file of"),
    ("steps: [5]\nruns: [{extra_retain: holdout}]\n", r"runs\[0\].extra_retain = 'holdout' must name a file .*other than"),
    ("steps: [5]\nruns: [{extra_retain: authors, extra_answers: mine}]\n",
     r"runs\[0\].extra_answers = 'mine' must be one of given, base"),
    ("steps: [5]\nruns: [{extra_answers: base, train.lr: 1.0e-5}]\n",
     r"runs\[0\].extra_answers = 'base' .*in a run that sets extra_retain"),
])
def test_a_bad_grid_file_is_refused_naming_the_file_and_run(tmp_path, text, message):
    from palu_ds.config import ConfigError

    path = tmp_path / "grid.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as e:
        demo.load_grid(str(path))
    assert str(path) in str(e.value)


def test_select_refuses_a_bad_grid_or_run_count_before_anything_runs(tmp_path):
    """``demo.py --select`` with a bad grid file or --select-runs outside the grid: exit 1, ``error:`` naming the
    file or the count, and no output folder (nothing fetched, asked or trained)."""
    import subprocess
    import sys

    bad = tmp_path / "grid.yaml"
    bad.write_text("steps: [5]\nruns: [{train.lrr: 1.0e-5}]\n")
    for extra, message in ((["--grid", str(bad)], f"error: {bad}: runs[0]"),
                           (["--select-runs", "9"], "error: --select-runs must be 1..4")):
        out = tmp_path / "out"
        p = subprocess.run([sys.executable, "launch/demo.py", "--select", "--out", str(out), *extra], cwd=ROOT,
                           capture_output=True, text=True)
        assert p.returncode == 1 and message in p.stderr, p.stderr
        assert not out.exists()
