"""End to end on generated data: the CLI (in-process), the in-training evaluate(), errors and the report."""

import json

import numpy as np
import pytest
from scipy.stats import ks_2samp

from palu_ds.data.synthetic import corpus_texts, write_muse, write_tofu
from palu_ds.tiny import make_tiny_model
from palu_eval import DataError, MissingRetainResults, SuiteConfig, evaluate
from palu_eval import report, run


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("suites")
    model, tok = make_tiny_model(root / "model", corpus_texts())
    return {"root": root, "model": model, "tok": tok, "model_dir": str(root / "model"),
            "tofu": str(write_tofu(root / "tofu", n=5)), "muse": str(write_muse(root / "muse", n=4))}


def _cli(env, *args):
    return run.main(["--model", env["model_dir"], "--max-new-tokens", "8", "--batch-size", "4", *args])


def test_tofu_cli_retain_then_unlearned(env):
    """The retain model's run (--no-forget-quality) writes per-example truth ratios; the second run reads them and
    its forget quality is ks_2samp of the two forget truth-ratio samples, recomputable from the two JSONs."""
    root = env["root"]
    _cli(env, "--suite", "tofu", "--split", "forget10", "--data", env["tofu"], "--no-forget-quality",
         "--out", str(root / "retain"))
    s = _cli(env, "--suite", "tofu", "--split", "forget10", "--data", env["tofu"],
             "--retain-results", str(root / "retain"), "--out", str(root / "unl"))
    a = json.loads((root / "unl" / "results.json").read_text())
    b = json.loads((root / "retain" / "results.json").read_text())
    assert [r["index"] for r in a["examples"]["forget"]] == list(range(5))
    want = ks_2samp([r["truth_ratio"] for r in a["examples"]["forget"]],
                    [r["truth_ratio"] for r in b["examples"]["forget"]]).pvalue
    assert s["forget_quality"] == pytest.approx(want)
    assert s["privleak"] == pytest.approx(0.0)  # same model on both sides
    assert len(s["model_utility_components"]) == 9 and "model_utility_note" not in s
    summary = json.loads((root / "unl" / "summary.json").read_text())
    assert summary["metrics"]["forget_quality"] == pytest.approx(want) and summary["name"] == "unl"
    for key in ("prob", "para_prob", "pert_probs", "truth_ratio", "rougeL_recall", "extraction_strength",
                "generation", "min_k"):
        assert key in a["examples"]["forget"][0]
    assert "normalized_prob" in a["examples"]["real_authors"][0]


def test_missing_retain_results_says_what_to_run(env):
    with pytest.raises(MissingRetainResults, match=r"palu_eval/run.py --model RETAIN_MODEL --suite tofu "
                                                   r"--split forget10 .*--no-forget-quality --out"):
        _cli(env, "--suite", "tofu", "--split", "forget10", "--data", env["tofu"], "--out", str(env["root"] / "x"))
    with pytest.raises(MissingRetainResults, match="not found"):
        _cli(env, "--suite", "tofu", "--split", "forget10", "--data", env["tofu"], "--out", str(env["root"] / "x"),
             "--retain-results", str(env["root"] / "nowhere.json"))


def test_in_training_evaluate_subset_of_splits(env):
    """evaluate() on an in-memory model in train mode: splits forget,retain only; utility over the 3 retain values
    with a note; train mode restored."""
    model, tok = env["model"], env["tok"]
    model.train()
    out = evaluate(model, tok, {"suite": "tofu", "split": "forget10", "data": env["tofu"],
                                "splits": "forget,retain", "forget_quality": False, "max_new_tokens": 4})
    assert model.training
    model.eval()
    s = out.summary
    assert s["model_utility_components"] == ["retain/prob", "retain/rougeL_recall", "retain/truth_ratio"]
    assert "3 of the 9" in s["model_utility_note"]
    assert "forget_quality" not in s and "privleak" not in s
    assert set(out.examples) == {"forget", "retain"}
    assert 0 < s["forget/prob"] < 1 and np.isfinite(s["forget/truth_ratio"])


def test_trainer_evaluator_is_the_engines_callable(env, tmp_path):
    """launch/train.py hands the engine trainer_evaluator(cfg): None when eval.every is 0; a bad eval setting is a
    ConfigError naming eval before any model loads; a call evaluates the run's eval section with the run's prompt
    format, labels summary.json with the step and the method and returns the flat summary."""
    from palu_ds.config import ConfigError, load_config
    from palu_eval import trainer_evaluator

    def cfg(*extra):
        return load_config(None, ["model.path=m", "data.forget.source=f", "data.retain.source=r", *extra])

    assert trainer_evaluator(cfg()) is None
    with pytest.raises(ConfigError, match="eval: TOFU split must look like"):
        trainer_evaluator(cfg("eval.every=2", "eval.split=forgetX"))
    run_cfg = cfg("eval.every=2", f"eval.data={env['tofu']}", "eval.splits=[forget,retain]", "eval.max_new_tokens=4")
    suite = SuiteConfig.from_run(run_cfg)
    assert suite.splits == ("forget", "retain") and not suite.forget_quality and suite.prompt == run_cfg.data.prompt
    summary = trainer_evaluator(run_cfg)(env["model"], env["tok"], step=4, out_dir=str(tmp_path / "step_4"))
    assert 0 < summary["forget/prob"] < 1 and "forget_quality" not in summary
    written = json.loads((tmp_path / "step_4" / "summary.json").read_text())
    assert written["step"] == 4 and written["method"] == "palu"


def test_muse_cli_and_privleak(env):
    root = env["root"]
    _cli(env, "--suite", "muse", "--split", "news", "--data", env["muse"], "--no-forget-quality",
         "--out", str(root / "muse_retain"))
    s = _cli(env, "--suite", "muse", "--split", "news", "--data", env["muse"],
             "--retain-results", str(root / "muse_retain" / "results.json"), "--out", str(root / "muse_unl"))
    for key in ("verbmem_f", "knowmem_f", "knowmem_r", "mia_min_k_pp_auc", "mia_min_k_auc"):
        assert 0 <= s[key] <= 1
    assert s["privleak"] == pytest.approx(0.0) and s["privleak_min_k_pp"] == pytest.approx(0.0)
    res = json.loads((root / "muse_unl" / "results.json").read_text())
    assert len(res["examples"]["knowmem_retain"]) == 4 and "min_k_pp" in res["examples"]["privleak_forget"][0]


def test_missing_field_names_file_row_and_field(env, tmp_path):
    bad = tmp_path / "tofu"
    write_tofu(bad, n=3)
    rows = [json.loads(line) for line in (bad / "retain_perturbed.jsonl").read_text().splitlines()]
    del rows[2]["paraphrased_answer"]
    (bad / "retain_perturbed.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataError, match=r"retain_perturbed.jsonl: row 2 has no field 'paraphrased_answer'"):
        evaluate(env["model"], env["tok"], SuiteConfig(data=str(bad), splits=("retain",), forget_quality=False))
    with pytest.raises(DataError, match=r"forget05_perturbed.jsonl: not found"):
        evaluate(env["model"], env["tok"], SuiteConfig(split="forget05", data=str(bad), forget_quality=False))


def test_report_png_and_markdown(env, tmp_path):
    """Needs the runs written by the tests above; renders one PNG and a markdown table with every run."""
    root = env["root"]
    runs = [root / n for n in ("unl", "retain", "muse_unl") if (root / n / "summary.json").exists()]
    if len(runs) < 3:
        pytest.skip("earlier CLI tests did not run")
    png, md = report.main([*map(str, runs), "--out", str(tmp_path / "rep" / "report.png")])
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    text = md.read_text()
    assert "| unl |" in text and "| retain |" in text and "| muse_unl |" in text and "forget quality" in text


def test_suite_config_validation():
    with pytest.raises(ValueError, match="unknown evaluation config keys"):
        evaluate(None, None, {"suite": "tofu", "splitz": "forget10"})
    with pytest.raises(ValueError, match="forget01 / forget05 / forget10"):
        SuiteConfig(suite="tofu", split="news")
    with pytest.raises(ValueError, match="unknown tofu splits"):
        SuiteConfig(splits="forget,retian")
    assert SuiteConfig(splits="forget, retain").parts == ("forget", "retain")
