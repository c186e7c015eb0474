"""open-unlearning's own TOFU logs (tests/fixtures/open_unlearning, made by scripts/make_ou_fixture.py from its
Llama-3.2-1B-Instruct logs: the target model on forget01 and the retain99 model): our metric code, fed their
per-example values, reproduces their TOFU_SUMMARY.json; and --retain-results takes their TOFU_EVAL.json."""

import gzip
import json
from pathlib import Path

import pytest
from scipy.stats import ks_2samp

from palu_eval import MissingRetainResults, SuiteConfig
from palu_eval import metrics as M
from palu_eval import open_unlearning as OU
from palu_eval.config import load_retain_results
from palu_eval.tofu import summarize

FIX = Path(__file__).parent / "fixtures" / "open_unlearning"


def _eval(name):
    with gzip.open(FIX / f"{name}_TOFU_EVAL.json.gz", "rt") as f:
        return json.load(f)


def _our_numbers(log: dict, retain: dict | None) -> dict:
    """Our aggregates, under open-unlearning's names, from the per-example values of ``log``."""
    ex = OU.tofu_eval_to_examples(log)
    s = summarize(ex, SuiteConfig(split="forget01", forget_quality=retain is not None), retain)
    got = OU.as_open_unlearning_names(s)
    if retain is None:  # open-unlearning's privleak without retain logs uses its default ref_value 0.5
        got["privleak"] = M.privleak(s["mia_min_k_auc"], 0.5)
    for name, entry in log.items():
        if name.startswith("mia_"):  # the other attacks' AUCs: our mia_auc on their scores
            got[name] = OU.mia_auc_from_log(entry)
    return got


@pytest.mark.parametrize("name,retain_name", [("target_forget01", "retain99"), ("retain99", None)])
def test_reproduces_open_unlearning_summary_from_per_example_values(name, retain_name):
    """Every number of their TOFU_SUMMARY.json (forget_quality, model_utility, privleak, extraction_strength,
    exact memorization, forget prob / ROUGE, all MIA AUCs) and every other agg_value of TOFU_EVAL.json (truth
    ratios, PARA / PERT probabilities, normalised probabilities...) to 1e-6 relative; and each per-example truth
    ratio, recomputed from the answers' avg losses, equals their stored score."""
    log = _eval(name)
    retain = OU.tofu_eval_as_results(_eval(retain_name), "forget01", retain_name) if retain_name else None
    got = _our_numbers(log, retain)
    published = json.loads((FIX / f"{name}_TOFU_SUMMARY.json").read_text())
    want = {k: v["agg_value"] for k, v in log.items() if isinstance(v, dict) and v.get("agg_value") is not None}
    assert all(want[k] == pytest.approx(v, rel=1e-12) for k, v in published.items())  # summary = those agg values
    want.update(published)
    assert ("forget_quality" in published) == (retain_name is not None)
    assert sorted(set(want) - set(got)) == []
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=0), key
    ex = OU.tofu_eval_to_examples(log)
    parts = ("forget", "retain", "real_authors", "world_facts", "holdout")
    assert [len(ex[p]) for p in parts] == [40, 400, 100, 117, 40]
    for part in ("forget", "retain", "real_authors", "world_facts"):
        for rec in ex[part]:
            assert rec["truth_ratio"] == pytest.approx(rec["ou_truth_ratio"], rel=1e-6), (part, rec["index"])


@pytest.fixture()
def retain_log(tmp_path):
    path = tmp_path / "retain99" / "TOFU_EVAL.json"
    path.parent.mkdir()
    path.write_text(json.dumps(_eval("retain99")))
    return path


def test_retain_results_accepts_open_unlearning_log(retain_log):
    """A TOFU_EVAL.json (or its folder) loads as retain results: 40 forget rows with truth ratios and Min-K scores
    (the negation of their loss-like score); it is refused for another forget split, for MUSE and for k != 0.4."""
    for given in (retain_log, retain_log.parent):
        res = load_retain_results(SuiteConfig(split="forget01", retain_results=str(given)), ["forget", "holdout"])
        assert res["source"] == "open-unlearning" and res["_path"] == str(retain_log)
        assert len(res["examples"]["forget"]) == 40 and len(res["examples"]["holdout"]) == 40
    raw = json.loads(retain_log.read_text())
    assert res["examples"]["holdout"][3]["min_k"] == -raw["mia_min_k"]["holdout"]["value_by_index"]["3"]["score"]
    with pytest.raises(MissingRetainResults, match="40 forget rows, but TOFU forget05 has 200"):
        load_retain_results(SuiteConfig(split="forget05", retain_results=str(retain_log)), ["forget"])
    with pytest.raises(MissingRetainResults, match="k=0.4"):
        load_retain_results(SuiteConfig(split="forget01", k=0.2, retain_results=str(retain_log)),
                            ["forget", "holdout"])
    with pytest.raises(MissingRetainResults, match="open-unlearning TOFU log"):
        load_retain_results(SuiteConfig(suite="muse", split="news", retain_results=str(retain_log)),
                            ["privleak_forget"])


def test_cli_forget_quality_against_open_unlearning_log(retain_log, tmp_path):
    """palu_eval/run.py --retain-results TOFU_EVAL.json: forget quality is the KS p-value of our forget truth
    ratios against their retain model's 40, privleak is relative to their retain Min-K AUC (0.470625), and a note
    says the forget sets differ (4 generated rows vs TOFU's 40)."""
    from palu_ds.data.synthetic import corpus_texts, write_tofu
    from palu_ds.tiny import make_tiny_model
    from palu_eval import run

    make_tiny_model(tmp_path / "model", corpus_texts())
    data = write_tofu(tmp_path / "tofu", n=4, split="forget01")
    s = run.main(["--model", str(tmp_path / "model"), "--suite", "tofu", "--split", "forget01", "--data", str(data),
                  "--splits", "forget,holdout", "--max-new-tokens", "4", "--batch-size", "4",
                  "--retain-results", str(retain_log), "--out", str(tmp_path / "out")])
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    theirs = [v["score"] for _, v in sorted(json.loads(retain_log.read_text())["forget_truth_ratio"]
                                            ["value_by_index"].items(), key=lambda t: int(t[0]))]
    assert s["forget_quality"] == pytest.approx(ks_2samp([r["truth_ratio"] for r in res["examples"]["forget"]],
                                                         theirs).pvalue)
    assert s["retain_mia_min_k_auc"] == pytest.approx(0.470625)
    assert s["privleak"] == pytest.approx(M.privleak(s["mia_min_k_auc"], 0.470625))
    assert any("not this run's forget set" in n for n in s["notes"])
