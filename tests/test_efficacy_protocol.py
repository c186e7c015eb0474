"""The efficacy protocol (benchmarks/tofu/protocol.py, rules.py; BENCHMARKS issue 25): the selection and decision
rules on constructed numbers, the pair data, the plan of the efficacy preset (every grid run a valid run config),
the cost by part and the report, without training anything."""
import json

import pytest

from benchmarks.tofu import data as M
from benchmarks.tofu import pipeline as P
from benchmarks.tofu import protocol as E
from benchmarks.tofu import rules as R
from benchmarks.tofu.preset import load
from benchmarks.tofu.specs import reference_dir, run_specs


def _p(lr, epoch, ks, mu_rel):
    return {"lr": lr, "epoch": epoch, "ks": ks, "mu_rel": mu_rel}


def test_select_point_lowest_d_at_kept_utility_and_its_tie_breaks():
    pts = [_p(1e-5, 1, 0.30, 1.00), _p(1e-4, 5, 0.10, 0.96), _p(1e-4, 10, 0.05, 0.50)]
    s = R.select_point(pts)
    assert s["point"] == pts[1] and not s["keeps_no_point"]  # 0.05 loses utility
    tie = [_p(3e-5, 3, 0.1, 0.97), _p(1e-5, 5, 0.1, 0.99)]
    assert R.select_point(tie)["point"]["mu_rel"] == 0.99  # equal D: the higher utility
    tie = [_p(3e-5, 5, 0.1, 0.97), _p(1e-4, 2, 0.1, 0.97)]
    assert R.select_point(tie)["point"]["epoch"] == 2  # then fewer epochs
    tie = [_p(1e-4, 2, 0.1, 0.97), _p(1e-5, 2, 0.1, 0.97)]
    assert R.select_point(tie)["point"]["lr"] == 1e-5  # then the lower lr
    assert R.select_point([_p(1e-5, 1, 0.3, 0.95)])["point"]["ks"] == 0.3  # 0.95 itself keeps utility
    none = R.select_point([_p(1e-5, 1, 0.3, 0.90), _p(1e-4, 10, 0.05, 0.2)])
    assert none["keeps_no_point"] and none["point"]["mu_rel"] == 0.90 and "highest utility" in none["reason"]
    with pytest.raises(ValueError, match="at least one grid point"):
        R.select_point([])
    with pytest.raises(ValueError, match="without KS D"):
        R.select_point([_p(1e-5, 1, None, 1.0)])


def test_best_baseline_keeps_utility_first():
    pair = {"npo": {"ks": 0.1, "mu_rel": 0.5}, "grad_diff": {"ks": 0.3, "mu_rel": 1.0},
            "simnpo": {"ks": 0.2, "mu_rel": 0.96}}
    assert R.best_baseline(pair, ["npo", "grad_diff", "simnpo"]) == "simnpo"
    two = {"npo": {"ks": 0.1, "mu_rel": 0.5}, "gd": {"ks": 0.3, "mu_rel": 0.6}}
    assert R.best_baseline(two, ["npo", "gd"]) == "npo"
    with pytest.raises(ValueError, match="none of the baselines"):
        R.best_baseline(pair, ["idk_dpo"])


def _pair(palu_mu=1.0, b_mu=1.0, low=0.05, high=0.2, seed_diff=0.1, b_none=False, palu_none=False):
    return {"palu": {"mu_rel": palu_mu, "keeps_no_point": palu_none},
            "baseline": {"mu_rel": b_mu, "keeps_no_point": b_none},
            "diff": {"diff": (low + high) / 2, "low": low, "high": high}, "seed_diff": seed_diff}


def test_decision_rule_beats_loses_and_not_resolved():
    assert R.decide({"A": _pair(), "B": _pair()})["verdict"] == "beats"  # interval above 0, seed agrees
    d = R.decide({"A": _pair(), "B": _pair(seed_diff=-0.025)})  # the seed rerun flips the sign on B
    assert d["verdict"] == "not resolved" and d["per_pair"] == {"A": "palu", "B": None}
    assert d["intervals"]["B"] == [0.05, 0.2]
    assert R.decide({"A": _pair(low=-0.01), "B": _pair()})["verdict"] == "not resolved"  # interval holds 0
    assert R.decide({"A": _pair(b_mu=0.9, low=-0.3, high=-0.1), "B": _pair(b_none=True, low=-0.3, high=-0.1,
                                                                         seed_diff=-0.1)})["verdict"] == "beats"
    loses = R.decide({"A": _pair(low=-0.3, high=-0.1, seed_diff=-0.05), "B": _pair(palu_mu=0.9, low=0.1)})
    assert loses["verdict"] == "loses" and loses["per_pair"] == {"A": "baseline", "B": "baseline"}
    # PALU must keep utility itself: a baseline without a kept point does not make PALU win when PALU loses it too
    assert R.decide({"A": _pair(palu_mu=0.9, b_none=True), "B": _pair()})["verdict"] == "not resolved"
    assert R.decide({"A": _pair(seed_diff=None), "B": _pair()})["verdict"] == "not resolved"  # no seed rerun
    g = R.goal({"npo": {"verdict": "beats"}}, {"A": {"fq": 0.6, "mu_rel": 0.97}, "B": {"fq": 0.4, "mu_rel": 1.0}})
    assert g["beats_every_baseline"] and g["forget_quality_at_utility"] == {"A": True, "B": False} and not g["met"]


# ---------------------------------------------------------------------------------------------------------------
# data and plan
# ---------------------------------------------------------------------------------------------------------------
def _rows(n_authors):
    return [{"question": f"Q{a}.{k}?", "answer": f"A{a}.{k}."} for a in range(n_authors) for k in range(20)]


def _perturbed(rows):
    return [{**r, "paraphrased_answer": r["answer"] + " ", "perturbed_answer": [r["answer"].replace("A", "B", 1)]}
            for r in rows]


@pytest.fixture()
def tofu(tmp_path):
    """30 authors, forget01 = 28-29, forget05_perturbed = authors 25-29, PALU-style labels for 25-29."""
    full = _rows(30)

    def write(name, rows):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write("full", full)
    write("forget01", full[-40:])
    write("forget01_perturbed", _perturbed(full[-40:]))
    write("forget05_perturbed", _perturbed(full[-100:]))
    write("retain_perturbed", _perturbed(full[:400]))
    for part in ("real_authors", "world_facts"):  # rows the target learned (a tiny model's utility is then > 0)
        write(f"{part}_perturbed", [{**r, "perturbed_answer": [full[(i + 7) % 40]["answer"]]}
                                    for i, r in enumerate(full[:30])])
    write("idontknow", [{"answer": "I don't know."}] * 3)
    write("labels", [{**r, "target_words": json.dumps([{"word": "A", "start": 0, "end": 1}]),
                      "common_words": []} for r in full[-100:]])
    return tmp_path


def test_pairs_hold_their_authors_labels_and_utility_rows(tofu):
    main = M.build_tofu(tofu, "forget01", 3, None, (25, 26, 27))
    assert len(main["files"]["target"]) == 60 + 60 + 40  # retain + the other protocol authors + forget01
    dev = E.build_pair(tofu, main, [26, 27], 4, "forget05_perturbed", tofu / "labels.jsonl", 25)["files"]
    assert [r["question"] for r in dev["forget01"]] == [f"Q{a}.{k}?" for a in (26, 27) for k in range(20)]
    assert dev["forget01_perturbed"][0]["perturbed_answer"] == ["B26.0."]
    assert dev["labels"][0]["question"] == "Q26.0?" and len(dev["labels"]) == 40
    assert len(dev["retain_perturbed"]) == len(dev["world_facts_perturbed"]) == 4 and len(dev["retain"]) == 60
    full = E.build_pair(tofu, main, [28, 29], None, "forget05_perturbed", tofu / "labels.jsonl", 25)["files"]
    assert len(full["retain_perturbed"]) == 60 and len(full["real_authors_perturbed"]) == 30
    with pytest.raises(ValueError, match="row 20 is not TOFU's row 540"):
        E.build_pair(tofu, main, [27], None, "forget05_perturbed", tofu / "labels.jsonl", 26)
    with pytest.raises(ValueError, match=r"no perturbed answers for rows \[400"):
        E.build_pair(tofu, main, [20], None, "forget05_perturbed", tofu / "labels.jsonl", 25)


def test_efficacy_plan_and_every_run_is_a_valid_run_config(tmp_path):
    """The efficacy preset's plan: 5 methods x 3 lrs on the development authors, pd_flat with PDU's dual warm-up from
    the preset, every grid and reported run's overrides (in-run evaluation included) valid for palu_ds.config."""
    from palu_ds.config import load_config

    preset = load("efficacy")
    E.check_protocol(preset)
    plan = E.grid_plan(preset)
    assert len(plan) == 15 and {g["lr"] for g in plan} == {1e-5, 3e-5, 1e-4}
    assert E.protocol_authors(preset["protocol"]) == [194, 195, 196, 197, 198, 199]
    assert E.steps_per_epoch(preset, 40) == 10 and [E.epoch_step(e, 10) for e in (1, 2, 3, 5, 10)] == [
        10, 20, 30, 50, 100]
    args = type("A", (), {"fresh": False, "port": 29999, "keep_checkpoints": False})()
    run = P.Run(preset, tmp_path, args, {"forget_split": "forget01", "retain_split": "retain", "target_split": "target"})
    run.max_new = 80
    specs = run_specs(preset, 2048)
    assert specs["pd_flat"]["params"] == {"dual_update": "micro_batch", "dual_warmup_epochs": 5}
    for g in plan:
        cmd = run.method_overrides(specs[g["method"]], tmp_path / "t", tmp_path / "dev" / "data",
                                   tmp_path / "dev" / "data" / "labels.jsonl")
        ref = reference_dir(specs[g["method"]])
        cmd += run.recipe("unlearn") + [f"train.lr={g['lr']}"]
        cmd.append(f"reference.cache_dir={tmp_path / 'dev' / ref}" if ref else "reference.mode=none")
        cmd += E.eval_overrides(run, tmp_path / "dev", [1, 2, 3, 5, 10])
        cfg = load_config(preset["configs"]["unlearn"], cmd)
        assert cfg.eval.epochs == [1, 2, 3, 5, 10] and cfg.eval.split == "forget01" and cfg.eval.dtype == "bfloat16"
        assert cfg.train.weight_decay == 0.01 and cfg.train.warmup_steps == 10 and cfg.train.epochs == 10
        assert cfg.eval.steps(10) == frozenset({10, 20, 30, 50, 100})
        if specs[g["method"]]["spans"] == "labels":
            assert cfg.data.forget.source.endswith("dev/data/labels.jsonl") and cfg.data.span_source == "labels"
    sel = {m: {"point": {"lr": 3e-5, "epoch": 5}, "keeps_no_point": False} for m in specs}
    rep = E.report_plan(sel, preset["protocol"])
    assert len(rep) == 10 and {r["pair"] for r in rep} == {"A", "B"} and all(r["seed"] is None for r in rep)
    seeds = E.report_plan(sel, preset["protocol"], {"A": "npo", "B": "grad_diff"})
    assert [(r["pair"], r["name"]) for r in seeds] == [("A", "palu_seed1"), ("A", "npo_seed1"), ("B", "palu_seed1"),
                                                       ("B", "grad_diff_seed1")]
    for bad, msg in ((["protocol.method=nosuch"], "protocol.method 'nosuch'"),
                     (["protocol.dev=[198]"], "share authors"), (["protocol.epochs=[20]"], "go past")):
        with pytest.raises(ValueError, match=msg):
            E.check_protocol(load("efficacy", bad))


def test_in_run_evaluation_in_bf16_scores_what_the_saved_model_scores_in_bf16(tmp_path):
    """eval.dtype: the in-training evaluator's cast copy equals palu_eval/run.py's ``from_pretrained(dtype=...)`` of
    the saved model, weights and logits bit for bit; a bad eval.dtype is a config error."""
    import torch
    from transformers import AutoModelForCausalLM

    from palu_ds.config import ConfigError, load_config
    from palu_ds.tiny import build_model_dir
    from palu_eval.api import cast_copy

    build_model_dir(str(tmp_path), ["a b c d e", "f g h i"], vocab_size=64, hidden=32, layers=2, heads=2,
                    intermediate=64, max_positions=64)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-3)  # fp32 values that bf16 rounds
    model.save_pretrained(str(tmp_path))
    saved = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    copy = cast_copy(model, "bfloat16")
    assert copy.dtype == torch.bfloat16 and model.dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), copy.state_dict().values()))
    x = torch.tensor([[1, 5, 7, 9]])
    assert torch.equal(saved(x).logits, copy(x).logits)
    with pytest.raises(ConfigError, match="eval.dtype must be float32, bfloat16 or float16"):
        load_config("launch/configs/mini_tofu/unlearn.yaml", ["eval.dtype=bf16"])


def test_fp32_check_reruns_one_grid_point_in_fp32(tmp_path):
    """protocol.fp32_check: the named point of a bf16 protocol runs again with train.precision=fp32 (the protocol's
    own recipe untouched), evaluated after the last epoch, reported beside the grid's point."""
    preset = load("efficacy", ["protocol.fp32_check={method: palu, lr: 3.0e-5}", "unlearn.precision=bf16"])
    calls = []

    class FakeRun:
        p, failed = preset, {}
        info, max_new = {"forget_split": "forget01"}, 80
        args = type("A", (), {"keep_checkpoints": False})()
        drop = P.Run.drop  # the real one: the run's unused model removed

        def unlearn(self, stage, spec, target, data, run_dir, lr, extra=(), done=None, labels=None):
            calls.append((stage, self.p["unlearn"]["precision"], lr, [e for e in extra if e.startswith("eval.epochs")]))
            done.parent.mkdir(parents=True)
            done.write_text(json.dumps({"metrics": {"ks_statistic": 0.2, "forget_quality": 0.3, "model_utility": 0.4}}))
            return True

    dev = {"dir": tmp_path / "dev", "rows": 40, "labels": tmp_path / "labels.jsonl"}
    grid = {"palu": [{"lr": 3e-5, "epoch": 10, "ks": 0.25, "mu_rel": 1.0}, {"lr": 3e-5, "epoch": 5, "ks": 0.3}]}
    run = FakeRun()
    out = E.stage_fp32_check(run, {"palu": {}}, {"target": tmp_path / "t"}, dev, 0.5, grid)
    assert calls == [("grid_palu_lr3e-05_fp32", "fp32", 3e-5, ["eval.epochs=[10]"])]
    assert run.p["unlearn"]["precision"] == "bf16"
    assert out["grid"]["ks"] == 0.25 and out["fp32"]["ks"] == 0.2 and out["fp32"]["mu_rel"] == pytest.approx(0.8)
    with pytest.raises(ValueError, match=r"protocol.fp32_check needs \{method, lr\}"):
        E.check_protocol(load("efficacy", ["protocol.fp32_check={method: nosuch, lr: 1.0e-5}"]))
    with pytest.raises(ValueError, match=r"set unlearn.precision: bf16"):
        E.check_protocol(load("efficacy", ["unlearn.precision=fp32"]))
    assert E.stage_fp32_check(type("R", (), {"p": load("efficacy", ["protocol.fp32_check=null"])})(), {}, {}, dev,
                              0.5, grid) is None


def test_the_shipped_protocol_trains_in_bf16_and_checks_one_point_in_fp32():
    """The pre-registration's conditional: bf16 training (issue 29) landed before the first grid run, so every
    training of the protocol (SFT and unlearning) runs in bf16 and palu at lr 3e-5, 10 epochs, in fp32 beside it."""
    preset = load("efficacy")
    assert preset["sft"]["precision"] == preset["unlearn"]["precision"] == "bf16"
    assert preset["protocol"]["fp32_check"] == {"method": "palu", "lr": 3e-5}
    assert preset["ds_config"] == "ds_configs/cpu/zero0.json"  # bf16 = autocast: fp32 weights and Adam
    E.check_protocol(preset)


def test_snapshot_hook_saves_at_its_steps_and_ends_the_run_after_the_last(tmp_path):
    """benchmarks/tofu/train_snapshot.py: the model is written after each listed step, and the run's total_steps is
    cut to the last of them there (a reported run trains no step past its selected epoch); no steps: no cut."""
    from benchmarks.tofu.train_snapshot import Snapshots, pop_steps

    class FakeTrainer:
        out_dir, step, total_steps, saved = str(tmp_path), 0, 100, []

        def save_model(self, path):
            self.saved.append(path)

    argv = ["train.py", "--snapshot-steps", "10,30", "--deepspeed", "d.json"]
    hook, t = Snapshots(pop_steps(argv)), FakeTrainer()
    assert argv == ["train.py", "--deepspeed", "d.json"]
    for t.step in range(1, 31):
        assert t.total_steps == 100
        hook.after_step(t)
    assert t.saved == [str(tmp_path / "snapshots" / "step_000010"), str(tmp_path / "snapshots" / "step_000030")]
    assert t.total_steps == 30
    idle = FakeTrainer()
    idle.step = 100
    Snapshots([]).after_step(idle)
    assert idle.total_steps == 100
    with pytest.raises(SystemExit, match="--snapshot-steps takes optimizer steps like 30,50"):
        pop_steps(["x", "--snapshot-steps", "ten"])


def test_protocol_cost_by_part():
    secs = {"sft_target": 300, "sft_retain": 120, "eval_dev_retain": 60, "precompute_dev-ref-x": 60,
            "grid_palu_lr1e-05": 660, "report_A_npo": 600, "report_A_npo_seed1": 600, "position NLL": 60}
    assert E.cost_by_part(secs) == {"SFT": 7.0, "reference evaluations": 1.0, "references (precompute)": 1.0,
                                    "grid": 11.0, "report": 10.0, "seed reruns": 10.0, "position NLL": 1.0,
                                    "total": 41.0}


# ---------------------------------------------------------------------------------------------------------------
# one tiny run of the whole protocol
# ---------------------------------------------------------------------------------------------------------------
TINY_PRESET = """
title: tiny efficacy
report: efficacy
data: {{tofu: {tofu}, kind: tofu, split: forget01, retain_authors: 2, utility_rows: null}}
model: {{path: {base}}}
max_length: 64
ranks: 1
threads: 1
configs: {{sft: launch/configs/mini_tofu/finetune.yaml, unlearn: launch/configs/mini_tofu/unlearn.yaml}}
sft: {{lr: 3.0e-3, epochs: 8, batch_size: 8, warmup_steps: 1, scheduler: cosine, weight_decay: 0.0}}
unlearn: {{epochs: 2, batch_size: 8, scheduler: linear, warmup_steps: 1, weight_decay: 0.01, max_grad_norm: 1.0}}
methods: [palu, grad_diff]
params: {{palu: {{K: 8}}}}
spans: {{labels: {tofu}/labels.jsonl}}
eval: {{parts: [forget, retain, real_authors, world_facts], dtype: bfloat16, base: false, position_nll: true,
        max_new_tokens: 8}}
protocol: {{method: palu, dev: [26, 27], pairs: {{A: [28, 29]}}, lrs: [1.0e-3], epochs: [1, 2], dev_utility_rows: 4,
            perturbed: forget05_perturbed, labels_first_author: 25, n_boot: 200}}
"""


@pytest.mark.e2e
@pytest.mark.slow
def test_tiny_protocol_end_to_end_and_resume(tofu, tmp_path):
    """The whole protocol on a tiny Llama and a TOFU-like folder (2 methods, 1 lr, 2 epochs, one reported pair):
    every part runs through the real CLIs, the report holds every number, and a second invocation reuses every
    stage."""
    from palu_ds.localrun import free_port
    from palu_ds.tiny import build_model_dir

    port = free_port()
    texts = [f"{r['question']} {r['answer']}" for r in _rows(30)] + ["I don't know.", "B0.1."]
    base = build_model_dir(str(tmp_path / "base"), texts, vocab_size=256, hidden=32, layers=2, heads=2,
                           intermediate=64, max_positions=128)
    preset = tmp_path / "tiny.yaml"
    preset.write_text(TINY_PRESET.format(tofu=tofu, base=base))
    out = tmp_path / "out"
    assert P.main(["--preset", str(preset), "--out", str(out), "--port", str(port)]) == 0
    rep = json.loads((out / "efficacy.json").read_text())
    assert len(rep["grid"]["palu"]) == len(rep["grid"]["grad_diff"]) == 2  # 1 lr x epochs 1, 2
    assert set(rep["selection"]) == {"palu", "grad_diff"} and rep["best_baseline"] == {"A": "grad_diff"}
    names = set(rep["numbers"]["A"])
    assert names == {"palu", "grad_diff", "palu_seed1", "grad_diff_seed1", "retain"}
    assert rep["verdicts"]["grad_diff"]["verdict"] in ("beats", "loses", "not resolved")
    assert set(rep["position_nll"]["A"]) == {"base", "retain", "target", "palu", "grad_diff"}
    assert (out / "efficacy.png").stat().st_size > 1000 and "Decision" in (out / "efficacy.md").read_text()
    assert not (out / "dev" / "unlearn" / "palu_lr0.001" / "model").exists()  # the grid keeps its evaluations only
    assert P.main(["--preset", str(preset), "--out", str(out), "--port", str(port)]) == 0
    again = json.loads((out / "efficacy.json").read_text())
    assert set(again["stage_status"].values()) == {"reused"} and again["numbers"] == rep["numbers"]
    assert set(again["cost_minutes"]) == set(rep["cost_minutes"]) >= {"SFT", "grid", "report", "seed reruns",
                                                                      "position NLL", "total"}
    from benchmarks.tofu.protocol_report import render_markdown

    last = rep["grid"]["palu"][-1]
    rep["fp32_check"] = {"grid": last, "fp32": {**last, "ks": 0.5}, "precision": "fp32"}
    assert "in fp32 -> KS D 0.500" in render_markdown(rep)
