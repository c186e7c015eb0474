"""Batched log-prob passes and left-padded generation on a tiny random Llama; prompt formatting (BOS once)."""

import functools

import pytest
import torch

from palu_ds.data.synthetic import corpus_texts
from palu_ds.tiny import CHAT_TEMPLATE, make_tiny_model
from palu_ds.data.prompt import encode_qa, encode_text, format_prompt
from palu_eval import scoring
from palu_eval.scoring import generate_greedy, score_targets


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, tok = make_tiny_model(tmp_path_factory.mktemp("m"), corpus_texts())
    return model, tok


def test_score_targets_equals_unbatched_forward(tiny):
    """Each query's log-probs from a padded batch equal log_softmax of an unpadded single forward, read at the
    positions that predict the target tokens (logit t scores token t+1)."""
    model, tok = tiny
    queries = [encode_qa(tok, q, [a]) for q, a in [("Where was Arlo born?", "In Oslo."),
                                                     ("Who?", "The fantasy author Arlo Vance3 was born in Quito."),
                                                     ("Which city is number 3 on the list?", "Kyoto")]]
    queries = [ts[0] for _, ts in queries]
    stats = score_targets(model, queries, pad_id=tok.pad_token_id, batch_size=3, vocab_stats=True)
    for (p, t), st in zip(queries, stats):
        ids = torch.tensor([p + t])
        with torch.no_grad():
            lsm = torch.log_softmax(model(ids).logits[0].float(), -1)
        pos = torch.arange(len(p) - 1, len(p) + len(t) - 1)
        want = lsm[pos, torch.tensor(t)]
        assert torch.allclose(torch.tensor(st.logps, dtype=torch.float32), want, atol=1e-5)
        assert (st.greedy_match == (lsm[pos].argmax(-1) == torch.tensor(t)).numpy()).all()
        mu = (lsm[pos].exp() * lsm[pos]).sum(-1)
        assert torch.allclose(torch.tensor(st.mu, dtype=torch.float32), mu, atol=1e-4)
        assert t[-1] == tok.eos_token_id


def test_score_targets_skips_the_head_before_the_first_scored_position(tiny, monkeypatch):
    """The model is asked for logits from the batch's first scored position on (``logits_to_keep``), not over the
    whole padded width, and the statistics still equal the full-logit ones."""
    model, tok = tiny
    queries = [ts[0] for _, ts in (encode_qa(tok, q, [a]) for q, a in [
        ("Where was the fantasy author Arlo Vance born, and when?", "In Oslo."), ("Who?", "Arlo Vance.")])]
    with monkeypatch.context() as m:  # a model without logits_to_keep: full logits
        m.setattr(scoring, "accepts_logits_to_keep", lambda model: False)
        full = score_targets(model, queries, pad_id=tok.pad_token_id, batch_size=2)
    seen, forward = [], model.forward

    @functools.wraps(forward)  # keeps forward's signature, which says it takes logits_to_keep
    def spy(*args, **kwargs):
        seen.append((kwargs["input_ids"].shape[1], kwargs.get("logits_to_keep")))
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", spy)
    kept = score_targets(model, queries, pad_id=tok.pad_token_id, batch_size=2)
    width, first = max(len(p) + len(t) for p, t in queries), min(len(p) for p, _ in queries) - 1
    assert seen == [(width, width - first)] and first > 3
    for a, b in zip(full, kept):
        assert (a.logps == b.logps).all() and (a.greedy_match == b.greedy_match).all()


def test_left_padded_generation_equals_unpadded(tiny):
    """Greedy generation for prompts of different lengths in one left-padded batch gives the same text as
    generating each prompt alone (batch of one, no padding)."""
    model, tok = tiny
    questions = ["Where was Arlo born?", "Which city hosts the poetry fair 7 in the north of the land?", "Who?",
                 "Where was the satire author Arlo Vance12 born?"]
    prompts = [encode_text(tok, format_prompt(tok, q)) for q in questions]
    assert len({len(p) for p in prompts}) == len(prompts)
    batched = generate_greedy(model, tok, prompts, max_new_tokens=12, batch_size=4)
    alone = [generate_greedy(model, tok, [p], max_new_tokens=12, batch_size=1)[0] for p in prompts]
    assert batched == alone
    assert any(len(t) > 0 for t in batched)


def test_bos_exactly_once_plain_and_chat_template(tmp_path):
    """Plain template: tokenizer adds BOS by default -> encode_text has one BOS at the front.  A chat template
    that itself writes BOS as text -> still exactly one BOS (not two).  The answer ids follow the prompt ids and
    end with EOS."""
    _, tok = make_tiny_model(tmp_path / "plain", corpus_texts())
    text = format_prompt(tok, "Where was Arlo born?")
    assert text == "Question: Where was Arlo born?\nAnswer:"
    ids = encode_text(tok, text)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1

    _, chat = make_tiny_model(tmp_path / "chat", corpus_texts(), chat_template=CHAT_TEMPLATE)
    text = format_prompt(chat, "Where was Arlo born?")
    assert text.startswith("<s>") and text.endswith("<|assistant|>")
    ids = encode_text(chat, text)
    assert ids[0] == chat.bos_token_id and ids.count(chat.bos_token_id) == 1
    prompt, ((prefix, answer),) = encode_qa(chat, "Where was Arlo born?", ["In Oslo."])
    assert prompt == ids == prefix and answer[-1] == chat.eos_token_id
    assert chat.decode(answer, skip_special_tokens=True).strip() == "In Oslo."
