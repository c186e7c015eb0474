"""palu_ds.packing: the padding-free forward (``train.padding_free``) equals the padded one, values and gradients.

Tiny random Llama / Qwen2 / Mistral models (grouped-query attention, a sliding window on Mistral): the packed forward's
hidden states and every parameter's gradient of a loss over the real tokens equal the right-padded forward's (fp32,
only the summation order differs). The self-check refuses a model whose packed forward mixes rows (transformers'
own packed-sequence detection switched off), the layout refuses left padding, and non-sdpa attention is left alone.
"""
import json

import pytest
import torch
import transformers as tf

from palu_ds import packing
from test_lm_head import CONFIGS as HEAD_CONFIGS, SMALL, V

CONFIGS = {"llama": HEAD_CONFIGS["llama"], "qwen2": HEAD_CONFIGS["qwen2"],
           "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {"sliding_window": 16})}


def tiny(arch: str, attn: str = "sdpa"):
    cfg_cls, model_cls, extra = CONFIGS[arch]
    torch.manual_seed(0)
    return model_cls(cfg_cls(**SMALL, **extra, attn_implementation=attn)).float()


def batch(lengths=(9, 4, 12, 1), T: int = 12, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (len(lengths), T), generator=g)
    mask = (torch.arange(T) < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_packed_forward_and_gradients_equal_the_padded(arch):
    model = tiny(arch).train()
    assert packing.enable(model) and packing.attention_of(model) == packing.VARLEN
    ids, mask = batch()
    rows = packing.RowPacking(mask)
    keep = mask.bool()
    weight = torch.randn(*keep.shape, SMALL["hidden_size"], generator=torch.Generator().manual_seed(2))

    grads = {}
    for name, inputs, unpack in (("padded", {"input_ids": ids, "attention_mask": mask}, lambda t: t),
                                 ("packed", rows.inputs(ids), rows.unpack)):
        model.zero_grad()
        h = unpack(model(**inputs, output_hidden_states=True).hidden_states[-1])
        assert h.shape == (*ids.shape, SMALL["hidden_size"])
        (h[keep] * weight[keep]).sum().backward()
        grads[name] = (h.detach(), {k: p.grad.clone() for k, p in model.named_parameters()
                                    if p.grad is not None})
    (hp, gp), (hq, gq) = grads["padded"], grads["packed"]
    torch.testing.assert_close(hq[keep], hp[keep], atol=1e-5, rtol=1e-5)
    assert torch.equal(hq[~keep], torch.zeros_like(hq[~keep]))  # padding positions: zeros, never computed
    assert len(gp) == len(gq) > 10
    for k in gp:
        torch.testing.assert_close(gq[k], gp[k], atol=1e-5, rtol=1e-4)
    assert packing.verify(model) < 1e-4 and model.training  # the engine's once-per-run self-check


def test_rows_never_see_each_other():
    """Changing one row's tokens changes no other row's packed outputs."""
    model = tiny("llama").eval()
    packing.enable(model)
    ids, mask = batch()
    rows = packing.RowPacking(mask)
    other = ids.clone()
    other[0, :9] = (other[0, :9] + 5) % V + 1
    with torch.no_grad():
        a = rows.unpack(model(**rows.inputs(ids), output_hidden_states=True).hidden_states[-1])
        b = rows.unpack(model(**rows.inputs(other), output_hidden_states=True).hidden_states[-1])
    assert not torch.allclose(a[0, :9], b[0, :9])
    torch.testing.assert_close(a[1:], b[1:], atol=0, rtol=0)


def test_the_layout():
    ids, mask = batch(lengths=(3, 1, 2), T=4)
    rows = packing.RowPacking(mask)
    inputs = rows.inputs(ids)
    assert inputs["input_ids"].tolist() == [[*ids[0, :3].tolist(), ids[1, 0].item(), *ids[2, :2].tolist()]]
    assert inputs["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1]]
    assert inputs["cu_seq_lens_q"].tolist() == [0, 3, 4, 6] and inputs["max_length_q"] == 3
    back = rows.unpack(torch.arange(6.0)[None, :, None].expand(1, 6, 2))
    assert back[..., 0].tolist() == [[0, 1, 2, 0], [3, 0, 0, 0], [4, 5, 0, 0]]
    with pytest.raises(ValueError, match="right-padded"):
        packing.RowPacking(torch.tensor([[0, 1, 1], [1, 1, 1]]))


def test_verify_refuses_a_model_whose_packed_forward_mixes_rows(monkeypatch):
    """A model whose attention ignores the rows' boundaries -- here transformers' sdpa with its packed-sequence
    detection switched off, i.e. one causal attention over the whole packed sequence -- is refused by name."""
    import transformers.masking_utils as mu

    model = tiny("llama")
    assert packing.attention_of(model) == "sdpa"
    monkeypatch.setattr(mu, "find_packed_sequence_indices", lambda position_ids: None)
    with pytest.raises(packing.PackingUnsupported, match=r"Llama: packed rows give hidden states that differ.*"
                                                         r"train.padding_free: false"):
        packing.verify(model)


def test_start_enables_checks_or_leaves_padded(monkeypatch, caplog):
    """``packing.start`` (the engine's and the reference's switch): off when not wanted; on for sdpa; a model on
    another attention stays padded with a warning naming it; a failed check is a ConfigError naming the setting."""
    import transformers.masking_utils as mu

    from palu_ds.config import ConfigError

    model = tiny("llama")
    assert not packing.start(model, False) and packing.attention_of(model) == "sdpa"
    assert packing.start(model, True) and packing.attention_of(model) == packing.VARLEN
    with caplog.at_level("WARNING", logger="palu_ds"):
        assert not packing.start(tiny("llama", attn="eager"), True)
    assert "attn_implementation=eager" in caplog.text and "rows stay padded" in caplog.text
    monkeypatch.setattr(packing, "enable", lambda model: True)  # sdpa kept, blind to the rows (as in faulty_train)
    monkeypatch.setattr(mu, "find_packed_sequence_indices", lambda position_ids: None)
    with pytest.raises(ConfigError, match="train.padding_free: Llama: packed rows give hidden states that differ"):
        packing.start(tiny("llama"), True)


def test_a_sliding_window_shorter_than_a_row_is_refused():
    model = tiny("mistral")
    packing.enable(model)
    ids, mask = batch(lengths=(20, 3), T=20)
    rows = packing.RowPacking(mask)
    with pytest.raises(packing.PackingUnsupported, match="sliding window of 16 tokens.*padding_free: false"):
        model(**rows.inputs(ids))


def test_other_attention_implementations_are_left_alone():
    model = tiny("llama", attn="eager")
    assert not packing.enable(model) and packing.attention_of(model) == "eager"


def test_enabling_changes_nothing_saved_and_nothing_padded(tmp_path):
    """The saved config names no palu_ds attention; a padded forward and generation (the in-training evaluation) are
    sdpa's, bit for bit."""
    model, plain = tiny("qwen2").eval(), tiny("qwen2").eval()
    packing.enable(model)
    ids, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                                   plain(input_ids=ids, attention_mask=mask).logits, atol=0, rtol=0)
    left = torch.stack([torch.cat([torch.zeros(12 - n, dtype=torch.long), r[:n]]) for r, n in zip(ids, mask.sum(1))])
    gen = dict(input_ids=left, attention_mask=(torch.arange(12) >= 12 - mask.sum(1)[:, None]).long(),
               max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(**gen), plain.generate(**gen))
    model.save_pretrained(tmp_path)
    assert packing.VARLEN not in (tmp_path / "config.json").read_text()
    assert "attn_implementation" not in json.loads((tmp_path / "config.json").read_text())


@pytest.mark.slow
def test_a_model_whose_packed_forward_mixes_rows_stops_the_run_before_training(tiny, target, tmp_path):
    """The start-up check in the engine: a config error naming the model and the setting, exit 2, nothing written."""
    from e2e import FAULTY, launch
    from test_engine_e2e import unlearn_args

    out = tmp_path / "run"
    p = launch(FAULTY, ["mixed_attention=1", *unlearn_args(tiny, target, str(out), "grad_diff", 0)], nproc=1,
               check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "config error: train.padding_free: Llama: packed rows give hidden states that differ" in p.stderr
    assert "set train.padding_free: false" in p.stderr
    assert not (out / "model").exists() and not (out / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["palu", "rmu"])
def test_a_padding_free_run_trains_as_the_padded_run(tiny, target, tmp_path, method):
    """One process, stage 0, 3 steps: every loss term of every step of the padding-free run (the default) equals the
    padded run's (``train.padding_free=false``) to float precision -- palu reads spans and the reference cache, rmu
    a decoder layer's captured output, which comes back in the padded layout -- and so do the saved weights."""
    from e2e import launch, state, summary
    from test_engine_e2e import unlearn_args

    runs = {}
    for name, extra in (("packed", []), ("padded", ["train.padding_free=false"])):
        runs[name] = str(tmp_path / name)
        launch("launch/train.py", unlearn_args(tiny, target, runs[name], method, 0, ["train.max_steps=3", *extra]),
               nproc=1)
    packed, padded = summary(runs["packed"]), summary(runs["padded"])
    assert packed["padding_free"] is True and padded["padding_free"] is False
    for when in ("first", "last"):
        terms = [k for k in padded[when] if k.startswith("loss/")]
        assert terms and all(packed[when][k] == pytest.approx(padded[when][k], rel=1e-4, abs=1e-6) for k in terms)
    wa, wb = state(packed["model"]), state(padded["model"])
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5, rtol=1e-4) for k in wa)
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)  # not the same computation: the layout differs


def test_under_cpu_autocast_the_packed_attention_runs_in_fp32():
    """bf16 autocast: the packed forward's attention is computed in fp32 (its output cast back to bf16 for the next
    product), so it is at least as close to the fp32 forward as the padded bf16 forward, whose attention is bf16."""
    model = tiny("llama").eval()
    packing.enable(model)
    ids, mask = batch()
    rows, keep = packing.RowPacking(mask), mask.bool()
    seen = []
    layer = model.model.layers[0].self_attn.o_proj
    handle = layer.register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
    with torch.no_grad():
        fp32 = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        with torch.autocast("cpu", torch.bfloat16):
            padded = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
            packed = rows.unpack(model(**rows.inputs(ids), output_hidden_states=True).hidden_states[-1])
    handle.remove()
    assert seen == [torch.float32, torch.bfloat16, torch.bfloat16]  # the attention output enters o_proj in bf16
    err_packed = (packed[keep].float() - fp32[keep]).abs().max()
    err_padded = (padded[keep].float() - fp32[keep]).abs().max()
    assert err_packed < 0.05 * fp32[keep].abs().max() and err_packed <= 1.5 * err_padded
