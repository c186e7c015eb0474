"""The chunked LM-head-plus-loss path (palu_ds.lm_head.ChunkedLogits) == the dense path, for every method.

Every method of the registry, precomputed and resident reference, with and without the head's bias, with the
logit post-processing of palu_ds.lm_head (scale + soft-cap; a hidden-side scale): the terms and the gradients w.r.t.
the hidden states, the head weight and its bias equal the dense path's -- plain [B, T, V] logits and the engine's
PackedLogits -- in float64 to rtol 1e-9 / atol 1e-11 (the same operations in another order; chunks of 2 rows, so
every batch spans several chunks).  Then real tiny transformers models: tied embeddings (Gemma-2 with its soft-cap,
Cohere with its logit scale), LoRA (frozen head, adapter gradients equal), a LoRA adapter on the head refused, and
the chunk bound held in forward and backward.  The chunked path runs three ways: ``fused`` (the engine's: the step's
objective given, every linearly weighed job computes its gradient in the forward pass), ``chunked`` (the default
objective, the plain sum of the terms: seeds wrong by the objective's weights, corrected in backward) and
``recompute`` (``fuse=False``: every job recomputed in backward, issue 17's path) -- all three exact.
"""

import functools

import pytest
import torch

from palu_ds import losses as L
from palu_ds.batch import IGNORE_INDEX, PackedLogits
from palu_ds.lm_head import (ChunkedLogits, HeadSpec, UnsupportedHead, chunk_rows, chunked_logits, chunked_rows,
                             lm_logits, output_head, within_head)
from palu_ds.methods import METHODS, StepInputs, get_method
from test_methods import D, T, V, make_batch, pack_ref

SPECS = {"plain": HeadSpec("plain"), "post": HeadSpec("post", scale=0.7, softcap=2.5),
         "hidden_scale": HeadSpec("hs", hidden_scale=0.5)}
RTOL, ATOL = 1e-9, 1e-11


def world(seed=0, B=4, bias=True):
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(D, V, bias=bias).double()
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, D, generator=g, dtype=torch.float64))
        if bias:
            head.bias.copy_(torch.randn(V, generator=g, dtype=torch.float64))
    w_ref = head.weight.detach() + 0.3 * torch.randn(V, D, generator=g, dtype=torch.float64)
    batches = {n: make_batch(seed + i, B) for i, n in enumerate(("forget", "retain", "idk"))}
    hidden = {n: torch.randn(B, T, D, generator=g, dtype=torch.float64) for n in batches}
    return head, w_ref, batches, hidden


CHUNKED = ("fused", "chunked", "recompute")


def run(name, path, spec, ref_mode, bias=True, chunk_elems=2 * V, stats=None):
    """Terms and gradients (hidden, W, b) of one method on one path; fresh leaves each call (``stats``: a dict that
    receives the chunked head's fused / recomputed row counts)."""
    m = get_method(name)
    head, w_ref, batches, hidden0 = world(bias=bias)
    batches = {n: b for n, b in batches.items() if n in m.batches}
    hidden = {n: hidden0[n].clone().requires_grad_(True) for n in batches}
    ref_logits = {n: spec.post(torch.nn.functional.linear(spec.prepare(hidden0[n]), w_ref, head.bias)).detach()
                  for n in batches if n != "retain"}
    refs = ({n: pack_ref(r, batches[n], K=5, k=4) for n, r in ref_logits.items()} if ref_mode == "packed"
            else {n: {"logits": r} for n, r in ref_logits.items()})
    answers = {n: b["labels"][:, 1:] != IGNORE_INDEX for n, b in batches.items()}
    if path == "full":
        logits = {n: lm_logits(head, h, spec) for n, h in hidden.items()}
    elif path == "packed":
        logits = {n: PackedLogits(lm_logits(head, hidden[n][:, :-1][a], spec), a) for n, a in answers.items()}
    else:
        packed = torch.cat([hidden[n][:, :-1][a] for n, a in answers.items()])
        logits = chunked_logits(head, spec, packed, answers, chunk_elems, fuse=path != "recompute")
    hp = {"K": 5} if "K" in m.defaults else {}
    objective = functools.partial(m.objective, hp=hp, lam=2.0)
    heads = []

    def terms_of(lg):
        heads.extend(v.chunked for v in lg.values() if hasattr(v, "chunked"))
        return m.terms(StepInputs(logits=lg, batches=batches, ref=refs), hp)

    terms = within_head(logits, terms_of, objective if path == "fused" else None)
    objective(terms).backward()
    if stats is not None and heads:
        stats.update(heads[-1].stats())
    grads = [hidden[n].grad for n in batches] + [head.weight.grad] + ([head.bias.grad] if bias else [])
    return {k: v.detach() for k, v in terms.items()}, grads


# resident: only methods that read a reference; a method whose terms read a decoder layer's output (RMU) and no
# logits does not depend on the head path
CASES = [(n, r) for n in sorted(METHODS) for r in ("packed", "resident")
         if (r == "packed" or not METHODS[n].is_reference_free) and METHODS[n].hidden_layer is None]


@pytest.mark.parametrize("spec", sorted(SPECS))
@pytest.mark.parametrize("name,ref_mode", CASES)
def test_every_method_chunked_equals_dense(name, spec, ref_mode):
    want_terms, want_grads = run(name, "full", SPECS[spec], ref_mode)
    for path in ("packed", *CHUNKED):
        terms, grads = run(name, path, SPECS[spec], ref_mode)
        assert terms.keys() == want_terms.keys()
        for k in terms:
            torch.testing.assert_close(terms[k], want_terms[k], rtol=RTOL, atol=ATOL, msg=f"{path} {k}")
        for g, w in zip(grads, want_grads):
            torch.testing.assert_close(g, w, rtol=RTOL, atol=ATOL, msg=path)
        assert all(g.abs().sum() > 0 for g in grads[-2:])  # the head gets a real gradient


def test_without_bias():
    for name in ("palu", "npo"):
        want_terms, want_grads = run(name, "full", SPECS["post"], "packed", bias=False)
        for path in CHUNKED:
            terms, grads = run(name, path, SPECS["post"], "packed", bias=False)
            for k in terms:
                torch.testing.assert_close(terms[k], want_terms[k], rtol=RTOL, atol=ATOL)
            for g, w in zip(grads, want_grads):
                torch.testing.assert_close(g, w, rtol=RTOL, atol=ATOL)


def test_fused_path_recomputes_only_rows_weighed_by_their_own_values():
    """With the objective given, terms that sum per-row losses over a global count run fused: no row's logits are
    recomputed in backward (palu: L_sens, KL and retain NLL; pd_flat: the constraint weighed by lambda).  NPO weighs
    each forget row by a factor of its sequence's log-likelihood: those rows are recomputed, the retain rows fused.
    Without the objective (the plain sum) pd_flat's seeds miss lambda = 2: its retain rows are corrected in backward;
    with fuse=False every row is recomputed."""
    head, _, batches, _ = world()
    rows = {n: int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for n, b in batches.items()}
    palu_rows = {n: int((batches["forget"][k][:, 1:] & (batches["forget"]["labels"][:, 1:] != IGNORE_INDEX)).sum())
                 for n, k in (("sens", "sens_mask"), ("common", "common_mask"))}
    got = {}
    for name, path in [("palu", "fused"), ("pd_flat", "fused"), ("npo", "fused"), ("pd_flat", "chunked"),
                       ("palu", "recompute")]:
        got[name, path] = {}
        run(name, path, SPECS["post"], "packed", stats=got[name, path])
    assert got["palu", "fused"] == {"fused_rows": palu_rows["sens"] + palu_rows["common"] + rows["retain"],
                                    "recomputed_rows": 0}
    assert got["pd_flat", "fused"] == {"fused_rows": rows["forget"] + rows["retain"], "recomputed_rows": 0}
    assert got["npo", "fused"] == {"fused_rows": rows["retain"], "recomputed_rows": rows["forget"]}
    assert got["pd_flat", "chunked"] == {"fused_rows": rows["forget"] + rows["retain"],
                                         "recomputed_rows": rows["retain"]}
    assert got["palu", "recompute"] == {"fused_rows": 0, "recomputed_rows": sum(palu_rows.values()) + rows["retain"]}


def fused_step(loss_of, chunk_elems=3 * V):
    """pd_flat's terms on the fused path with the objective given (lam=3), back-propagating ``loss_of(terms,
    objective)``; and the same loss on dense logits.  Returns both sets of gradients and the head's stats."""
    m = get_method("pd_flat")
    head, _, batches, hidden0 = world(seed=2)
    batches = {n: batches[n] for n in m.batches}
    answers = {n: b["labels"][:, 1:] != IGNORE_INDEX for n, b in batches.items()}
    objective = functools.partial(m.objective, hp={}, lam=3.0)
    out, heads = [], []
    for path in ("dense", "fused"):
        head.zero_grad()
        hidden = {n: hidden0[n].clone().requires_grad_(True) for n in batches}
        packed = torch.cat([hidden[n][:, :-1][a] for n, a in answers.items()])
        if path == "dense":
            logits = {n: PackedLogits(r, answers[n]) for n, r in
                      zip(answers, lm_logits(head, packed).split([int(a.sum()) for a in answers.values()]))}
        else:
            logits = chunked_logits(head, HeadSpec("x"), packed, answers, chunk_elems)

        def terms_of(lg):
            heads.extend(v.chunked for v in lg.values() if hasattr(v, "chunked"))
            return m.terms(StepInputs(logits=lg, batches=batches), {})

        terms = within_head(logits, terms_of, objective)
        loss_of(terms, objective).backward()
        out.append([hidden[n].grad for n in batches] + [head.weight.grad.clone(), head.bias.grad.clone()])
    for g, w in zip(out[1], out[0]):
        torch.testing.assert_close(g, w, rtol=RTOL, atol=ATOL)
    return heads[-1].stats()


def test_fused_gradients_follow_the_loss_actually_back_propagated():
    """The seeds come from the objective given; what backward receives decides: a common factor (the engine's
    world * gas) costs nothing; a loss that weighs a term differently, or leaves a term out, gets the difference by
    recomputing those rows only -- exact in every case."""
    n_retain = int((world(seed=2)[2]["retain"]["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert fused_step(lambda t, obj: obj(t) * 6.0)["recomputed_rows"] == 0
    assert fused_step(lambda t, obj: obj(t) + 0.5 * t["retain"])["recomputed_rows"] == n_retain
    assert fused_step(lambda t, obj: t["forget"] * 2.0)["recomputed_rows"] == n_retain     # retain left out
    # forget weighed 0, retain 1 instead of 1 and lambda = 3: the scale 0 (the forget rows' ratio) leaves only the
    # retain rows to recompute
    assert fused_step(lambda t, obj: t["forget"] * 0.0 + t["retain"])["recomputed_rows"] == n_retain


def _head_rows_and_recorder():
    """A float64 head, 23 hidden rows (requiring grad) with targets, and ``(seen, fn)``: ``fn`` = ``row_logps`` that
    records the rows of each chunk it is given in ``seen``."""
    g = torch.Generator().manual_seed(3)
    head = torch.nn.Linear(D, V).double()
    h = torch.randn(23, D, dtype=torch.float64, generator=g, requires_grad=True)
    seen = []

    def fn(z, t):
        seen.append(z.shape[0])
        return L.row_logps(z, t)

    return head, h, torch.randint(0, V, (23,), generator=g), seen, fn


def test_chunks_bound_the_logits_alive_in_forward_and_backward():
    head, h, y, seen, fn = _head_rows_and_recorder()
    w, b = head.weight.detach().clone().requires_grad_(True), head.bias.detach().clone()  # plain tensors work too
    out = chunked_rows(fn, h, w, b, HeadSpec("x"), 5 * V, y)
    (out * torch.arange(23.0, dtype=torch.float64)).sum().backward()  # per-row upstream gradients
    assert chunk_rows(V, 5 * V) == 5 and seen == [5, 5, 5, 5, 3] * 2  # forward, then the recompute in backward
    h2 = h.detach().clone().requires_grad_(True)
    want = L.row_logps(head(h2), y)
    (want * torch.arange(23.0, dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(out, want, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(h.grad, h2.grad, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(w.grad, head.weight.grad, rtol=RTOL, atol=ATOL)


def test_fused_chunks_bound_the_logits_and_run_once():
    """Fused (a mean NLL through within_head): each chunk's logits are formed once, in forward, never again."""
    head, h, y, seen, fn = _head_rows_and_recorder()
    answer = torch.ones(1, 23, dtype=torch.bool)
    lg = chunked_logits(head, HeadSpec("x"), h, {"forget": answer}, 5 * V)
    loss = within_head(lg, lambda d: -L.aggregate_loss(L.map_rows(d["forget"], answer, fn, y), None, 23.0))
    loss.backward()
    assert seen == [5, 5, 5, 5, 3]
    h2 = h.detach().clone().requires_grad_(True)
    head2 = torch.nn.Linear(D, V).double()
    head2.load_state_dict(head.state_dict())
    (-L.row_logps(head2(h2), y).mean()).backward()
    for a, b in ((h.grad, h2.grad), (head.weight.grad, head2.weight.grad), (head.bias.grad, head2.bias.grad)):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def test_fused_per_row_function_must_return_one_value_per_row():
    head = torch.nn.Linear(D, V).double()
    answer = torch.ones(1, 4, dtype=torch.bool)
    lg = chunked_logits(head, HeadSpec("x"), torch.randn(4, D, dtype=torch.float64, requires_grad=True),
                        {"forget": answer}, V)
    with pytest.raises(ValueError, match="one value per row, got shape \\(1, 11\\) for 1 rows"):
        within_head(lg, lambda d: L.map_rows(d["forget"], answer, lambda z: z).sum())


def test_chunked_logits_refuse_forming_rows_and_misaligned_args():
    head = torch.nn.Linear(D, V).double()
    answer = torch.tensor([[True, False, True]])
    lg = chunked_logits(head, HeadSpec("x"), torch.zeros(2, D, dtype=torch.float64), {"forget": answer}, V)["forget"]
    assert isinstance(lg, ChunkedLogits) and isinstance(lg, PackedLogits)
    with pytest.raises(TypeError, match="never forms"):
        lg[answer]
    with pytest.raises(ValueError, match="without an answer label"):
        lg.map_rows(torch.tensor([[True, True, False]]), L.logit_margin_flat)
    with pytest.raises(ValueError, match="3 rows for 2 positions"):
        lg.map_rows(answer, L.row_logps, torch.zeros(3, dtype=torch.long))


# ---------------------------------------------------------------------------------------------- real models
def tiny_model(arch):
    import transformers as tf

    small = dict(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    cls, mcls, extra = {"gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, {"final_logit_softcapping": 1.0,
                                                                           "head_dim": 8}),
                        "cohere": (tf.CohereConfig, tf.CohereForCausalLM, {"logit_scale": 0.37}),
                        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {})}[arch]
    torch.manual_seed(0)
    return mcls(cls(**small, **extra)).double()


def model_step(model, path, name="npo"):
    """What the engine does for one micro-batch: forward -> packed answer rows -> head (dense / chunked) -> terms."""
    from palu_ds.lm_head import head_spec

    m = get_method(name)
    g = torch.Generator().manual_seed(5)
    batches = {}
    for n in m.batches:
        ids = torch.randint(1, 61, (3, 12), generator=g)
        labels = ids.clone()
        labels[:, :4] = IGNORE_INDEX
        sens = torch.zeros_like(ids, dtype=torch.bool)
        sens[:, 4:6] = True
        batches[n] = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
                      "sens_mask": sens, "common_mask": (labels != IGNORE_INDEX) & ~sens}
    model.zero_grad()
    ids = torch.cat([b["input_ids"] for b in batches.values()])
    hidden = model(input_ids=ids, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
    answers = {n: b["labels"][:, 1:] != IGNORE_INDEX for n, b in batches.items()}
    packed = torch.cat([h[:, :-1][answers[n]] for n, h in zip(batches, hidden.split(3))])
    spec = head_spec(model)
    if path == "dense":
        logits = {n: PackedLogits(r, answers[n]) for n, r in
                  zip(batches, lm_logits(model, packed, spec).split([int(a.sum()) for a in answers.values()]))}
    else:
        logits = chunked_logits(output_head(model), spec, packed, answers, 3 * 61)
    ref = {n: {"seq_logps": torch.full((3,), -30.0, dtype=torch.float64),
               "topk_ids": torch.arange(5).expand(int((b["sens_mask"][:, 1:]).sum()), 5),
               "kl_ids": torch.arange(4).expand(int((b["common_mask"][:, 1:]).sum()), 4),
               "kl_logps": torch.full((int((b["common_mask"][:, 1:]).sum()), 4), -3.0, dtype=torch.float64)}
           for n, b in batches.items()}
    hp = {"K": 5} if "K" in m.defaults else {}
    objective = functools.partial(m.objective, hp=hp, lam=1.0)
    terms = within_head(logits, lambda lg: m.terms(StepInputs(logits=lg, batches=batches, ref=ref), hp), objective)
    objective(terms).backward()
    return ({k: v.detach() for k, v in terms.items()},
            {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})


@pytest.mark.parametrize("arch,name", [("gemma2", "npo"), ("cohere", "palu"), ("llama", "pd_flat")])
def test_real_model_tied_embeddings(arch, name):
    model = tiny_model(arch)
    assert output_head(model).weight is model.get_input_embeddings().weight  # tied
    want_terms, want = model_step(model, "dense", name)
    terms, got = model_step(model, "chunked", name)
    for k in terms:
        torch.testing.assert_close(terms[k], want_terms[k], rtol=RTOL, atol=ATOL)
    assert got.keys() == want.keys() and any("embed" in k for k in got)
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=1e-8, atol=1e-10, msg=k)


def test_lora_frozen_head_and_lora_on_the_head_refused():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4,
                                                                    target_modules=["q_proj", "v_proj"]))
    for p in model.parameters():  # LoRA B starts at zero: give it a value so every adapter gradient is non-zero
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    want_terms, want = model_step(model, "dense", "palu")
    terms, got = model_step(model, "chunked", "palu")
    assert got.keys() == want.keys() and got and all("lora" in k for k in got)  # the head is frozen: no dW
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=1e-8, atol=1e-10, msg=k)
    on_head = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(task_type="CAUSAL_LM", r=2,
                                                                       target_modules=["lm_head"]))
    with pytest.raises(UnsupportedHead, match="plain linear.*head_path: dense"):
        model_step(on_head, "chunked", "palu")


def test_config_validation():
    from palu_ds.config import ConfigError, load_config

    base = ["model.path=m", "data.forget.source=d", "data.retain.source=d", "method.name=grad_diff"]
    assert load_config(None, base).train.head_path == "dense"  # the default until the goals hold
    assert load_config(None, base + ["train.head_path=chunked"]).train.head_path == "chunked"
    with pytest.raises(ConfigError, match="head_path must be dense or chunked"):
        load_config(None, base + ["train.head_path=fused"])
    with pytest.raises(ConfigError, match="answer_only_logits"):
        load_config(None, base + ["train.head_path=chunked", "train.answer_only_logits=false"])
    with pytest.raises(ConfigError, match="head_chunk_elems must be >= 1"):
        load_config(None, base + ["train.head_chunk_elems=0"])


def test_terms_share_one_backward_and_an_unused_term_is_harmless():
    """Two terms on the same rows (one left out of the loss): one gradient buffer, the used term's gradients."""
    g = torch.Generator().manual_seed(4)
    head = torch.nn.Linear(D, V).double()
    answer = torch.ones(1, 9, dtype=torch.bool)
    h = torch.randn(9, D, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randint(0, V, (9,), generator=g)
    lg = chunked_logits(head, HeadSpec("x"), h, {"forget": answer}, 2 * V)["forget"]
    used = L.map_rows(lg, answer, L.row_logps, y).sum()
    L.map_rows(lg, answer, L.logit_margin_flat).sum()          # computed, never back-propagated
    used.backward()
    h2 = h.detach().clone().requires_grad_(True)
    head2 = torch.nn.Linear(D, V).double()
    head2.load_state_dict(head.state_dict())
    L.row_logps(head2(h2), y).sum().backward()
    for a, b in ((h.grad, h2.grad), (head.weight.grad, head2.weight.grad), (head.bias.grad, head2.bias.grad)):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    assert lg.chunked.jobs == []                                # the shared backward consumed what it recorded


def test_all_terms_of_a_step_run_inside_one_head_call():
    """Under ZeRO-3 a module's parameters are gathered by hooks around its call: within_head makes the whole step's
    terms one call of the head (not one per chunk or per term) -- counted here with a forward pre-hook."""
    head, _, batches, hidden0 = world()
    m = get_method("palu")
    answers = {n: b["labels"][:, 1:] != IGNORE_INDEX for n, b in batches.items() if n in m.batches}
    hidden = {n: hidden0[n].clone().requires_grad_(True) for n in answers}
    packed = torch.cat([hidden[n][:, :-1][a] for n, a in answers.items()])
    calls = []
    head.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape))
    refs = {"forget": pack_ref(hidden0["forget"] @ head.weight.detach().T, batches["forget"], K=5, k=4)}
    logits = chunked_logits(head, HeadSpec("x"), packed, answers, 2 * V)
    terms = within_head(logits, lambda lg: m.terms(StepInputs(logits=lg, batches=batches, ref=refs), {"K": 5}))
    m.objective(terms, {"K": 5}).backward()
    assert calls == [packed.shape] and len(terms) == 3 and head.weight.grad.abs().sum() > 0


def test_no_reference_cycle_keeps_a_step_alive():
    """After backward, dropping the step's objects frees its hidden rows without the cycle collector."""
    import gc
    import weakref

    gc.disable()
    try:
        head = torch.nn.Linear(D, V).double()
        h = torch.randn(6, D, dtype=torch.float64, requires_grad=True)
        packed = h * 1.0
        lg = chunked_logits(head, HeadSpec("x"), packed, {"forget": torch.ones(1, 6, dtype=torch.bool)}, V)
        L.map_rows(lg["forget"], lg["forget"].answer, L.logit_margin_flat).sum().backward()  # recomputed
        ref = weakref.ref(packed)
        del lg, packed
        assert ref() is None
        packed = h * 1.0
        lg = chunked_logits(head, HeadSpec("x"), packed, {"forget": torch.ones(1, 6, dtype=torch.bool)}, V)
        within_head(lg, lambda d: L.map_rows(d["forget"], d["forget"].answer, L.logit_margin_flat).sum()).backward()
        ref = weakref.ref(packed)                                                              # fused
        del lg, packed
        assert ref() is None
    finally:
        gc.enable()
