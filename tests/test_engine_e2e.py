"""End-to-end: the real CLI (deepspeed launcher, 2 ranks, gloo, fp32; bf16 where a test says so) on the tiny model, for
every method."""
import glob
import os
import re

import pytest
import torch

from e2e import FAULTY, answer_nll, launch, state, summary, wandb_run

from palu_ds.methods import METHODS

pytestmark = pytest.mark.slow
UNLEARNING = sorted(name for name, m in METHODS.items() if m.unlearning)

BASE_TAGS = {"loss/total", "loss/forget", "lr", "throughput/tokens_per_s", "memory/peak_bytes", "grad/norm",
             "skipped_steps"}


def unlearn_args(tiny, target, out, method, stage=3, extra=()):
    args = ["--deepspeed", f"ds_configs/cpu/zero{stage}.json", "--config", "launch/configs/demo.yaml",
            f"model.path={target}", f"data.forget.source={tiny['data']}", f"data.retain.source={tiny['data']}",
            f"train.output_dir={out}", f"method.name={method}", "train.max_steps=4", "train.batch_size=4",
            "train.save_every=0", "data.max_length=64", "log.log_every=1"]
    m = METHODS[method]
    if not m.uses_spans:  # demo.yaml's params are PALU's (K, kl_topk)
        args.append("method.params={}")
    if method == "simnpo":
        # the test target is weakly trained (answer NLL ~1.7): at the paper's beta=4.5 SimNPO's gradient scale
        # sigmoid(-beta * NLL) is ~5e-4 and 4 steps move nothing measurable; beta=0.5 keeps the test meaningful
        args.append("method.params.beta=0.5")
    if method == "satimp":
        # likewise: at the paper's beta1=5 the token weight p^5 (1-p) is ~2e-4 at the target's answer NLL ~1.7
        args.append("method.params.beta1=1.0")
    if m.hidden_layer is not None:  # the tiny model has 2 decoder layers (RMU's default is layer 7); layer 0: the
        args.append(f"method.params.{m.hidden_layer}=0")  # layers above it, the norm and the head get no gradient
    if "retain" not in m.batches:
        args.append("data.retain=null")
    if "idk" in m.batches:
        args += [f"data.idk.source={tiny['data']}", "data.idk.config=idontknow"]
    if m.uses_dual:
        args.append("method.params.lambda0=1.0")
    return args + list(extra)


def step_line_pattern(m, step: int, total: int) -> str:
    """The progress line of a step (palu_ds.progress) for method ``m``: its terms from the registry, the
    constraint's eps and lambda only with a constraint; values and the ETA as any number."""
    num = r"-?[\d.e+-]+"
    terms = " ".join(rf"{t} {num}" + (rf" \(eps {num}\)" if t == m.constraint else "") for t in m.term_fns)
    lam = rf" \| lambda {num}" if m.uses_dual else ""
    return rf"step {step}/{total} \| loss {num} \| {terms}{lam} \| lr {num} \| \d+ tok/s \| eta (\?|[\dhms]+)$"


def check_model_card(model_dir, method, steps=4, world=2):
    """The model card (palu_ds.card) of a saved model: metadata block and the run's record."""
    from huggingface_hub import ModelCard

    m = METHODS[method]
    card = ModelCard.load(os.path.join(model_dir, "README.md"))
    assert card.data.library_name == "transformers"
    assert {"palu_ds", method, "unlearning" if m.unlearning else "fine-tuning"} <= set(card.data.tags)
    for k in m.defaults:
        assert f"| {k} | " in card.text, k
    assert f"| steps | {steps} |" in card.text and f"| world size | {world} |" in card.text
    for batch in m.sampled:  # each data source with its rows and content hash
        assert re.search(rf"^\| {batch} \| .* \| \d+ \| [0-9a-f]{{16}} \|$", card.text, re.M), batch
    for term in m.term_fns:
        assert f"| loss/{term} | " in card.text
    assert ("| dual/lambda | " in card.text) == m.uses_dual
    return card


def tb_tags(out):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = glob.glob(os.path.join(out, "tensorboard", "events.*"))
    assert files, f"no TensorBoard event file under {out}"
    acc = EventAccumulator(os.path.dirname(files[0]))
    acc.Reload()
    return set(acc.Tags()["scalars"])


# under ZeRO-2 too, except methods whose terms only take code paths other methods already run there (token
# log-probs as grad_diff's: grad_ascent, wga, satimp; sequence log-probs as npo's: simnpo; per-row reference tensors
# as palu's KL: undial): ~1 min per run on the test box
ZERO3_ONLY = {"grad_ascent", "simnpo", "wga", "satimp", "undial"}


@pytest.mark.parametrize("method,stage", [(m, s) for m in UNLEARNING for s in (2, 3)
                                          if s == 3 or m not in ZERO3_ONLY])
def test_method_end_to_end(tiny, target, tmp_path, method, stage):
    out = str(tmp_path / method)
    p = launch("launch/train.py", unlearn_args(tiny, target, out, method, stage))
    s = summary(out)
    assert s["steps"] == 4 and s["skipped_steps"] == 0
    m = METHODS[method]
    # rank 0's progress: one line a step (output is not a terminal; log.log_every=1), the reference precompute's
    # rows done / total, and the model card in the saved folder
    lines = [ln.split("] ", 1)[-1] for ln in (p.stdout + p.stderr).splitlines() if "[palu_ds r0]" in ln]
    for step in (1, 4):
        assert any(re.search(step_line_pattern(m, step, 4), ln) for ln in lines), (step, lines[-12:])
    for batch in m.reference:  # each batch the reference is precomputed for (RMU: retain only)
        assert any(re.fullmatch(rf"reference {batch}: rows \d+/\d+ \| eta \S+", ln) for ln in lines), lines[-20:]
    check_model_card(s["model"], method)
    if m.uses_spans:  # the span source and counts of the forget set (generated data is labelled)
        assert s["spans"]["source"] == "labels" and s["spans"]["spans"] > 0 and s["spans"]["init_tokens"] > 0
    else:
        assert s["spans"] is None
    # the forget answers get less likely; the retain answers move much less
    f0, f1 = answer_nll(target, tiny["data"], "forget10"), answer_nll(s["model"], tiny["data"], "forget10")
    r0, r1 = answer_nll(target, tiny["data"], "retain90"), answer_nll(s["model"], tiny["data"], "retain90")
    print(f"\n{method} zero{stage}: forget NLL {f0:.3f} -> {f1:.3f}, retain NLL {r0:.3f} -> {r1:.3f}")
    assert f1 > f0
    if "retain" in m.batches:
        assert (r1 - r0) < (f1 - f0)
    before, after = state(target), state(s["model"])
    assert set(before) == set(after)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # the saved dir reloads with from_pretrained and generates
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(s["model"])
    model = AutoModelForCausalLM.from_pretrained(s["model"])
    gen = model.generate(**tok("Question: Who?\nAnswer:", return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert gen.shape[1] > 1
    tags = tb_tags(out)
    want = BASE_TAGS | {f"loss/{term}" for term in m.term_fns}
    if m.uses_dual:
        want |= {"dual/lambda", "dual/slack"}
    assert want <= tags, f"missing TensorBoard tags: {want - tags}"


def test_micro_batch_dual_steps_on_two_ranks(tiny, target, tmp_path):
    """method.params.dual_update=micro_batch (open-unlearning's PDU schedule) with grad_accum 2, eps 0 and a small
    eta: lambda takes two dual steps per optimizer step, each from a micro-batch's retain NLL over both ranks, so
    after the first step (lambda - lambda0) / eta is about twice the window's retain NLL (exactly 1x in the default
    per-step mode; not exactly 2x because the window mean weights micro-batches by their token counts)."""
    out = str(tmp_path / "micro")
    extra = ["train.max_steps=2", "train.grad_accum=2", "method.params.epsilon=0.0", "method.params.eta_lambda=0.001",
             "method.params.dual_update=micro_batch"]
    launch("launch/train.py", unlearn_args(tiny, target, out, "pd_flat", 2, extra))
    first = summary(out)["first"]
    ratio = (first["dual/lambda"] - 1.0) / 0.001 / first["loss/retain"]
    assert 1.6 < ratio < 2.4, ratio


@pytest.mark.parametrize("method", ["pd_flat", "palu"])
def test_micro_batch_times_accumulation_is_one_update(tiny, target, tmp_path, method):
    """The same 4 examples per optimizer step as ONE micro-batch of 4 or as TWO accumulated micro-batches of 2 (one
    process, ZeRO-2, fp32) give the same update: loss terms, λ and gradient norm (rel 1e-5) and final weights (atol
    1e-6) after 3 steps. Each term is ``local_sum / window_count`` and the loss is scaled by ``world × grad_accum``
    to undo DeepSpeed's averaging, so the window, not the micro-batch, is the unit; only the padding width and the
    order of the sums differ. The 40 forget rows make 10 micro-batches of 4 or 20 of 2: the windows stay inside
    one epoch, holding the same rows in both runs (BatchStream slices one permutation in order)."""
    runs = {}
    for bs, gas in ((4, 1), (2, 2)):
        out = str(tmp_path / f"bs{bs}_gas{gas}")
        launch("launch/train.py", unlearn_args(tiny, target, out, method, 2, [
            f"train.batch_size={bs}", f"train.grad_accum={gas}", "train.max_steps=3"]), nproc=1)
        runs[gas] = summary(out)
    a, b = runs[1], runs[2]
    assert a["step_tokens"] == b["step_tokens"] and a["skipped_steps"] == b["skipped_steps"] == 0
    for when in ("first", "last"):
        keys = [k for k in a[when] if k.startswith(("loss/", "dual/", "grad/"))]
        assert "grad/norm" in keys and "loss/retain" in keys
        for k in keys:
            assert b[when][k] == pytest.approx(a[when][k], rel=1e-5, abs=1e-7), (when, k)
    wa, wb, before = state(a["model"]), state(b["model"]), state(target)
    assert any(not torch.equal(wa[k], before[k]) for k in wa)  # the runs did train
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-6, rtol=0, msg=k)


# 2 ranks, ZeRO-3, pd_flat, 6 steps at lr 1e-5 (every Adam update, ~1e-5 a weight, is below half a bf16 ulp of most
# of the tiny model's weights); one uninterrupted run per precision, shared by the two tests below
ZERO3_RUN = ["train.max_steps=6", "train.scheduler=cosine", "train.warmup_steps=2", "train.lr=1e-5"]


#: the precisions of the ZeRO-3 runs: bf16_dither = bf16 from the dithered start (palu_ds.dither, gathered under ZeRO-3)
PRECISION_ARGS = {"fp32": ["train.precision=fp32"], "bf16": ["train.precision=bf16"],
                  "bf16_dither": ["train.precision=bf16", "train.bf16_dither=true"]}


@pytest.fixture(scope="module")
def zero3_runs(tiny, target, tmp_path_factory):
    runs = {}
    for precision, extra in PRECISION_ARGS.items():
        runs[precision] = str(tmp_path_factory.mktemp("zero3") / precision)
        launch("launch/train.py", unlearn_args(tiny, target, runs[precision], "pd_flat", 3, ZERO3_RUN + extra))
    return runs


@pytest.mark.parametrize("precision", list(PRECISION_ARGS))
def test_resume_is_exact_on_two_ranks(tiny, target, tmp_path, zero3_runs, precision):
    """A run killed after step 4 (last checkpoint at step 3) and resumed ends with the same weights and λ as an
    uninterrupted run: atol 1e-6 on every weight (fp32 on CPU is deterministic for a fixed world size); in bf16
    (torch autocast under ZeRO-3: fp32 weights and Adam state in the checkpoint) bit-identical fp32 weights, from the
    dithered start too (the dither is drawn at the fresh start only, the same on every rank; it moved the weights:
    they differ from the undithered bf16 run's)."""
    cut = str(tmp_path / "cut")
    args = unlearn_args(tiny, target, cut, "pd_flat", 3, ZERO3_RUN + PRECISION_ARGS[precision] + ["train.save_every=3"])
    p = launch(FAULTY, ["crash_after=4", *args], check=False)
    assert p.returncode != 0
    assert not os.path.exists(os.path.join(cut, "model"))
    launch("launch/train.py", args)  # auto-resume from step_000003
    a, b = summary(zero3_runs[precision]), summary(cut)
    assert b["steps"] == 6
    assert a["last"]["dual/lambda"] == pytest.approx(b["last"]["dual/lambda"], abs=1e-9)
    wa, wb = state(a["model"]), state(b["model"])
    assert {v.dtype for v in wa.values()} == {torch.float32}
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6 if precision == "fp32" else 0, rtol=0)
    if precision == "bf16_dither":
        plain = state(summary(zero3_runs["bf16"])["model"])
        dithered = [k for k in wa if k.endswith(("proj.weight", "lm_head.weight"))]  # the nn.Linear weights
        assert len(dithered) == 15 and all(not torch.equal(wa[k], plain[k]) for k in dithered)


def test_bf16_under_zero3_moves_the_weights_as_fp32_does(target, zero3_runs):
    """bf16 under ZeRO-3 (issue 29) at a learning rate whose updates are below bf16's resolution: the weight change
    of the bf16 run (its saved model: the fp32 weights, which are the master weights) points where fp32's does
    (cosine > 0.95) with a norm within 20% of it, and its last objective is within 2% of fp32's. With DeepSpeed's
    bf16 section instead (the model loaded in bf16, so every fp32 master started on the bf16 grid) the bf16 copy
    the forward ran on, and saved, had barely moved: against bf16(target) 15% of the weights moved, cosine 0.44
    with fp32's change, norm ratio 0.61 (against the target: cosine 0.07, ratio 3.8, the target's rounding)."""
    before = state(target)
    fp32, bf16 = (state(summary(zero3_runs[p])["model"]) for p in ("fp32", "bf16"))
    df, db = (torch.cat([(w[k].float() - before[k].float()).flatten() for k in sorted(before)]) for w in (fp32, bf16))
    cos, ratio = float(df @ db / df.norm() / db.norm()), float(db.norm() / df.norm())
    print(f"\nbf16 vs fp32 weight change under ZeRO-3: cosine {cos:.4f}, norm ratio {ratio:.3f}")
    assert cos > 0.95 and 0.8 < ratio < 1.25, (cos, ratio)
    assert all(v.dtype == torch.float32 for v in bf16.values())  # the fp32 master weights are what is saved
    last = {p: summary(zero3_runs[p])["last"]["loss/total"] for p in ("fp32", "bf16")}
    assert last["bf16"] == pytest.approx(last["fp32"], rel=2e-2), last


def test_bf16_losses_match_fp32_and_bf16_resume_is_exact(tiny, target, tmp_path):
    """One process, ZeRO stage 0, palu: ``train.precision=bf16`` (autocast: bf16 matrix products, fp32 weights, Adam
    and losses) gives each loss term of the first step within 2% (or 0.01 absolute, for terms near 0 such as the
    KL to an identical reference) of the fp32 step's -- the weights are the same, only the products' rounding
    differs; and a bf16 run killed after step 3 and resumed from its step-2 checkpoint ends with bit-identical
    weights and the same last-step terms as an uninterrupted bf16 run."""
    common = ["train.max_steps=4", f"reference.cache_dir={tmp_path / 'cache'}"]
    runs = {}
    for name, extra in (("fp32", ["train.precision=fp32"]), ("bf16", ["train.precision=bf16"])):
        runs[name] = str(tmp_path / name)
        launch("launch/train.py", unlearn_args(tiny, target, runs[name], "palu", 0, common + extra), nproc=1)
    cut = str(tmp_path / "cut")
    args = unlearn_args(tiny, target, cut, "palu", 0, common + ["train.precision=bf16", "train.save_every=2"])
    assert launch(FAULTY, ["crash_after=3", *args], nproc=1, check=False).returncode != 0
    launch("launch/train.py", args, nproc=1)  # resumes from step_000002
    fp32, bf16, resumed = summary(runs["fp32"]), summary(runs["bf16"]), summary(cut)
    terms = [k for k in fp32["first"] if k.startswith("loss/")]
    assert {"loss/forget", "loss/retain", "loss/total"} <= set(terms)
    print("\nfirst step, fp32 -> bf16: " + ", ".join(f"{k} {fp32['first'][k]:.5g} -> {bf16['first'][k]:.5g}"
                                                   for k in terms))
    for k in terms:
        assert bf16["first"][k] == pytest.approx(fp32["first"][k], rel=2e-2, abs=1e-2), k
    assert any(bf16["first"][k] != fp32["first"][k] for k in terms)  # the bf16 run did compute in bf16
    assert resumed["steps"] == 4
    for k in [k for k in bf16["last"] if k.startswith(("loss/", "dual/", "grad/"))]:
        assert resumed["last"][k] == bf16["last"][k], k
    wa, wb = state(bf16["model"]), state(resumed["model"])
    assert all(v.dtype == torch.float32 for v in wa.values())  # fp32 master weights are what is saved
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_nan_steps_are_skipped_and_counted(tiny, target, tmp_path):
    """Steps 3 and 4 have a NaN loss: they are skipped (no weight moves) and counted, so the final weights equal
    those of a run that stops after step 2."""
    out = str(tmp_path / "nan")
    launch(FAULTY, ["nan_from=3", *unlearn_args(tiny, target, out, "grad_diff", 2, ["train.max_nonfinite=10"])])
    assert summary(out)["skipped_steps"] == 2
    two = str(tmp_path / "two")
    launch("launch/train.py", unlearn_args(tiny, target, two, "grad_diff", 2, ["train.max_steps=2"]))
    wa, wb = state(summary(out)["model"]), state(summary(two)["model"])
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=0, rtol=0)


def test_nan_steps_in_a_row_stop_the_run_with_a_checkpoint(tiny, target, tmp_path):
    out = str(tmp_path / "nan")
    p = launch(FAULTY, ["nan_from=3", *unlearn_args(tiny, target, out, "grad_diff", 2, ["train.max_nonfinite=2"])],
               check=False)
    assert p.returncode != 0
    assert "2 optimizer steps in a row had a non-finite loss term" in p.stderr + p.stdout
    assert os.path.isfile(os.path.join(out, "checkpoints", "step_000004", "COMPLETE"))
    assert not os.path.exists(os.path.join(out, "model"))


def test_config_errors_exit_before_loading_a_model(tmp_path):
    p = launch("launch/train.py", ["--deepspeed", "ds_configs/cpu/zero2.json", "--config",
                                   "launch/configs/demo.yaml", "train.lrr=1"], nproc=1, check=False)
    assert p.returncode == 2 and "unknown key train.lrr" in p.stderr
    assert "Loading weights" not in p.stderr


@pytest.mark.parametrize("stage,method", [(2, "grad_diff"), (3, "rmu")])
def test_lora_with_gradient_checkpointing_saves_a_merged_model(tiny, target, tmp_path, stage, method):
    """LoRA + gradient checkpointing; RMU's hook finds its layer (0) inside the peft wrapper under ZeRO-3: only
    that layer's adapted weights move (nothing above it gets a gradient)."""
    out = str(tmp_path / "lora")
    launch("launch/train.py", unlearn_args(tiny, target, out, method, stage,
                                           ["model.lora={r: 4, lora_alpha: 8, target_modules: [q_proj, v_proj]}",
                                            "model.gradient_checkpointing=true", "train.lr=1e-2"]))
    before, after = state(target), state(summary(out)["model"])
    assert set(before) == set(after)  # merged: plain Llama keys, no lora_A / base_model prefixes
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(("q_proj" in k or "v_proj" in k) for k in changed)
    if METHODS[method].hidden_layer is not None:
        assert all(".layers.0." in k for k in changed), changed


def test_torchrun_launch(tiny, target, tmp_path):
    import subprocess
    import sys

    from e2e import ROOT, cpu_env, free_port

    out = str(tmp_path / "torchrun")
    # the installed module form (palu_ds/train.py), as `torchrun -m palu_ds.train` runs it without a checkout; with
    # Weights & Biases offline (log.report_to: [wandb]) next to TensorBoard
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "palu_ds.train", *unlearn_args(tiny, target, out, "grad_diff", 2, ["log.report_to=[wandb]"])]
    p = subprocess.run(cmd, cwd=ROOT, env=cpu_env(WANDB_MODE="offline", WANDB_SILENT="true"), capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    assert summary(out)["world_size"] == 2 and summary(out)["steps"] == 4
    run = wandb_run(out)  # rank 0's run only: one run folder
    steps = [h for h in run["history"] if "loss/total" in h]
    assert [h["_step"] for h in steps] == [1, 2, 3, 4]
    assert all(set(h) - {"_step", "_runtime", "_timestamp"} == tb_tags(out) for h in steps)  # TensorBoard's scalars
    assert run["config"]["method"]["name"] == "grad_diff" and run["config"]["hp"] == {"gamma": 1.0, "alpha": 1.0}
    assert run["config"]["world_size"] == 2 and run["config"]["train"]["max_steps"] == 4
    assert run["summary"]["steps"] == 4 and run["summary"]["world_size"] == 2
    assert run["summary"]["last/loss/total"] == pytest.approx(summary(out)["last"]["loss/total"])


def test_evaluation_during_two_rank_training(tiny, target, tmp_path):
    """eval.every=4 evaluates after step 4, eval.epochs=[0.4] after step 2 (40 forget rows at 4 x 2 ranks = 5 steps
    an epoch); no other step is evaluated."""
    out = str(tmp_path / "evaltrain")
    p = launch("launch/train.py", unlearn_args(tiny, target, out, "grad_diff", 3,
                                               ["eval.every=4", "eval.epochs=[0.4]", f"eval.data={tiny['data']}",
                                                "eval.splits=[forget,retain]", "eval.max_examples=6",
                                                "eval.max_new_tokens=8"]))
    import json

    assert sorted(os.listdir(os.path.join(out, "eval"))) == ["step_000002", "step_000004"]
    for step in (2, 4):
        with open(os.path.join(out, "eval", f"step_{step:06d}", "summary.json")) as f:
            s = json.load(f)
        assert s["step"] == step and 0 < s["metrics"]["forget/prob"] <= 1
        with open(os.path.join(out, "eval", f"step_{step:06d}", "results.json")) as f:
            assert len(json.load(f)["examples"]["forget"]) == 6  # merged from both ranks, each example once
    assert {"eval/forget/prob", "eval/model_utility"} <= tb_tags(out)
    # the evaluation's progress (rows done / total of each part) and its headline numbers in the model card
    assert re.search(r"\[palu_ds r0\] eval forget: scoring: rows \d+/\d+ \| eta", p.stdout + p.stderr)
    card = check_model_card(os.path.join(out, "model"), "grad_diff")
    assert "## Evaluation" in card.text and "at step 4" in card.text and "| model_utility | " in card.text


@pytest.mark.parametrize("method", ["palu", "npo"])
def test_chunked_head_equals_dense_under_zero3_on_two_ranks(tiny, target, tmp_path, method):
    """train.head_path=chunked (4 positions per chunk, so every micro-batch spans many chunks) gives the dense
    path's loss terms, gradient norm and final weights under ZeRO-3 on 2 ranks (the head is gathered by DeepSpeed's
    own hooks around one call per micro-batch); fp32, rtol 1e-4 on the scalars, atol 1e-5 on the weights (the two
    paths sum in different orders).  The chunked run also skips a NaN step (its zero loss goes through the head)."""
    runs = {}
    for path in ("dense", "chunked"):
        out = str(tmp_path / path)
        launch("launch/train.py", unlearn_args(tiny, target, out, method, 3,
                                               [f"train.head_path={path}", "train.head_chunk_elems=4096"]))
        runs[path] = summary(out)
    a, b = runs["dense"], runs["chunked"]
    for when in ("first", "last"):
        for k, v in a[when].items():
            if k.startswith(("loss/", "grad/")):
                assert b[when][k] == pytest.approx(v, rel=1e-4, abs=1e-6), (when, k)
    wa, wb = state(a["model"]), state(b["model"])
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=0, msg=k)
    out = str(tmp_path / "chunked_nan")
    launch(FAULTY, ["nan_from=3", *unlearn_args(tiny, target, out, method, 3, ["train.head_path=chunked",
                                                                                "train.max_nonfinite=10"])])
    assert summary(out)["skipped_steps"] == 2
