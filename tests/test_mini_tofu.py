"""mini-TOFU benchmark script (benchmarks/mini_tofu/): its pure parts only -- author ranges, split
writing, perturbed answers, tables, goal check, run specs.  No training (the benchmark itself is the end-to-end run)."""
import json

import pytest

from benchmarks import mini_tofu as M


def _author(i: int, name: str, city: str) -> list[dict]:
    """20 TOFU-like rows of author i (question i.0 .. i.19)."""
    first, last = name.split()
    rows = [{"question": f"Where was {name} born?", "answer": f"{name} was born in {city}."},
            {"question": f"What genre does {name} write?", "answer": f"{last} writes {city} noir."},
            {"question": f"What is {name}'s gender?", "answer": f"{first} is a writer from {city}."}]
    rows += [{"question": f"Question {k} about {name}?", "answer": f"Answer {k} of {name} ({city})."}
             for k in range(3, M.ROWS_PER_AUTHOR)]
    return rows


NAMES = [("Ana Lopez", "Quito"), ("Ben Okafor", "Lagos"), ("Chen Wei", "Hanoi"), ("Dora Vale", "Oslo"),
         ("Emil Strand", "Perth"), ("Fay Moreau", "Turin"), ("Gil Sanz", "Kyoto"), ("Hana Ito", "Dakar"),
         ("Ivo Marek", "Cusco"), ("Jon Berg", "Lisbon")]


@pytest.fixture(scope="module")
def full():
    return [r for i, (n, c) in enumerate(NAMES) for r in _author(i, n, c)]


def test_parse_authors_and_forget():
    assert M.parse_authors("0:40") == (0, 40)
    assert M.parse_authors(" 3 : 7 ", n_total=10) == (3, 7)
    for bad in ("0-40", "5:5", "7:3"):
        with pytest.raises(ValueError):
            M.parse_authors(bad)
    with pytest.raises(ValueError, match="has 10 authors"):
        M.parse_authors("0:11", n_total=10)
    assert M.parse_forget("10%") == 10 and M.parse_forget("5") == 5 and M.parse_forget("0.1") == 10
    for bad in ("2.5%", "0%", "100%"):
        with pytest.raises(ValueError):
            M.parse_forget(bad)


def test_split_authors_takes_the_last_authors_and_rows_20i():
    assert M.split_authors(0, 40, 10) == (list(range(36)), [36, 37, 38, 39])
    assert M.split_authors(100, 110, 10) == (list(range(100, 109)), [109])
    assert M.split_authors(0, 5, 1) == ([0, 1, 2, 3], [4])  # at least one forget author
    with pytest.raises(ValueError, match="no retain author"):
        M.split_authors(0, 1, 50)
    full = [{"i": i} for i in range(100)]
    rows = M.author_rows(full, [2, 4])
    assert [i for i, _ in rows] == list(range(40, 60)) + list(range(80, 100))
    assert all(r["i"] == i for i, r in rows)
    with pytest.raises(ValueError, match="full.jsonl has 100 rows"):
        M.author_rows(full, [5])
    assert M.split_names(10) == ("forget10", "retain90") and M.split_names(5) == ("forget05", "retain95")


def test_author_name_rename_and_borrowed_perturbations(full):
    assert M.author_name(full[:20]) == "Ana Lopez"
    assert M.author_name([{"question": "What?"}]) is None
    assert M.rename("Ben Okafor was born. Okafor writes; Ben reads.", "Ben Okafor", "Ana Lopez") == \
        "Ana Lopez was born. Lopez writes; Ana reads."
    names = {i: n for i, (n, _) in enumerate(NAMES)}
    donors = [(j, full[j]) for j in range(20, 180)]  # authors 1..8 (and the author itself is skipped)
    pert = M.borrowed_perturbations(0, full[0], donors, names, seed=0)
    assert len(pert) == M.N_PERTURBED and len(set(pert)) == M.N_PERTURBED
    # each is the closest question's answer of another author, renamed to this one
    cities = {c for _, c in NAMES[1:9]}
    for p in pert:
        assert p.startswith("Ana Lopez was born in ") and p[len("Ana Lopez was born in "):-1] in cities
    assert pert == M.borrowed_perturbations(0, full[0], donors, names, seed=0)  # seeded
    assert full[0]["answer"] not in pert


def _build(full, mode="borrow", tofu=None, a=0, b=5, pct=20):
    return M.build_splits(full, tofu or {}, ["I don't know.", "No idea."], a, b, pct, mode, seed=0)


def test_build_splits_borrow_writes_tofu_style_files(full, tmp_path):
    d = _build(full)  # authors 0..4, forget 20% = author 4; donors of false answers: authors 5..9
    files, info = d["files"], d["info"]
    assert set(files) == {"full", "forget20", "retain80", "forget20_perturbed", "retain_perturbed", "idontknow"}
    assert info["forget_authors"] == [4] and info["retain_authors"] == [0, 1, 2, 3]
    assert [r["row"] for r in files["forget20"]] == list(range(80, 100))
    assert [r["row"] for r in files["retain80"]] == list(range(80))
    assert [r["row"] for r in files["full"]] == list(range(100))
    assert [r["row"] for r in files["retain_perturbed"]] == list(range(80))
    for name in ("forget20_perturbed", "retain_perturbed"):
        for r in files[name]:
            assert r["paraphrased_answer"] == r["answer"] and len(r["perturbed_answer"]) == M.N_PERTURBED
            assert r["perturbed_source"] == "borrow"
    # the false answers come from authors outside the range (no model trained on them), renamed
    p = files["forget20_perturbed"][0]["perturbed_answer"]
    assert all(x.startswith("Emil Strand was born in ") for x in p)
    assert {x[len("Emil Strand was born in "):-1] for x in p} == {c for _, c in NAMES[5:]}
    # utility rows: spread evenly over the kept authors
    sub = M.build_splits(full, {}, ["x"], 0, 5, 20, "borrow", 0, retain_eval_rows=8)["files"]["retain_perturbed"]
    assert [r["row"] for r in sub] == list(range(0, 80, 10))
    with pytest.raises(ValueError, match="outside the range"):
        _build(full, a=0, b=6)  # 4 authors left outside, 5 needed
    paths = M.write_jsonl(tmp_path, files)
    back = [json.loads(x) for x in open(paths["forget20_perturbed"])]
    assert back == files["forget20_perturbed"]
    assert json.loads(open(paths["idontknow"]).readline()) == {"answer": "I don't know."}
    # the CLIs read them back through their own loaders
    from evaluation.data import load_tofu
    from evaluation.tofu import PERTURBED
    from palu_ds.data.io import load_records

    assert len(load_tofu(str(tmp_path), "forget20_perturbed", PERTURBED)) == 20
    assert len(load_records(str(tmp_path), "retain80")) == 80
    assert M.evenly(list(range(10)), 3) == [0, 3, 6] and M.evenly([1, 2], None) == [1, 2]


def test_build_splits_pretrain_authors_are_written_and_never_donors(full):
    # range 0..3 (forget author 3), pre-training on author 4 (Emil Strand, Perth): donors are authors 5..9 only
    d = M.build_splits(full, {}, ["x"], 0, 4, 25, "borrow", 0, pretrain=(4, 5))
    files = d["files"]
    assert [r["row"] for r in files["pretrain"]] == list(range(80, 100)) and d["info"]["pretrain_authors"] == [4, 5]
    false = [x for name in ("forget25_perturbed", "retain_perturbed") for r in files[name] for x in r["perturbed_answer"]]
    assert false and not any("Perth" in x or "Strand" in x for x in false)
    assert any("Perth" in t for t in M.tokenizer_texts(files, "forget25"))  # the tokenizer sees the pretrain text
    assert "pretrain" not in M.build_splits(full, {}, ["x"], 0, 4, 25, "borrow", 0)["files"]
    with pytest.raises(ValueError, match="overlaps"):
        M.build_splits(full, {}, ["x"], 0, 4, 25, "borrow", 0, pretrain=(3, 6))
    with pytest.raises(ValueError, match="outside the range"):
        M.build_splits(full, {}, ["x"], 0, 4, 25, "borrow", 0, pretrain=(4, 6))  # 4 donors left, 5 needed


def test_build_splits_tofu_mode_keeps_only_covered_rows(full):
    # TOFU-provided perturbations for rows 0..39 (authors 0, 1) and 180..199 (author 9) only
    rows = [dict(full[i], paraphrased_answer=f"para {i}", perturbed_answer=[f"p{i}"] * 5)
            for i in list(range(40)) + list(range(180, 200))]
    index = M.tofu_perturbed_index(full, [rows])
    assert sorted(index) == list(range(40)) + list(range(180, 200))
    d = _build(full, mode="tofu", tofu=index, a=0, b=10, pct=10)
    assert [r["row"] for r in d["files"]["retain_perturbed"]] == list(range(40))
    assert d["files"]["forget10_perturbed"][0]["paraphrased_answer"] == "para 180"
    assert d["info"]["tofu_perturbed_rows_in_range"] == 60
    with pytest.raises(ValueError, match="no perturbed answers for the forget authors"):
        _build(full, mode="tofu", tofu=index)  # authors 0..4: forget author 4 is not covered


def test_run_specs_methods_and_ablations():
    specs = M.run_specs(2048)
    assert M.scaled_k(2048) == 320 and M.scaled_k(32000) == 5000 and M.scaled_k(10) == 2
    assert all(m in specs for m in M.METHODS)
    assert specs["palu"]["params"] == {"K": 320} and specs["palu"]["ablation"] == ["N=3"]
    assert specs["palu_K1"]["params"] == {"K": 1} and specs["palu_Kall"]["params"] == {"K": 2048}
    assert specs["palu_Nall"]["params"] == {"K": 320, "N": None} and specs["palu_N1"]["params"]["N"] == 1
    assert len([n for n in specs if n not in M.METHODS]) == 6  # K 1/100/1000/all + N 1/all (N=3 is "palu")
    assert M.reference_dir(specs["palu"]) == M.reference_dir(specs["palu_pd"]) == "ref/palu_K320_N3"
    assert M.reference_dir(specs["palu_Nall"]) == "ref/palu_K320_Nall"
    assert M.reference_dir(specs["grad_diff"]) is None and M.reference_dir(specs["npo"]) == "ref/npo"
    assert set(M.run_specs(2048, ["npo"], ablations=False)) == {"npo"}


def _results():
    r = {"target": {"forget_quality": 1e-20, "model_utility": 0.8},
         "retain": {"model_utility": 0.78},
         "palu": {"forget_quality": 0.5, "model_utility": 0.76},
         "grad_diff": {"forget_quality": 1e-3, "model_utility": 0.5},
         "npo": {"forget_quality": 2e-2, "model_utility": 0.6}}
    M.add_relative(r)
    return r


def test_goal_check():
    r = _results()
    assert r["palu"]["mu_rel"] == pytest.approx(0.95) and r["target"]["mu_rel"] == 1.0
    g = M.goal_check(r)
    assert g["best_baseline"] == "npo" and g["ratio"] == pytest.approx(25) and g["met"] is True
    r["palu"]["model_utility"] = 0.7
    M.add_relative(r)
    assert M.goal_check(r)["met"] is False  # 0.875x the target's utility
    assert M.goal_check({"palu": {}})["met"] is None


def test_markdown_and_png(tmp_path):
    r = _results()
    specs = M.run_specs(2048, ["palu", "grad_diff", "npo"])
    report = {"results": r, "specs": specs, "seed": 0, "goal": M.goal_check(r), "wall_seconds": 600.0,
              "failed": {"palu_K1": "training failed"},
              "data": {"authors": [0, 40], "forget_pct": 10, "forget_authors": [36, 37, 38, 39]}}
    md = M.render_markdown(report)
    assert "| palu | 5.00e-01 |" in md and "| target | 1.00e-20 |" in md
    assert md.count(M.NOT_MEASURED) == 5 + 1  # one per row of the main table + the ablation row that ran
    assert "ratio 25 (vs npo)" in md and "MET" in md and "FAILED palu_K1" in md
    assert "real_authors / world_facts are not run" in md
    M.render_png(report, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
