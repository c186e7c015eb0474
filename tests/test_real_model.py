"""The real pretrained model, SmolLM2-135M-Instruct (Llama architecture, grouped-query attention, tied embeddings, a
chat template), through the real CLIs: it knows things; PALU and NPO run under ZeRO-3 on 2 ranks with a precomputed
reference; precomputed == resident on it; the saved folder keeps one embedding matrix and reloads to identical
logits; a LoRA-merged save reloads. Data: the project's real-facts QA file (launch/data/real_facts)."""
import json
import os
import shutil

import pytest
import torch

from e2e import ROOT, launch, state, summary

pytestmark = pytest.mark.slow

FACTS = os.path.join(ROOT, "launch", "data", "real_facts")


def run_args(model, out, method="palu", stage=3, extra=()):
    args = ["--deepspeed", f"ds_configs/cpu/zero{stage}.json", "--config", "launch/configs/real_facts.yaml",
            f"model.path={model}", f"train.output_dir={out}", f"method.name={method}", "train.max_steps=2",
            "train.batch_size=2", "data.max_length=96", "train.lr=1e-4", "train.resume=never", "log.log_every=1"]
    if method != "palu":
        args.append("method.params={}")
    return args + list(extra)


def done(out):
    """The run's summary; its checkpoints (weights + Adam states, ~2 GB for this model) are not needed here."""
    shutil.rmtree(os.path.join(out, "checkpoints"), ignore_errors=True)
    return summary(out)


def load(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def logits(model, tok, text="Who wrote 'Hamlet'? William"):
    with torch.no_grad():
        return model(**tok(text, return_tensors="pt")).logits


def assert_tied_folder(model_dir):
    """One embedding matrix in the saved weights, tied again on load."""
    with open(os.path.join(model_dir, "config.json")) as f:
        assert json.load(f)["tie_word_embeddings"] is True
    keys = set(state(model_dir))
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys, sorted(keys)[:5]
    m = load(model_dir)
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    return m


def test_it_knows_the_capital_of_france(smollm2):
    from transformers import AutoTokenizer

    from palu_ds.data.prompt import encode_prompt
    from palu_eval.scoring import generate_greedy

    tok = AutoTokenizer.from_pretrained(smollm2)
    model = assert_tied_folder(smollm2)
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped-query attention
    (answer,) = generate_greedy(model, tok, [encode_prompt(tok, "What is the capital of France?")], max_new_tokens=10)
    assert "Paris" in answer, answer


@pytest.mark.parametrize("method", ["palu", "npo"])
def test_zero3_two_ranks_precomputed_then_save_reload(smollm2, tmp_path, method):
    """2 optimizer steps under ZeRO-3 on 2 ranks, the reference precomputed inside the run; the gathered save keeps
    the embeddings tied and differs from the base model; save -> reload -> save -> reload gives identical logits."""
    from transformers import AutoTokenizer

    out = str(tmp_path / method)
    launch("launch/train.py", run_args(smollm2, out, method), timeout=900)
    assert os.path.isfile(os.path.join(out, "reference_cache", "manifest.json"))
    s = done(out)
    assert s["steps"] == 2 and s["skipped_steps"] == 0
    assert all(torch.isfinite(torch.tensor(v)) for v in s["last"].values() if isinstance(v, float))
    model = assert_tied_folder(s["model"])
    tok = AutoTokenizer.from_pretrained(s["model"])
    assert tok.chat_template, "the tokenizer's chat template is saved with the model"
    base = state(smollm2)
    after = state(s["model"])
    assert any(not torch.equal(base[k], after[k]) for k in base), "the weights did not move"
    first = logits(model, tok)
    again = str(tmp_path / "again")
    model.save_pretrained(again)
    tok.save_pretrained(again)
    assert torch.equal(first, logits(assert_tied_folder(again), tok))


def test_precomputed_equals_resident(smollm2, tmp_path):
    """On the real model (tied embeddings, 49,152-token vocabulary): the same losses and weights with the reference
    read from the cache (fp32 values) as with the reference model kept live. Tolerances as in
    test_reference_equivalence (losses rel 1e-5, weights atol 1e-4 = 10% of one Adam step at lr 1e-3 there)."""
    runs = {}
    for mode in ("precomputed", "resident"):
        out = str(tmp_path / mode)
        launch("launch/train.py", run_args(smollm2, out, extra=[f"reference.mode={mode}", "reference.dtype=float32"]),
               nproc=1, timeout=900)
        runs[mode] = done(out)
    for k in ("loss/forget", "loss/kl", "loss/total"):
        assert runs["precomputed"]["last"][k] == pytest.approx(runs["resident"]["last"][k], rel=1e-5), k
    wp, wr = state(runs["precomputed"]["model"]), state(runs["resident"]["model"])
    for name in wp:
        torch.testing.assert_close(wp[name], wr[name], atol=1e-4, rtol=0)


def test_lora_merged_save_reloads(smollm2, tmp_path):
    """LoRA on the attention projections: the adapters are merged into the base weights at save; the folder loads
    with plain from_pretrained (no adapter keys), stays tied, and differs from the base only in the adapted
    projections."""
    out = str(tmp_path / "lora")
    launch("launch/train.py", run_args(smollm2, out, stage=2, extra=[
        "model.lora={r: 4, lora_alpha: 8, target_modules: [q_proj, v_proj]}", "train.lr=1e-3"]), nproc=1,
        timeout=900)
    s = done(out)
    assert_tied_folder(s["model"])
    base, after = state(smollm2), state(s["model"])
    assert set(after) == set(base)
    changed = {k for k in base if not torch.equal(base[k], after[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed), sorted(changed)[:5]
