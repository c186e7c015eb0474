"""The answer-only LM head (palu_ds.lm_head) gives exactly the model's own logits, post-processing included.

Tiny random configs of Llama, Qwen2 (plain heads), Gemma-2 (final_logit_softcapping, set small so it bites),
Cohere (logit_scale) and Granite (1/logits_scaling): the engine's path -- last hidden states at the answer positions
only, then :func:`lm_logits` -- equals ``model(...).logits`` at those positions (fp32, atol 1e-5: same operations
on the same numbers, only the matmul's blocking can differ).  The bare head alone does NOT match Gemma-2, Cohere and
Granite (so the test would catch a missing post-processing).  Refusals: an architecture listed in REFUSED, and any
head that :func:`verify` finds different from the forward, by name.
"""

import pytest
import torch
import transformers as tf

from palu_ds.batch import IGNORE_INDEX
from palu_ds.lm_head import HeadSpec, UnsupportedHead, head_spec, lm_logits, output_head, verify

V = 97
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
CONFIGS = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),
    "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, {"final_logit_softcapping": 0.5, "head_dim": 8}),
    "cohere": (tf.CohereConfig, tf.CohereForCausalLM, {"logit_scale": 0.37}),
    "granite": (tf.GraniteConfig, tf.GraniteForCausalLM, {"logits_scaling": 3.0}),
}
POSTPROCESSED = {"gemma2", "cohere", "granite"}


def tiny(arch: str, seed: int = 0):
    cfg_cls, model_cls, extra = CONFIGS[arch]
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**SMALL, **extra)).float().eval()
    with torch.no_grad():  # random init has tiny logits: make them large enough for the soft-cap / scale to matter
        output_head(model).weight.mul_(30.0)
    return model


def batch(seed: int = 1, B: int = 3, T: int = 10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (B, T), generator=g)
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX  # prompt
    labels[1, 7:] = IGNORE_INDEX  # a shorter answer
    return ids, labels


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_answer_only_logits_equal_the_models_own(arch):
    model = tiny(arch)
    ids, labels = batch()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
        answer = labels[:, 1:] != IGNORE_INDEX            # positions whose next token is an answer token
        want = out.logits[:, :-1][answer]
        h = out.hidden_states[-1][:, :-1][answer]
        got = lm_logits(model, h)
        bare = output_head(model)(h)
    assert got.shape == want.shape == (int(answer.sum()), V)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    if arch in POSTPROCESSED:  # the bare head is wrong for these: the post-processing is what makes them equal
        assert (bare - want).abs().max() > 0.1
        assert head_spec(model) != HeadSpec(arch)
    else:
        assert head_spec(model) == HeadSpec(arch)
    assert verify(model) < 1e-4  # the engine's once-per-run self-check passes


def test_gemma2_softcap_off_is_plain():
    cfg_cls, model_cls, _ = CONFIGS["gemma2"]
    model = model_cls(cfg_cls(**SMALL, head_dim=8, final_logit_softcapping=None))
    assert head_spec(model) == HeadSpec("gemma2")


def test_verify_refuses_a_head_it_cannot_reproduce_by_name():
    model = tiny("gemma2")
    with pytest.raises(UnsupportedHead, match=r"'gemma2'.*differ.*answer_only_logits: false"):
        verify(model, HeadSpec("gemma2"))  # the spec without the soft-cap: what the engine did before


def test_verify_leaves_training_mode_and_rng_alone():
    model = tiny("llama").train()
    state = torch.random.get_rng_state()
    verify(model)
    assert model.training and torch.equal(torch.random.get_rng_state(), state)


def test_refused_architecture_by_name():
    cfg = tf.ElectraConfig(vocab_size=V, embedding_size=16, hidden_size=32, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=32, is_decoder=True)
    model = tf.ElectraForCausalLM(cfg)
    with pytest.raises(UnsupportedHead, match=r"'electra'.*answer_only_logits: false"):
        head_spec(model)


def test_peft_wrapped_model_keeps_the_post_processing():
    peft = pytest.importorskip("peft")
    model = tiny("cohere")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"]))
    assert head_spec(wrapped) == head_spec(model) and head_spec(model).scale == pytest.approx(0.37)
    assert verify(wrapped) < 1e-4


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_the_reference_keeps_answer_rows_through_the_models_own_head(arch):
    """``start_answer_only`` (the reference's switch, ``train.answer_only_logits``): on for each architecture here,
    whose own forward takes a boolean ``logits_to_keep`` and applies its soft-cap / scale to the kept rows, which
    equal its full logits there (what :func:`palu_ds.reference.parts.reference_forward` then returns as
    PackedLogits); off when not wanted."""
    from palu_ds.batch import PackedLogits, shift
    from palu_ds.lm_head import start_answer_only
    from palu_ds.reference.parts import reference_forward

    model = tiny(arch)
    assert not start_answer_only(model, False) and start_answer_only(model, True)
    ids, labels = batch()
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    full, _ = reference_forward(model, b, None, packed=False)
    rows, _ = reference_forward(model, b, None, packed=False, answer_only=True)
    assert isinstance(rows, PackedLogits) and torch.equal(rows.answer, labels[:, 1:] != IGNORE_INDEX)
    assert rows.rows.shape == (int(rows.answer.sum()), V)
    lg, labels_s = shift(full, labels)
    assert shift(rows, labels)[0] is rows and torch.equal(shift(rows, labels)[1], labels_s)
    torch.testing.assert_close(rows[labels_s != IGNORE_INDEX], lg[labels_s != IGNORE_INDEX], atol=1e-5, rtol=0)


def test_the_reference_without_answer_rows_warns_or_refuses(caplog):
    """A model whose forward takes no ``logits_to_keep`` forms full logits, with a warning naming it (as training's
    head path); one that takes it but does not return the kept rows is a ConfigError naming the setting."""
    import functools

    from palu_ds.config import ConfigError
    from palu_ds.lm_head import start_answer_only

    model = tiny("llama")
    forward = model.forward
    model.forward = lambda input_ids, attention_mask=None, **kw: forward(input_ids=input_ids,
                                                                         attention_mask=attention_mask)
    with caplog.at_level("WARNING", logger="palu_ds"):
        assert not start_answer_only(model, True)
    assert "takes no logits_to_keep; the reference forms full logits" in caplog.text

    @functools.wraps(forward)
    def blind(*args, logits_to_keep=0, **kw):  # takes the argument, ignores it: full logits come back
        return forward(*args, **kw)

    model.forward = blind
    with pytest.raises(ConfigError, match=r"train.answer_only_logits: LlamaForCausalLM cannot form logits at answer "
                                          r"positions only: its forward gave logits of shape \(2, 6, 97\) for "
                                          r"\(4, 97\) kept positions; set train.answer_only_logits: false"):
        start_answer_only(model, True)

    @functools.wraps(forward)
    def shifted(*args, logits_to_keep=0, **kw):  # the kept rows' shape, the next position's logits
        out = forward(*args, **kw)
        if isinstance(logits_to_keep, torch.Tensor):
            out.logits = out.logits.roll(-1, dims=1)[logits_to_keep]
        return out

    model.forward = shifted
    with pytest.raises(ConfigError, match=r"its kept rows differ from its full logits \(max \|diff\| .*\); set "
                                          r"train.answer_only_logits: false"):
        start_answer_only(model, True)
