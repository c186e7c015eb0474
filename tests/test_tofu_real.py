"""TOFU-on-a-real-model benchmark script (benchmarks/tofu_real.py): its pure parts only -- the data it builds from
TOFU-layout files, the SFT cache key, run specs, goal check, tables.  No training (the benchmark is the e2e run)."""
import json

import pytest

from benchmarks import tofu_real as T
from benchmarks import tofu_real_dev as D


def _rows(n_authors: int, tag: str = "") -> list[dict]:
    return [{"question": f"Q{a}.{k}{tag}?", "answer": f"A{a}.{k}{tag}."} for a in range(n_authors)
            for k in range(T.ROWS_PER_AUTHOR)]


def _perturbed(rows: list[dict]) -> list[dict]:
    return [{**r, "paraphrased_answer": r["answer"] + " (para)", "perturbed_answer": [f"wrong {i}" for i in range(5)],
             "paraphrased_question": r["question"]} for r in rows]


def _write(folder, name, rows):
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture()
def tofu(tmp_path):
    """A TOFU-layout folder: 30 authors, forget01 = the last 2, perturbed answers for authors 0-19 and the forget
    authors, 10 real-authors / world-facts rows."""
    full = _rows(30)
    _write(tmp_path, "full", full)
    _write(tmp_path, "forget01", full[-40:])
    _write(tmp_path, "forget01_perturbed", _perturbed(full[-40:]))
    _write(tmp_path, "retain_perturbed", _perturbed(full[:400]))
    for part in ("real_authors", "world_facts"):
        _write(tmp_path, f"{part}_perturbed", [{"question": f"{part} {i}?", "answer": f"fact {i}",
                                                "perturbed_answer": ["x", "y", "z"]} for i in range(10)])
    _write(tmp_path, "idontknow", [{"answer": "I don't know."}] * 3)
    return tmp_path


def test_build_data_splits(tofu):
    d = T.build_data(tofu, "forget01", retain_authors=3, utility_rows=4)
    f = d["files"]
    assert d["info"]["forget_authors"] == [28, 29] and d["info"]["retain_authors"] == 3
    assert f["retain"] == _rows(3) and f["target"] == _rows(3) + _rows(30)[-40:]
    assert f["forget01"] == _rows(30)[-40:] and len(f["forget01_perturbed"]) == 40
    # utility rows: spread evenly over the retain authors' perturbed rows (authors 0..2), not the first 4
    assert [r["question"] for r in f["retain_perturbed"]] == ["Q0.0?", "Q0.15?", "Q1.10?", "Q2.5?"]
    assert len(f["real_authors_perturbed"]) == 4 and f["world_facts_perturbed"][1]["question"] == "world_facts 2?"
    full = T.build_data(tofu, "forget01", retain_authors=None, utility_rows=None)
    assert full["info"]["retain_authors"] == 28 and len(full["files"]["retain_perturbed"]) == 400
    assert len(full["files"]["real_authors_perturbed"]) == 10


def test_target_learns_the_development_authors_between_retain_and_forget(tofu):
    """With the sweep, the one target (reported and development) is SFT on retain + development + forget authors;
    the retain model never sees the development authors; --full (no author left over) refuses them."""
    full = _rows(30)
    d = T.build_data(tofu, "forget01", retain_authors=3, utility_rows=4, dev_authors=(26, 27))
    assert d["files"]["target"] == _rows(3) + full[520:560] + full[-40:]
    assert d["files"]["retain"] == _rows(3) and d["info"]["dev_authors"] == [26, 27]
    plain = T.build_data(tofu, "forget01", retain_authors=3, utility_rows=4)  # --lr-choice rule: no sweep
    assert plain["files"]["target"] == _rows(3) + full[-40:]
    with pytest.raises(ValueError, match="overlap the retain authors 0..2 or the forget authors 28..29"):
        T.build_data(tofu, "forget01", retain_authors=3, utility_rows=4, dev_authors=(28,))
    with pytest.raises(ValueError, match="need --retain-authors"):
        T.build_data(tofu, "forget01", retain_authors=None, utility_rows=None, dev_authors=(26, 27))


def test_build_data_bad_input(tofu):
    with pytest.raises(ValueError, match="1..20"):
        T.build_data(tofu, "forget01", retain_authors=21, utility_rows=None)
    (tofu / "world_facts_perturbed.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="world_facts_perturbed.jsonl"):
        T.build_data(tofu, "forget01", retain_authors=2, utility_rows=None)


def test_build_data_names_a_broken_line(tofu):
    with open(tofu / "forget01_perturbed.jsonl", "a") as f:
        f.write("{not json\n")
    with pytest.raises(ValueError, match=r"forget01_perturbed.jsonl, line 41: not valid JSON"):
        T.build_data(tofu, "forget01", retain_authors=2, utility_rows=None)


def test_build_data_refuses_a_forget_file_that_is_not_the_tail_of_full(tofu):
    _write(tofu, "forget01", _rows(30)[:40])
    with pytest.raises(ValueError, match="not the last 40 rows"):
        T.build_data(tofu, "forget01", retain_authors=2, utility_rows=None)


def test_content_key_changes_with_each_part():
    k = T.content_key("base", [{"q": 1}], ["train.lr=1"])
    assert len(k) == 16 and k == T.content_key("base", [{"q": 1}], ["train.lr=1"])
    assert len({k, T.content_key("base2", [{"q": 1}], ["train.lr=1"]), T.content_key("base", [{"q": 2}], ["train.lr=1"]),
                T.content_key("base", [{"q": 1}], ["train.lr=2"])}) == 4


def test_specs_and_ablations():
    specs = T.run_specs(T.METHODS, T.ABLATIONS, vocab=100)
    assert specs["palu"] == {"method": "palu", "params": {}, "spans": "labels", "group": "method"}
    assert specs["palu_detector"]["method"] == "palu" and specs["palu_detector"]["spans"] == "detector"
    assert specs["palu_pd"]["spans"] == "labels" and specs["npo"]["spans"] is None
    assert specs["palu_Kall"]["params"] == {"K": 100} and specs["palu_Nall"]["params"] == {"N": None}
    assert specs["palu_K1"]["params"] == {"K": 1} and specs["palu_N1"]["params"] == {"N": 1}
    with pytest.raises(ValueError, match="unknown ablation"):
        T.ablation_params("K7x", 100)


def test_goal_and_table():
    res = {"target": {"model_utility": 0.5, "forget_quality": 1e-5}, "palu": {"forget_quality": 0.2, "model_utility": 0.46},
           "palu_detector": {"forget_quality": 0.05, "model_utility": 0.47},
           "grad_diff": {"forget_quality": 0.01, "model_utility": 0.3}, "npo": {"forget_quality": 0.001}}
    T.add_relative(res)
    g = T.goal(res)
    assert g["best_baseline"] == "grad_diff" and g["ratio"] == pytest.approx(20) and g["met"] is True
    assert g["detector_vs_labels"] == pytest.approx(0.25) and g["detector_met"] is False
    res["palu"]["model_utility"] = 0.4  # 0.8x the target's utility: goal 1 fails on utility
    T.add_relative(res)
    assert T.goal(res)["met"] is False
    table = T.markdown_table([("palu", res["palu"])])
    assert table.splitlines()[0].count("|") == len(T.COLUMNS) + 2 and "2.00e-01" in table and "0.800" in table


def test_cost_by_part_counts_every_stage_once():
    specs = T.run_specs(["palu", "npo"], ["K1"], vocab=100)
    secs = {"sft_target": 300, "sft_retain": 240, "sweep_eval_target": 360, "sweep_eval_retain": 120,
            "unlearn_sweep_npo_lr2e-05": 180, "sweep_eval_npo_lr2e-05": 150, "eval_retain": 150, "eval_base": 150,
            "unlearn_palu": 200, "eval_palu": 130, "unlearn_npo": 190, "eval_npo": 140, "unlearn_palu_K1": 210,
            "eval_palu_K1": 120, "position NLL": 240}
    cost = T.cost_by_part(secs, specs)
    assert cost == {"SFT": 9.0, "development sweep": 13.5, "base, retain, target evaluation": 5.0,
                    "methods": 11.0, "ablations": 5.5, "position NLL": 4.0, "total": 48.0}
    assert sum(v for k, v in cost.items() if k != "total") == pytest.approx(cost["total"])


# ---------------------------------------------------------------------------------------------------------------
# The learning-rate sweep on development authors (benchmarks/tofu_real_dev.py)
# ---------------------------------------------------------------------------------------------------------------
def test_dev_data_holds_the_development_authors_with_tofus_perturbed_answers(tofu):
    full = _rows(30)
    _write(tofu, "forget05_perturbed", _perturbed(full[-100:]))  # authors 25-29, as TOFU's forget05 (190-199)
    main = T.build_data(tofu, "forget01", retain_authors=3, utility_rows=4)
    dev = D.build_dev_data(tofu, "forget01", main["files"], retain_authors=3, dev_authors=(26, 27))
    f = dev["files"]
    assert f["forget01"] == full[520:560] and "target" not in f  # the sweep unlearns from the reported target
    assert [r["question"] for r in f["forget01_perturbed"]] == [r["question"] for r in full[520:560]]
    assert f["forget01_perturbed"][0]["paraphrased_answer"] == "A26.0. (para)"
    assert f["retain"] == main["files"]["retain"]
    assert f["real_authors_perturbed"] == main["files"]["real_authors_perturbed"]
    assert main["files"]["forget01"] == full[-40:]  # the reported run's files are left alone
    with pytest.raises(ValueError, match="overlap the retain authors 0..2 or the forget authors 28..29"):
        D.build_dev_data(tofu, "forget01", main["files"], retain_authors=3, dev_authors=(27, 28))
    with pytest.raises(ValueError, match=r"no perturbed answers for rows \[400"):
        D.build_dev_data(tofu, "forget01", main["files"], retain_authors=3, dev_authors=(20, 21))


def test_grid_and_families():
    assert D.grid(2e-4) == [2e-5, 6e-5, 2e-4]
    assert {D.family_of(n) for n in ("palu", "palu_detector", "palu_K100", "palu_Nall", "palu_pd", "pd_flat")} == \
        {"entropy"}
    assert D.family_of("grad_ascent") == D.family_of("grad_diff") == "nll"
    assert D.family_of("simnpo") == D.family_of("idk_dpo") == D.family_of("npo") == "preference"
    assert set(D.REPRESENTATIVES) == set(D.FAMILY.values())
    assert all(D.family_of(rep) == fam for fam, rep in D.REPRESENTATIVES.items())
    with pytest.raises(KeyError, match="no lr family"):
        D.family_of("sft")


def test_choose_lr_rule():
    def m(fq, mu):
        return {"forget_quality": fq, "model_utility": mu}

    # the best forget quality among lrs at >= 0.9x the target's utility (1e-4 forgets most but costs utility)
    r = D.choose_lr({1e-5: {"a": m(0.01, 1.0)}, 3e-5: {"a": m(0.2, 0.95)}, 1e-4: {"a": m(0.9, 0.5)}}, 1.0)
    assert r["lr"] == 3e-5 and "at utility >= 0.9x" in r["reason"]
    assert r["scores"][1e-4] == {"fq_gmean": pytest.approx(0.9), "mu_rel": pytest.approx(0.5)}
    # geometric mean over a family's runs, mean utility; a tie in forget quality goes to the higher utility
    r = D.choose_lr({1: {"a": m(0.1, 0.9), "b": m(0.4, 1.0)}, 2: {"a": m(0.2, 1.0), "b": m(0.2, 1.0)}}, 1.0)
    assert r["scores"][1]["fq_gmean"] == pytest.approx(0.2) and r["lr"] == 2
    # no lr keeps 0.9x: the highest utility
    r = D.choose_lr({1: {"a": m(0.5, 0.3)}, 2: {"a": m(0.9, 0.2)}}, 1.0)
    assert r["lr"] == 1 and "highest utility" in r["reason"]
    # forget quality 0 (a KS p-value that underflows) does not break the geometric mean
    assert D.choose_lr({1: {"a": m(0.0, 1.0)}}, 1.0)["scores"][1]["fq_gmean"] > 0
    with pytest.raises(ValueError, match="development target's utility"):
        D.choose_lr({1: {"a": m(0.5, 1.0)}}, 0.0)


def test_sweep_report_and_lr_text():
    sweep = {"dev_authors": [196, 197], "target": {"model_utility": 0.4, "forget_quality": 1e-4},
             "families": {"nll": {"runs": {"2e-05": {"grad_diff": {"forget_quality": 0.01, "model_utility": 0.4,
                                                                    "mu_rel": 1.0}},
                                           "0.0002": {"grad_diff": {"forget_quality": 0.3, "model_utility": 0.3,
                                                                     "mu_rel": 0.75}}},
                                  "choice": {"lr": 2e-5, "reason": "highest forget quality at utility >= 0.9x"}}}}
    md = D.sweep_markdown(sweep)
    assert "nll: grad_diff lr 2e-05 (chosen)" in md and "nll: grad_diff lr 0.0002 |" in md
    assert "- nll: lr 2e-05 (highest forget quality" in md and "[196, 197]" in md
    assert T.lr_text({"lr_choice": "sweep", "family_lr": {"entropy": 2e-5, "nll": 2e-4, "preference": 2e-5}}) == \
        "2e-05 (entropy, preference), 0.0002 (nll) (families of the development sweep)"
    assert T.lr_text({"lr_choice": "rule"}).startswith("0.0002 for every method")


def test_dev_sweep_unlearns_the_reported_target_and_compares_with_its_utility(tofu, tmp_path):
    """The sweep's wiring, with a recording stand-in for the stages: the retain model and the target are scored on
    the development forget part only, every representative at every lr of the grid starts from the reported target
    and shares one reference cache per representative, and utility is relative to the reported target's."""
    full = _rows(30)
    _write(tofu, "forget05_perturbed", _perturbed(full[-100:]))
    data = T.build_data(tofu, "forget01", retain_authors=3, utility_rows=4, dev_authors=(26, 27))
    target = tmp_path / "models" / "target-abc" / "model"
    lr_fq = {2e-5: 0.01, 6e-5: 0.2, 2e-4: 0.9}
    lr_mu = {2e-5: 0.5, 6e-5: 0.46, 2e-4: 0.2}

    class FakeRun:
        out, split, keep = tmp_path / "out", "forget01", False
        calls: list = []

        def evaluate(self, stage, model, data_dir, out, retain_eval, parts="forget,retain,real_authors,world_facts"):
            self.calls.append(("eval", stage, model, parts))
            assert (data_dir / "forget01.jsonl").read_text().count("\n") == 40
            if stage in ("sweep_eval_retain", "sweep_eval_target"):
                return {"forget_quality": 1e-4}
            lr = float(stage.rsplit("_lr", 1)[1])
            return {"forget_quality": lr_fq[lr], "model_utility": lr_mu[lr]}

        def unlearn(self, name, spec, model, data_dir, run_dir, lr, reference=None):
            self.calls.append(("unlearn", name, model, reference))
            return True

    run = FakeRun()
    sweep = T.dev_sweep(run, tofu, data, data["info"], target, {"model_utility": 0.5}, tmp_path / "retain",
                        T.run_specs(T.METHODS, [], vocab=100), vocab=100)
    evals = {c[1]: c for c in run.calls if c[0] == "eval"}
    assert evals["sweep_eval_retain"][3] == evals["sweep_eval_target"][3] == "forget"
    assert evals["sweep_eval_target"][2] == target
    unlearns = [c for c in run.calls if c[0] == "unlearn"]
    assert len(unlearns) == 3 * len(D.REPRESENTATIVES) and all(c[2] == target for c in unlearns)
    refs = {c[1]: c[3] for c in unlearns}
    assert refs["sweep_npo_lr2e-05"] == refs["sweep_npo_lr0.0002"] != refs["sweep_grad_diff_lr2e-05"]
    assert refs["sweep_npo_lr2e-05"].name == "npo-target-abc"
    assert sweep["target"] == {"forget_quality": 1e-4, "model_utility": 0.5}
    nll = sweep["families"]["nll"]
    assert nll["runs"]["6e-05"]["grad_diff"]["mu_rel"] == pytest.approx(0.92)
    assert nll["choice"]["lr"] == 6e-5  # 2e-4 forgets most but keeps 0.4x; 6e-5 is the best at >= 0.9x
    assert json.loads((run.out / "dev" / "sweep.json").read_text())["families"]["nll"]["choice"]["lr"] == 6e-5
