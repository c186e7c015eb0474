"""Every benchmark script parses its arguments: ``--help`` exits 0 (a merge that drops an import fails here, not on
the quiet box an hour into a measurement)."""
import math
import pkgutil
import runpy
import sys

import pytest

import benchmarks

MODULES = sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__)
                 if m.name not in ("__init__", "output", "ou_driver"))


def test_the_scripts_are_found():
    assert {"real_model_throughput", "vs_open_unlearning", "tofu"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_help_exits_zero(name, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [name, "--help"])
    monkeypatch.delitem(sys.modules, f"benchmarks.{name}", raising=False)  # imported by another script: run afresh
    with pytest.raises(SystemExit) as exc:
        runpy.run_module(f"benchmarks.{name}", run_name="__main__", alter_sys=True)
    assert exc.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_vs_open_unlearning_names_each_sides_allocator(tmp_path, monkeypatch):
    """benchmarks/vs_open_unlearning.py: open-unlearning's side (PALU_DS_MALLOC=system, as its users run it) runs on
    glibc even when palu_ds's asks for jemalloc; each run names its allocator, and the table shows both."""
    from benchmarks.vs_open_unlearning import table, timed
    from palu_ds.localrun import jemalloc

    probe = [sys.executable, "-c", "print('libjemalloc' in open('/proc/self/maps').read())"]
    if jemalloc() is not None:
        monkeypatch.setenv("PALU_DS_MALLOC", "jemalloc")
        rc, _, malloc = timed(probe, 1, str(tmp_path / "ours.log"))
        assert rc == 0 and malloc == "jemalloc" and "True" in (tmp_path / "ours.log").read_text()
    rc, rss, malloc = timed(probe, 1, str(tmp_path / "ou.log"), PALU_DS_MALLOC="system")
    assert rc == 0 and rss > 0 and malloc == "glibc" and "False" in (tmp_path / "ou.log").read_text()
    side = {"exit": 0, "tokens_per_s": 100.0, "s_per_step": 1.0, "steps": 4}
    row = {"round": 0, "workload": "smol", "nproc": 1, "method": "grad_diff", "peer": "GradDiff",
           "palu_ds": {**side, "peak_rss_mib": 3000.0, "malloc": "jemalloc"},
           "open_unlearning": {**side, "peak_rss_mib": 3500.0, "malloc": "glibc"}}
    assert "| 2.93 GiB (jemalloc) | 3.42 GiB (glibc) | -0.49 GiB | 1 |" in table([row])


def test_malloc_ab_table_is_medians_and_per_round_ratios():
    from benchmarks.malloc_ab import table

    def run(tps, rss):
        return {"exit": 0, "tokens_per_s": tps, "peak_rss_mib": rss}
    rounds = [{"glibc": run(100, 4000), "jemalloc": run(90, 3600)},
              {"glibc": run(120, 4100), "jemalloc": run(120, 3690)},
              {"glibc": run(150, 4000), "jemalloc": {"exit": 1}}]  # a failed round: left out
    t = table(rounds)
    assert "| glibc | 110 (100-120) | 4050 (4000-4100) |" in t and "| jemalloc | 105 (90-120) | 3645 (3600-3690) |" in t
    assert "| jemalloc / glibc, median of 2 rounds | 0.950x | 0.900x |" in t
    assert table([rounds[2]]) == "every round failed (see the logs)"


def test_real_model_throughput_rounded_start_control(tmp_path, monkeypatch):
    """benchmarks/real_model_throughput.py ``--rounded-start``: the control's start is the model with its float weights
    rounded to bf16 (stored as fp32, other files copied, made once); bf16's curve and the control's are each compared
    with the fp32 run's, never with each other; without fp32 the option is refused."""
    import torch
    from safetensors.torch import load_file, save_file

    from benchmarks.real_model_throughput import loss_agreement, parse_args, rounded_start

    model = tmp_path / "model"
    model.mkdir()
    w = {"w": torch.tensor([1.0 + 2 ** -10, 3.0, -0.1], dtype=torch.float32), "ids": torch.tensor([1, 2])}
    save_file(w, str(model / "model.safetensors"))
    (model / "config.json").write_text("{}")
    start = rounded_start(str(model), str(tmp_path / "rounded"))
    got = load_file(f"{start}/model.safetensors")
    assert got["w"].dtype == torch.float32 and torch.equal(got["w"], w["w"].to(torch.bfloat16).float())
    assert not torch.equal(got["w"], w["w"]) and torch.equal(got["ids"], w["ids"])
    assert (tmp_path / "rounded" / "config.json").exists() and not (tmp_path / "rounded.tmp").exists()
    (model / "model.safetensors").unlink()  # made once: a second call reads nothing from the model
    assert rounded_start(str(model), str(tmp_path / "rounded")) == start

    base = {"name": "palu", "ranks": 1}
    runs = [{**base, "precision": "fp32", "loss": [10.0, 5.0]}, {**base, "precision": "bf16", "loss": [10.0, 5.5]},
            {**base, "precision": "fp32", "variant": "start rounded to bf16", "loss": [10.1, 5.0]}]
    lines = loss_agreement(runs)
    assert len(lines) == 2 and "fp32 (start rounded to bf16) objective vs fp32" in lines[1]
    assert runs[1]["loss_vs_fp32"] == {"max_rel": pytest.approx(0.1), "final_rel": pytest.approx(0.1), "steps": 2}
    assert runs[2]["loss_vs_fp32"]["max_rel"] == pytest.approx(0.01) and "loss_vs_fp32" not in runs[0]

    monkeypatch.setattr(sys, "argv", ["real_model_throughput", "--precisions", "bf16", "--rounded-start"])
    with pytest.raises(SystemExit) as exc:
        parse_args()
    assert exc.value.code == 2


def test_real_model_throughput_keeps_the_named_modules_in_fp32(monkeypatch):
    """``--fp32-modules``' :func:`keep_fp32`: under bf16 autocast the matched modules compute in fp32 -- every
    product kept (attention, MLP, the output head and the engine's answer-only head) gives fp32's logits exactly,
    the MLPs alone neither fp32's nor bf16's; a pattern that matches nothing is refused by name; the option needs the
    fp32 and bf16 runs of 1 process."""
    import torch
    from transformers import LlamaForCausalLM

    from benchmarks.real_model_throughput import keep_fp32, parse_args
    from palu_ds import lm_head
    from palu_ds.tiny import tiny_llama_config

    monkeypatch.setattr(lm_head, "lm_logits", lm_head.lm_logits)  # keep_fp32 replaces it: restored after the test

    def model():
        torch.manual_seed(0)
        return LlamaForCausalLM(tiny_llama_config(96, hidden=32, layers=2, intermediate=64)).eval()

    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))

    def logits(m, bf16=True):
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            return m(input_ids=ids).logits.float()

    fp32, bf16 = logits(model(), bf16=False), logits(model())
    assert not torch.equal(bf16, fp32)
    every = model()
    kept = keep_fp32(every, ["*.self_attn", "*.mlp", "lm_head"])
    assert kept == ["model.layers.0.self_attn", "model.layers.0.mlp", "model.layers.1.self_attn", "model.layers.1.mlp",
                    "lm_head"]
    assert torch.equal(logits(every), fp32)
    with torch.autocast("cpu", torch.bfloat16):
        assert lm_head.lm_logits(every, torch.randn(3, 32)).dtype == torch.float32
    mlp = model()
    assert keep_fp32(mlp, ["*.mlp"]) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    out = logits(mlp)
    assert not torch.equal(out, fp32) and not torch.equal(out, bf16)
    with pytest.raises(ValueError, match=r"'\*\.ffn' matches no module"):
        keep_fp32(model(), ["*.mlp", "*.ffn"])

    rounded = model()  # --bf16-operand weight: fp32 products of the Linear weights (layers', head's) rounded to bf16
    for n, p in rounded.named_parameters():
        if n.endswith(("proj.weight", "lm_head.weight")):
            p.data = p.data.to(torch.bfloat16).float()
    weight = model()
    keep_fp32(weight, ["*.self_attn", "*.mlp", "lm_head"], rounded="weight")
    assert torch.equal(logits(weight), logits(rounded, bf16=False))
    one = model()  # a matched Linear itself: rounded and still outside autocast
    keep_fp32(one, ["*.down_proj"], rounded="input")
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        x = torch.randn(3, 64)
        down = one.model.layers[0].mlp.down_proj
        got = down(x)
    assert got.dtype == torch.float32
    assert torch.equal(got, torch.nn.functional.linear(x.to(torch.bfloat16).float(), down.weight))

    for argv in (["--fp32-modules", "*.mlp", "--precisions", "bf16"], ["--fp32-modules", "*.mlp", "--ranks", "2"],
                 ["--bf16-operand", "weight"], ["--bf16-dither", "--precisions", "bf16"]):
        monkeypatch.setattr(sys, "argv", ["real_model_throughput", *argv])
        with pytest.raises(SystemExit) as exc:
            parse_args()
        assert exc.value.code == 2


def test_real_model_throughput_fp32_modules_run_trains(tiny, tmp_path):
    """An ``--fp32-modules`` run end to end (benchmarks.real_model_throughput.train with patterns: launch/train.py's
    loop in a process that keeps the matched modules in fp32, here with their weights rounded to bf16), 2 bf16 steps
    on the tiny model: it keeps the layers' MLPs and returns each step's objective."""
    import shutil

    from benchmarks.real_model_throughput import ONE_PROCESS, train

    data = tmp_path / "tofu"
    data.mkdir()
    shutil.copy(f"{tiny['data']}/forget10.jsonl", data / "forget01.jsonl")
    shutil.copy(f"{tiny['data']}/retain90.jsonl", data / "retain90.jsonl")
    out = str(tmp_path / "run")
    r = train(tiny["model"], str(data), out, "grad_diff", "none", 1, ONE_PROCESS, "bf16", 2, "*.mlp", "weight")
    assert len(r["loss"]) == 2 and all(math.isfinite(x) for x in r["loss"]) and r["tokens_per_s"] > 0
    assert "kept in fp32: 2 modules (model.layers.0.mlp, model.layers.1.mlp" in open(out + ".log").read()


def test_real_model_throughput_variant_runs_name_their_folders_and_variants(monkeypatch):
    """The runs beside fp32 and bf16, per ranks: the dithered start and the padded rows (per precision) on any ranks,
    each --fp32-modules set (and its --bf16-operand runs) on 1 process only, each with its folder tag and its train()
    keywords."""
    from benchmarks.real_model_throughput import parse_args, variant_runs

    monkeypatch.setattr(sys, "argv", ["real_model_throughput", "--bf16-dither", "--fp32-modules", "*.mlp",
                                      "--bf16-operand", "weight", "--padded"])
    a = parse_args()
    one = variant_runs(a, "MODEL", 1)
    assert [(p, v, t, m) for p, v, t, m, _ in one] == [
        ("bf16", "dithered start", "bf16_dither", "MODEL"),
        ("fp32", "padded rows", "fp32_padded", "MODEL"), ("bf16", "padded rows", "bf16_padded", "MODEL"),
        ("bf16", "fp32 modules: *.mlp", "bf16_fp32-modules-0", "MODEL"),
        ("bf16", "fp32 modules: *.mlp, weight rounded to bf16", "bf16_fp32-modules-0weight", "MODEL")]
    assert [kw for *_, kw in one] == [{"extra": ["train.bf16_dither=true"]},
                                      {"extra": ["train.padding_free=false"]}, {"extra": ["train.padding_free=false"]},
                                      {"fp32_modules": "*.mlp", "rounded": None},
                                      {"fp32_modules": "*.mlp", "rounded": "weight"}]
    assert [t for _, _, t, _, _ in variant_runs(a, "MODEL", 2)] == ["bf16_dither", "fp32_padded", "bf16_padded"]
