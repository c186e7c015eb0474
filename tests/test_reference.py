"""Reference precompute cache: packing equals the live reference, reuse, refusal of each mismatched key field,
interrupted writes (no manifest -> recompute), corrupt shards."""
import functools
import json
import os

import pytest
import torch

from palu_ds.config import load_config, resolve
from palu_ds.data.build import build_datasets
from palu_ds.data.collate import collate
from palu_ds.reference import (MANIFEST, CachedReference, CacheMismatch, ResidentReference, precompute,
                               reference_tensors)


@pytest.fixture()
def setup(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def make(overrides=(), method="palu"):
        cfg = load_config(None, [f"model.path={tiny['model']}", f"data.forget.source={tiny['data']}",
                                 "data.forget.config=forget10", f"data.retain.source={tiny['data']}",
                                 "data.retain.config=retain90", f"method.name={method}", "data.max_length=64",
                                 f"train.output_dir={tmp_path}/run", "train.batch_size=4", *overrides])
        run = resolve(cfg)
        cfg, m, hp = run.cfg, run.method, run.hp
        tok = AutoTokenizer.from_pretrained(tiny["model"])
        ds = build_datasets(cfg.data, tok, m)
        ds["retain"].examples = ds["retain"].examples[:12]  # keep the retain pass short
        return cfg, m, hp, ds, tok

    model = AutoModelForCausalLM.from_pretrained(tiny["model"]).eval()
    return make, model, str(tmp_path / "cache")


def _cache(make, model, cache_dir, overrides=(), method="palu"):
    cfg, m, hp, ds, tok = make(overrides, method)
    return precompute(cfg, m, hp, ds, tok, {}, cache_dir, model=model), (cfg, m, hp, ds, tok)


def test_cache_lookup_equals_live_reference_in_any_order(setup):
    make, model, cache_dir = setup
    manifest, (cfg, m, hp, ds, tok) = _cache(make, model, cache_dir, ["method.params.K=50", "method.params.kl_topk=16"])
    cached = CachedReference(cache_dir)
    live = ResidentReference(model, m, hp, ds, tok, 4)
    order = [7, 0, 33, 12, 5]  # any shuffle: rows are found by example id
    batch = collate([ds["forget"][i] for i in order], tok.pad_token_id)
    a, b = cached.lookup("forget", batch), live.lookup("forget", batch)
    assert set(a) == {"topk_ids", "kl_ids", "kl_logps"} == set(b)
    assert torch.equal(a["topk_ids"], b["topk_ids"]) and a["topk_ids"].shape[1] == 50
    assert torch.equal(a["kl_ids"], b["kl_ids"]) and a["kl_ids"].shape[1] == 16
    torch.testing.assert_close(a["kl_logps"], b["kl_logps"], atol=2e-2, rtol=1e-3)  # stored in fp16
    assert manifest["key"]["K"] == 50 and manifest["key"]["k"] == 16
    assert a["topk_ids"].shape[0] == int(batch["sens_mask"][:, 1:].sum())


def test_seq_logps_for_npo_and_retain_loss_for_relative_epsilon(setup):
    make, model, cache_dir = setup
    _, (cfg, m, hp, ds, tok) = _cache(make, model, cache_dir, method="npo")
    batch = collate([ds["forget"][i] for i in (3, 1)], tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    want = reference_tensors(logits, batch, ("seq_logps",), 1, 1)["seq_logps"]
    torch.testing.assert_close(CachedReference(cache_dir).lookup("forget", batch)["seq_logps"], want)
    manifest, (cfg, m, hp, ds, tok) = _cache(make, model, cache_dir + "2", ["method.params.epsilon=null",
                                                                           "method.params.epsilon_rel=0.1"], "pd_flat")
    assert manifest["retain_loss"] == pytest.approx(ResidentReference(model, m, hp, ds, tok, 4).retain_loss(), rel=1e-6)


def test_answer_topk_and_hidden_parts_equal_the_live_reference(setup):
    """UNDIAL's answer_topk (the target in column 0) and RMU's hidden (the layer's output at the answer tokens, read
    by the hook: here layer 0, whose output is the model's hidden_states[1]) -- cached == live, by example id."""
    make, model, cache_dir = setup
    manifest, (cfg, m, hp, ds, tok) = _cache(make, model, cache_dir, ["method.params.kl_topk=8"], "undial")
    batch = collate([ds["forget"][i] for i in (5, 0, 9)], tok.pad_token_id)
    a, b = CachedReference(cache_dir).lookup("forget", batch), ResidentReference(model, m, hp, ds, tok, 4).lookup(
        "forget", batch)
    answer = batch["labels"][:, 1:] != -100
    assert set(a) == {"ans_ids", "ans_logps"} == set(b) and a["ans_ids"].shape == (int(answer.sum()), 8)
    assert torch.equal(a["ans_ids"], b["ans_ids"]) and torch.equal(a["ans_ids"][:, 0], batch["labels"][:, 1:][answer])
    torch.testing.assert_close(a["ans_logps"], b["ans_logps"], atol=2e-2, rtol=1e-3)  # stored in fp16
    assert manifest["key"]["k"] == 8
    manifest, (cfg, m, hp, ds, tok) = _cache(make, model, cache_dir + "_rmu", ["method.params.layer=0"], "rmu")
    assert manifest["key"]["layer"] == 0 and CachedReference(cache_dir + "_rmu").lookup("forget", batch) == {}
    batch = collate([ds["retain"][i] for i in (4, 1)], tok.pad_token_id)
    a = CachedReference(cache_dir + "_rmu").lookup("retain", batch)["hidden"]
    with torch.no_grad():
        h = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  output_hidden_states=True).hidden_states[1]
    want = h[batch["labels"] != -100]
    torch.testing.assert_close(a, want, atol=2e-3, rtol=2e-3)  # stored in fp16
    torch.testing.assert_close(ResidentReference(model, m, hp, ds, tok, 4).lookup("retain", batch)["hidden"], want)
    with pytest.raises(ValueError, match="layer=5: the model has 2 decoder layers"):
        _cache(make, model, cache_dir + "_bad", ["method.params.layer=5"], "rmu")


@pytest.mark.parametrize("method, overrides", [("palu", ["method.params.K=50", "method.params.kl_topk=16"]),
                                               ("npo", []), ("rmu", ["method.params.layer=0"])])
def test_padding_free_reference_equals_the_padded_one(setup, monkeypatch, method, overrides):
    """train.padding_free (default) runs the reference's rows end to end in the precompute pass and in the resident
    reference, as the training forward: the same cache (ids equal, values to float precision) and the same live
    tensors as the padded pass; the precompute really packs (RowPacking built once per batch)."""
    from palu_ds import packing

    make, model, cache_dir = setup
    built = []

    class Counted(packing.RowPacking):
        def __init__(self, mask):
            built.append(mask.shape)
            super().__init__(mask)

    monkeypatch.setattr(packing, "RowPacking", Counted)
    _cache(make, model, cache_dir + "_padded", [*overrides, "train.padding_free=false"], method)
    assert not built
    _, (cfg, m, hp, ds, tok) = _cache(make, model, cache_dir, overrides, method)
    assert built and packing.attention_of(model) == packing.VARLEN
    _assert_same_cache(cache_dir, cache_dir + "_padded")
    _assert_same_lookups(*(ResidentReference(model, m, hp, ds, tok, 4, packed=p) for p in (True, False)), ds, tok)


def _assert_same_cache(cache_dir: str, other: str) -> None:
    """Two caches hold the same shards and tensors: ids equal, values to their fp16 storage precision."""
    from safetensors.torch import load_file

    shards = sorted(f for f in os.listdir(cache_dir) if f.endswith(".safetensors"))
    assert shards and shards == sorted(f for f in os.listdir(other) if f.endswith(".safetensors"))
    for f in shards:
        a, b = load_file(os.path.join(cache_dir, f)), load_file(os.path.join(other, f))
        assert set(a) == set(b)
        for k in a:
            if a[k].is_floating_point():
                torch.testing.assert_close(a[k].float(), b[k].float(), atol=2e-3, rtol=2e-3)  # fp16 storage
            else:
                assert torch.equal(a[k], b[k]), (f, k)


def _assert_same_lookups(ref, other, ds, tok) -> None:
    """Two live references give the same tensors for the same batches (rows out of order, padding in them)."""
    for name in ("forget", "retain"):
        batch = collate([ds[name][i] for i in (5, 0, 9)], tok.pad_token_id)
        a, b = ref.lookup(name, batch), other.lookup(name, batch)
        assert set(a) == set(b)
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method, overrides", [("palu", ["method.params.K=50", "method.params.kl_topk=16"]),
                                               ("npo", []), ("rmu", ["method.params.layer=0"]),
                                               ("palu_pd", ["method.params.K=50", "method.params.kl_topk=16",
                                                            "method.params.epsilon=null",
                                                            "method.params.epsilon_rel=0.1"])])
def test_answer_only_reference_equals_the_full_logits_one(setup, method, overrides):
    """train.answer_only_logits (default) has the reference form logits only where the next token is an answer
    token (the model's own head on those positions, logits_to_keep): the same cache and retain loss as the full
    [B, T, V] logits, the same live tensors; the precompute's forwards really return answer rows only."""
    make, model, cache_dir = setup
    rows = []
    forward = model.forward

    @functools.wraps(forward)  # its signature too: start_answer_only reads it
    def recorded(*args, **kwargs):
        out = forward(*args, **kwargs)
        rows.append((out.logits.shape, kwargs.get("logits_to_keep")))
        return out

    model.forward = recorded
    full, _ = _cache(make, model, cache_dir + "_full", [*overrides, "train.answer_only_logits=false"], method)
    assert rows and all(len(shape) == 3 and keep is None for shape, keep in rows)
    rows.clear()
    kept, (cfg, m, hp, ds, tok) = _cache(make, model, cache_dir, overrides, method)
    passes = [(shape, keep) for shape, keep in rows if keep is not None and keep.shape[-1] > 6]  # not the probe
    assert passes and all(len(shape) == 2 and shape[0] == int(keep.sum()) for shape, keep in passes)
    assert sum(shape[0] for shape, _ in passes) < sum(keep.numel() for _, keep in passes)  # prompts formed none
    model.forward = forward
    _assert_same_cache(cache_dir, cache_dir + "_full")
    assert ("retain_loss" in full) == (method == "palu_pd")  # its relative epsilon reads the reference's retain loss
    if method == "palu_pd":
        assert kept["retain_loss"] == pytest.approx(full["retain_loss"], rel=1e-5)
    _assert_same_lookups(*(ResidentReference(model, m, hp, ds, tok, 4, packed=True, answer_only=a)
                           for a in (True, False)), ds, tok)


def test_reuse_keeps_the_files(setup):
    make, model, cache_dir = setup
    first, _ = _cache(make, model, cache_dir)
    stamps = {f: os.path.getmtime(os.path.join(cache_dir, f)) for f in os.listdir(cache_dir)}
    again, _ = _cache(make, model, cache_dir)
    assert again["key"] == first["key"]
    assert stamps == {f: os.path.getmtime(os.path.join(cache_dir, f)) for f in os.listdir(cache_dir)}


@pytest.mark.parametrize("field,overrides", [
    ("K", ["method.params.K=7"]), ("k", ["method.params.kl_topk=5"]), ("n_init", ["data.n_init=1"]),
    ("max_length", ["data.max_length=60"]), ("dtype", ["reference.dtype=bfloat16"]),
    ("data_forget", ["data.forget.config=holdout10"]),
])
def test_mismatch_is_refused_naming_the_field(setup, field, overrides):
    make, model, cache_dir = setup
    _cache(make, model, cache_dir)
    with pytest.raises(CacheMismatch, match=rf"differing field\(s\): .*\b{field} \(cache"):
        _cache(make, model, cache_dir, overrides)


def test_mismatch_model_tokenizer_prompt_version(setup, tiny, tmp_path, monkeypatch):
    make, model, cache_dir = setup
    _cache(make, model, cache_dir)
    # the model: other weights in another dir
    from transformers import AutoModelForCausalLM

    other = AutoModelForCausalLM.from_pretrained(tiny["model"])
    with torch.no_grad():
        other.lm_head.weight.add_(1.0)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(CacheMismatch, match=r"\bmodel \(cache"):
        _cache(make, model, cache_dir, [f"reference.model={tmp_path / 'other'}"])
    # the package version
    monkeypatch.setattr("palu_ds.reference.key.__version__", "9.9.9")
    with pytest.raises(CacheMismatch, match=r"package_version \(cache"):
        _cache(make, model, cache_dir)
    monkeypatch.undo()
    # the tokenizer and the prompt format (a chat template changes both the prompt and the data fingerprint)
    cfg, m, hp, ds, tok = make()
    tok.add_tokens(["<extra_token>"])
    with pytest.raises(CacheMismatch, match=r"\btokenizer \(cache"):
        precompute(cfg, m, hp, ds, tok, {}, cache_dir, model=model)
    cfg, m, hp, ds, tok = make()
    tok.chat_template = "{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}<|assistant|>"
    with pytest.raises(CacheMismatch, match=r"prompt_format \(cache"):
        precompute(cfg, m, hp, ds, tok, {}, cache_dir, model=model)


def test_interrupted_write_is_never_read_and_is_recomputed(setup):
    make, model, cache_dir = setup
    _cache(make, model, cache_dir)
    os.remove(os.path.join(cache_dir, MANIFEST))  # as if the run died before the manifest
    with open(os.path.join(cache_dir, "forget.rank0.safetensors"), "wb") as f:
        f.write(b"half-written")
    with pytest.raises(FileNotFoundError, match="incomplete"):
        CachedReference(cache_dir)
    manifest, _ = _cache(make, model, cache_dir)  # recomputed, not reused
    assert os.path.isfile(os.path.join(cache_dir, MANIFEST))
    assert CachedReference(cache_dir).manifest["key"] == manifest["key"]


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_shard_names_the_file(setup, damage):
    make, model, cache_dir = setup
    _cache(make, model, cache_dir)
    shard = os.path.join(cache_dir, "forget.rank0.safetensors")
    data = open(shard, "rb").read()
    with open(shard, "wb") as f:
        f.write(data[: len(data) // 2] if damage == "truncate" else b"\x00" * len(data))
    with pytest.raises(RuntimeError, match=r"forget\.rank0\.safetensors is corrupt.*delete"):
        CachedReference(cache_dir)


def test_manifest_records_what_was_written(setup):
    make, model, cache_dir = setup
    manifest, _ = _cache(make, model, cache_dir)
    with open(os.path.join(cache_dir, MANIFEST)) as f:
        on_disk = json.load(f)
    assert on_disk["shards"] == ["forget.rank0.safetensors"] and on_disk["world_size"] == 1
    from safetensors import safe_open

    with safe_open(os.path.join(cache_dir, "forget.rank0.safetensors"), "pt") as f:
        assert f.get_tensor("topk_ids").dtype == torch.int16  # V=1024 fits int16
        assert f.get_tensor("kl_logps").dtype == torch.float16
