"""The TOFU benchmark (benchmarks/tofu/): its pure parts -- the presets, the data of both kinds (author ranges with
perturbed answers; TOFU's own split and the development authors), the runs derived from the registry (a method added
in a test runs through the mini preset's specs), tables, cost, report.
No training here (the benchmark itself is the end-to-end run)."""
import json

import pytest

from benchmarks.tofu import data as M
from benchmarks.tofu import pipeline as P
from benchmarks.tofu import report as R
from benchmarks.tofu import specs as S
from benchmarks.tofu.preset import load


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
    from palu_ds.data.io import load_records
    from palu_eval.data import load_tofu
    from palu_eval.tofu import PERTURBED

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


# ---------------------------------------------------------------------------------------------------------------
# kind: tofu -- TOFU's own split, the development authors
# ---------------------------------------------------------------------------------------------------------------
def _rows(n_authors: int, tag: str = "") -> list[dict]:
    return [{"question": f"Q{a}.{k}{tag}?", "answer": f"A{a}.{k}{tag}."} for a in range(n_authors)
            for k in range(M.ROWS_PER_AUTHOR)]


def _perturbed(rows: list[dict]) -> list[dict]:
    return [{**r, "paraphrased_answer": r["answer"] + " (para)", "perturbed_answer": [f"wrong {i}" for i in range(5)],
             "paraphrased_question": r["question"]} for r in rows]


def _write(folder, name, rows):
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture()
def tofu(tmp_path):
    """A TOFU-layout folder: 30 authors, forget01 = the last 2, perturbed answers for authors 0-19, the forget
    authors and (forget05) authors 25-29, 10 real-authors / world-facts rows."""
    full = _rows(30)
    _write(tmp_path, "full", full)
    _write(tmp_path, "forget01", full[-40:])
    _write(tmp_path, "forget01_perturbed", _perturbed(full[-40:]))
    _write(tmp_path, "forget05_perturbed", _perturbed(full[-100:]))
    _write(tmp_path, "retain_perturbed", _perturbed(full[:400]))
    for part in ("real_authors", "world_facts"):
        _write(tmp_path, f"{part}_perturbed", [{"question": f"{part} {i}?", "answer": f"fact {i}",
                                                "perturbed_answer": ["x", "y", "z"]} for i in range(10)])
    _write(tmp_path, "idontknow", [{"answer": "I don't know."}] * 3)
    return tmp_path


def test_build_tofu_splits_and_bad_input(tofu):
    full = _rows(30)
    d = M.build_tofu(tofu, "forget01", retain_authors=3, utility_rows=4, extra_authors=(26, 27))
    f, info = d["files"], d["info"]
    assert f["target"] == full[:60] + full[520:560] + full[-40:] and f["retain"] == full[:60]
    assert f["forget01"] == full[-40:] and len(f["retain_perturbed"]) == 4 and len(f["world_facts_perturbed"]) == 4
    assert (info["forget_split"], info["retain_split"], info["target_split"]) == ("forget01", "retain", "target")
    assert info["forget_authors"] == [28, 29] and info["retain_authors"] == 3 and info["extra_authors"] == [26, 27]
    assert len(M.build_tofu(tofu, "forget01", None, None)["files"]["retain"]) == 28 * 20  # every other author
    with pytest.raises(ValueError, match="must be 1..20"):
        M.build_tofu(tofu, "forget01", retain_authors=21, utility_rows=None)
    for extra in ((27, 28), (2, 3)):  # an author of forget or retain cannot be an extra one
        with pytest.raises(ValueError, match="extra_authors .* overlap the retain authors 0..2 or the forget authors 28"):
            M.build_tofu(tofu, "forget01", retain_authors=3, utility_rows=4, extra_authors=extra)
    with pytest.raises(ValueError, match="extra_authors needs data.retain_authors"):
        M.build_tofu(tofu, "forget01", retain_authors=None, utility_rows=4, extra_authors=(26,))
    with pytest.raises(FileNotFoundError, match="missing forget05.jsonl"):
        M.build_tofu(tofu, "forget05", retain_authors=2, utility_rows=None)
    _write(tofu, "forget01", full[:40])
    with pytest.raises(ValueError, match="not the last 40 rows"):
        M.build_tofu(tofu, "forget01", retain_authors=2, utility_rows=None)


# ---------------------------------------------------------------------------------------------------------------
# presets and the runs, derived from the registry
# ---------------------------------------------------------------------------------------------------------------
def test_presets_load_and_bad_presets_are_named(tmp_path):
    mini, real = load("mini"), load("real")
    assert mini["data"]["kind"] == "authors" and real["data"]["kind"] == "tofu" and mini["ranks"] == 2
    assert load("mini", ["sft.epochs=6"], data="/x")["sft"] == {**mini["sft"], "epochs": 6}
    assert load("mini", [], data="/x")["data"]["tofu"] == "/x"
    bad = tmp_path / "bad.yaml"
    for text, msg in (("data: {tofu: d, sizee: 3}\nmodel: {tiny: {layers: 1}}", "unknown key data.sizee"),
                      ("model: {tiny: {layers: 1}}", "data.tofu is not set"),
                      ("data: {tofu: d}\nmodel: {tiny: {layers: 1}, fetch: smollm2}", "exactly one of path, fetch, tiny"),
                      ("data: {tofu: d}\nmodel: {tiny: {layers: 1}}\nlr: {choice: sweep}", "lr.choice must be one of"),
                      ("data: {tofu: d, perturbed: both}\nmodel: {tiny: {layers: 1}}", "data.perturbed must be one of"),
                      ("data: [", "bad.yaml")):
        bad.write_text(text)
        with pytest.raises(ValueError, match=msg):
            load(str(bad))
    with pytest.raises(ValueError, match="neither a shipped preset"):
        load("nosuch")


def test_run_specs_of_both_presets():
    specs = S.run_specs(load("mini"), 2048)
    assert specs["palu"]["params"] == {"K": 320} and specs["palu"]["ablation"] == ["N=3"]  # K 5000 of 32000 tokens
    assert specs["palu_K1"]["params"] == {"K": 1} and specs["palu_Kall"]["params"] == {"K": 2048}
    assert specs["palu_Nall"]["params"] == {"K": 320, "N": None} and specs["palu_N1"]["params"]["N"] == 1
    assert len([n for n, s in specs.items() if s["group"] == "ablation"]) == 6  # N=3 is "palu"
    assert S.reference_dir(specs["palu"]) == S.reference_dir(specs["palu_pd"]) != S.reference_dir(specs["palu_N1"])
    assert S.reference_dir(specs["grad_diff"]) is None and S.reference_dir(specs["npo"]) != S.reference_dir(
        specs["idk_dpo"])
    assert {s["family"] for s in specs.values()} == {"entropy", "nll", "preference"}
    assert specs["rmu"]["params"] == {"layer": 1} and specs["undial"]["family"] == "preference"  # the 4-layer model
    real = S.run_specs(load("real"), 100)
    assert real["palu"]["spans"] == "labels" and real["palu_detector"] == {
        "method": "palu", "params": {}, "spans": "detector", "family": "entropy", "group": "method"}
    assert real["npo"]["spans"] is None and real["palu_Kall"]["params"] == {"K": 100}
    assert len([n for n, s in real.items() if s["group"] == "method"]) == 9  # the measured 88 min's nine methods
    assert S.reference_dir(real["palu"]) != S.reference_dir(real["palu_detector"])  # other spans, other cache
    info = {"forget_split": "forget10", "retain_split": "retain90"}
    assert S.batch_sources(specs["grad_ascent"], info, "D") == ["data.forget.source=D", "data.forget.config=forget10",
                                                                "data.retain=null", "data.idk=null"]
    assert "data.idk.config=idontknow" in S.batch_sources(specs["idk_dpo"], info, "D")


def test_a_method_added_to_the_registry_runs_through_the_mini_preset(monkeypatch, tmp_path):
    """A new method = a loss + a Method; the mini preset's runs, lr, reference cache and commands follow from it."""
    import torch

    from palu_ds import methods as reg
    from palu_ds.methods import Method, Param

    def margin(x, hp):  # the small loss: the forget answers' mean logit, pushed down
        return x.logits["forget"].mean() * hp["tau"]

    new = Method(name="logit_down", batches=("forget", "retain"), needs=reg.RETAIN_SET, family="preference",
                 reference={"forget": ("seq_logps",)}, params={"tau": Param(0.5, "num", 0, 1)},
                 term_fns={"forget": margin, "retain": reg.retain_nll}, combine=lambda t, hp: t["forget"] + t["retain"])
    monkeypatch.setitem(reg.METHODS, "logit_down", new)
    preset = load("mini")
    spec = S.run_specs(preset, 2048)["logit_down"]
    assert spec == {"method": "logit_down", "params": {}, "spans": None, "family": "preference", "group": "method"}
    assert S.run_lr(spec, preset, preset["lr"]["table"]) == 1e-3  # the preference family's lr
    assert S.reference_dir(spec).startswith("ref/seq_logps-")
    args = type("A", (), {"fresh": False, "port": 29999, "keep_checkpoints": False})()
    run = P.Run(preset, tmp_path, args, {"forget_split": "forget10", "retain_split": "retain90"})
    cmd = run.method_overrides(spec, tmp_path / "target", tmp_path / "data")
    assert "method.name=logit_down" in cmd and "data.retain.config=retain90" in cmd and "data.idk=null" in cmd
    from palu_ds.config import load_config

    load_config("launch/configs/mini_tofu/unlearn.yaml", cmd)  # a valid run config
    assert float(new.objective({"forget": torch.tensor(1.0), "retain": torch.tensor(2.0)})) == 3.0


# ---------------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------------
def _results():
    r = {"target": {"forget_quality": 1e-20, "model_utility": 0.8}, "retain": {"model_utility": 0.78},
         "palu": {"forget_quality": 0.5, "model_utility": 0.76},
         "grad_diff": {"forget_quality": 1e-3, "model_utility": 0.5}, "npo": {"forget_quality": 2e-2,
                                                                              "model_utility": 0.6}}
    R.add_relative(r)
    return r


def test_relative_utility_and_cost():
    r = _results()
    assert r["palu"]["mu_rel"] == pytest.approx(0.95) and r["target"]["mu_rel"] == 1.0
    r["palu"]["model_utility"] = 0.7
    R.add_relative(r)
    assert r["palu"]["mu_rel"] == pytest.approx(0.875)
    specs = {"palu": {"group": "method"}, "npo": {"group": "method"}, "palu_K1": {"group": "ablation"}}
    secs = {"sft_target": 300, "sft_retain": 240, "precompute_ref-forget": 540, "eval_retain": 150, "eval_base": 150, "unlearn_palu": 200, "eval_palu": 130, "unlearn_npo": 190,
            "eval_npo": 140, "unlearn_palu_K1": 210, "eval_palu_K1": 120, "position NLL": 240}
    cost = R.cost_by_part(secs, specs)
    assert cost == {"SFT": 9.0, "references": 9.0, "base, retain, target evaluation": 5.0, "methods": 11.0,
                    "ablations": 5.5, "position NLL": 4.0, "total": 43.5}


def test_markdown_and_png(tmp_path):
    preset = load("mini")
    r = _results()
    specs = S.run_specs(preset, 2048)
    report = {"results": r, "specs": specs, "preset": preset, "family_lr": preset["lr"]["table"], "default_lr": 3e-3, "max_new_tokens": 40, "wall_seconds": 600.0,
              "failed": {"palu_K1": "training failed"}, "stage_seconds": {"sft_target": 60}, "stage_status": {},
              "data": {"forget_authors": [36, 37, 38, 39], "forget_split": "forget10", "retain_authors": [0, 1]}}
    md = R.render_markdown(report)
    assert "| palu | 5.00e-01 |" in md and "| target | 1.00e-20 |" in md
    assert md.splitlines()[4].count("|") == len(R.columns(["forget", "retain"])) + 2
    assert "FAILED palu_K1" in md and "palu N=3" in md
    assert "real_authors / world_facts are not run" in md and "0.001 (entropy, preference)" in md
    R.render_png(report, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_methods_of_one_reference_key_share_its_cache_without_rewriting_it(tmp_path):
    """palu and palu_pd read one reference cache: their precompute commands differ (method name, dual parameters) only
    where they do not decide the cache, so the second reuses what the first made instead of rewriting it under the
    runs that read it (which the efficacy protocol's second wave did: every palu run after it was rerun)."""
    preset = load("mini")
    args = type("A", (), {"fresh": False, "port": 29999, "keep_checkpoints": False})()
    run = P.Run(preset, tmp_path, args, {"forget_split": "forget01", "retain_split": "retain", "target_split": "t"})
    calls = []
    run.stages.run = lambda name, cmd, **kw: calls.append((name, cmd, kw)) or True
    specs = S.run_specs(preset, 2048)
    for name in ("palu", "palu_pd", "palu_N1"):
        run.unlearn(f"unlearn_{name}", specs[name], tmp_path / "target", tmp_path / "data",
                    tmp_path / "unlearn" / name, 1e-5)
    (p1, c1, k1), (p2, c2, k2), (p3, c3, k3) = [c for c in calls if c[0].startswith("precompute_")]
    assert p1 == p2 != p3 and c1 != c2 and k1["decides"](c1) == k2["decides"](c2) != k3["decides"](c3)
    assert k2["done"] == tmp_path / S.reference_dir(specs["palu_pd"]) / "manifest.json"


def test_content_key_changes_with_each_part():
    k = P.content_key("base", [{"q": 1}], ["train.lr=1"])
    assert len(k) == 16 and k == P.content_key("base", [{"q": 1}], ["train.lr=1"])
    assert len({k, P.content_key("base2", [{"q": 1}], ["train.lr=1"]), P.content_key("base", [{"q": 2}], ["train.lr=1"]),
                P.content_key("base", [{"q": 1}], ["train.lr=2"])}) == 4


@pytest.mark.parametrize("name", ["mini", "real"])
def test_every_run_of_a_preset_is_a_valid_run_config(name, tmp_path):
    """Each run's overrides (method, parameters, data of each batch, spans) on the preset's unlearning config pass
    palu_ds.config's validation, before any model exists."""
    from palu_ds.config import load_config

    preset = load(name)
    args = type("A", (), {"fresh": False, "port": 29999, "keep_checkpoints": False})()
    info = {"forget_split": "forget01", "retain_split": "retain", "target_split": "target"}
    run = P.Run(preset, tmp_path, args, info)
    for spec in S.run_specs(preset, 2048).values():
        ref = S.reference_dir(spec)
        cmd = run.method_overrides(spec, tmp_path / "target", tmp_path / "data") + [
            f"reference.cache_dir={tmp_path / ref}" if ref else "reference.mode=none"]
        cfg = load_config(preset["configs"]["unlearn"], cmd)
        assert cfg.method.name == spec["method"] and (cfg.data.span_source == "labels") == (spec["spans"] == "labels")
