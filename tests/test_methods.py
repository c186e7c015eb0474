"""The method registry on a small synthetic batch: declarations, defaults, every method end to end (terms,
objective, backward), precomputed reference == resident reference, per-rank terms
with global counts adding up to the full batch, and clear errors for missing or misaligned reference parts."""

import math

import pytest
import torch

from palu_ds import losses as L
from palu_ds.batch import shift
from palu_ds.methods import METHODS, Method, StepInputs, get_method

V, D, T = 11, 4, 9


def make_batch(seed: int, B: int = 4) -> dict:
    """Prompt = first 3 tokens; answer = the rest (row 1 right-padded); I_init = first 2 answer tokens."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, V, (B, T), generator=g)
    labels = input_ids.clone()
    labels[:, :3] = -100
    attention = torch.ones(B, T, dtype=torch.long)
    labels[1, 6:], attention[1, 6:] = -100, 0
    sens = torch.zeros(B, T, dtype=torch.bool)
    sens[:, 3:5] = True
    sens &= labels != -100
    common = (labels != -100) & ~sens
    return {"example_id": torch.arange(B), "input_ids": input_ids, "attention_mask": attention, "labels": labels,
            "sens_mask": sens, "common_mask": common}


def pack_ref(ref_logits, batch, K=5, k=4, ref_hidden=None) -> dict:
    """What the precompute stores for a batch (batch.py contract), from full reference logits (and the reference's
    layer activations)."""
    ref_s, labels_s, sens, common = shift(ref_logits, batch["labels"], batch["sens_mask"], batch["common_mask"])
    lp = ref_s.log_softmax(-1)
    kl_ids = L.topk_ids(ref_s[common], k)
    answer = labels_s != -100
    ans_ids = L.target_first_topk_ids(ref_s[answer], labels_s[answer], k)
    out = {"topk_ids": L.topk_ids(ref_s[sens], K), "kl_ids": kl_ids, "kl_logps": lp[common].gather(1, kl_ids),
           "seq_logps": L.sequence_logps(ref_s, labels_s), "ans_ids": ans_ids,
           "ans_logps": lp[answer].gather(1, ans_ids)}
    if ref_hidden is not None:
        out["hidden"] = ref_hidden[batch["labels"] != -100]
    return out


def counts(batch) -> dict:
    _, labels_s, sens, common = shift(batch["labels"][..., None], batch["labels"], batch["sens_mask"],
                                      batch["common_mask"])
    answer = labels_s != -100
    return {"answer": answer.sum(), "sens": sens.sum(), "common": common.sum(), "seqs": answer.any(-1).sum()}


class World:
    """A tiny 'model': logits = hidden @ W^T + b with a trainable head; the reference is a perturbed head."""

    def __init__(self, seed=0, B=4):
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(V, D, generator=g, dtype=torch.float64, requires_grad=True)
        self.b = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True)
        self.W_ref = self.W.detach() + 0.3 * torch.randn(V, D, generator=g, dtype=torch.float64)
        self.batches = {n: make_batch(seed + i, B) for i, n in enumerate(("forget", "retain", "idk"))}
        self.hidden = {n: torch.randn(B, T, D, generator=g, dtype=torch.float64) for n in self.batches}

    def inputs(self, rows=slice(None), ref="packed", normalizers=None, **pack) -> StepInputs:
        batches = {n: {k: v[rows] for k, v in b.items()} for n, b in self.batches.items()}
        hidden = {n: h[rows] for n, h in self.hidden.items()}
        logits = {n: h @ self.W.T + self.b for n, h in hidden.items()}
        # a "decoder layer"'s activations (RMU): hidden states mixed through W, so they carry W's gradient
        layer = {n: h @ (self.W.T @ self.W) / V for n, h in hidden.items()}
        ref_layer = {n: h @ (self.W_ref.T @ self.W_ref) / V for n, h in hidden.items()}
        ref_logits = {n: (h @ self.W_ref.T + self.b.detach()) for n, h in hidden.items()}
        if ref == "packed":
            refs = {n: pack_ref(ref_logits[n], batches[n], ref_hidden=ref_layer[n], **pack) for n in ref_logits}
        elif ref == "resident":  # the reference's logits; its layer activations are packed (no logits to derive them)
            refs = {n: {"logits": r, "hidden": ref_layer[n][batches[n]["labels"] != -100]}
                    for n, r in ref_logits.items()}
        else:
            refs = ref
        return StepInputs(logits=logits, batches=batches, ref=refs, normalizers=normalizers, hidden=layer)


# ---------------------------------------------------------------------------------------------- registry
DECLARED = {  # name: (batches, reference parts, uses_dual)
    "palu": (("forget", "retain"), {"topk_ids", "kl"}, False),
    "pd_flat": (("forget", "retain"), set(), True),
    "palu_pd": (("forget", "retain"), {"topk_ids", "kl"}, True),
    "grad_ascent": (("forget",), set(), False),
    "grad_diff": (("forget", "retain"), set(), False),
    "npo": (("forget", "retain"), {"seq_logps"}, False),
    "simnpo": (("forget", "retain"), set(), False),
    "idk_dpo": (("forget", "retain", "idk"), {"seq_logps"}, False),
    "wga": (("forget", "retain"), set(), False),
    "satimp": (("forget", "retain"), set(), False),
    "undial": (("forget", "retain"), {"answer_topk"}, False),
    "rmu": (("forget", "retain"), {"hidden"}, False),
    "sft": (("forget",), set(), False),  # fine-tuning (launch/finetune.py), same engine
}


WITH_REFERENCE = sorted(name for name, m in METHODS.items() if not m.is_reference_free)


def test_registry_and_declarations():
    assert set(METHODS) == set(DECLARED)
    for name, (batches, parts, dual) in DECLARED.items():
        m = get_method(name)
        assert (m.name, m.batches, set(m.reference_parts), m.uses_dual) == (name, batches, parts, dual)
        assert m.is_reference_free == (not parts)
    with pytest.raises(ValueError, match="palu.*pd_flat|pd_flat.*palu"):
        get_method("palu2")
    with pytest.raises(ValueError, match="unknown hyperparameters.*'K2'"):
        get_method("palu").hparams({"K2": 3})
    with pytest.raises(TypeError):
        get_method("palu").defaults["K"] = 3                 # defaults are read-only


def test_what_each_method_declares_and_what_derives_from_it():
    """The sourcing of each batch, the constraint term, the reference parts per batch, and the parts a run needs
    (plus the reference's retain loss when epsilon is relative) all come from the one registry entry."""
    idk = get_method("idk_dpo")
    assert dict(idk.paired) == {"idk": "forget"} and idk.sampled == ("forget", "retain")
    assert idk.reference_parts_for("forget") == idk.reference_parts_for("idk") == ("seq_logps",)
    assert idk.reference_parts_for("retain") == () and idk.needs["idk"] == "refusal strings"
    palu = get_method("palu")
    assert palu.reference_parts_for("forget") == ("topk_ids", "kl") and palu.epoch_batch == "forget"
    for name, m in METHODS.items():
        assert m.constraint == ("retain" if m.uses_dual else None), name
        assert m.needed_parts(m.hparams()) == m.reference_parts
        assert m.unlearning == (name != "sft")
    pd = get_method("pd_flat")
    assert pd.needed_parts(pd.hparams({"epsilon": None, "epsilon_rel": 0.1})) == {"retain_loss"}
    assert get_method("palu").needed_parts({"epsilon_rel": 0.1}) == {"topk_ids", "kl"}  # no constraint: no loss
    ok = dict(name="x", batches=("forget", "retain"), term_fns={"retain": lambda x, hp: 0}, combine=lambda t, hp: 0)
    with pytest.raises(ValueError, match="unknown reference parts"):
        Method(**ok, reference={"forget": ("logits",)})
    with pytest.raises(ValueError, match="not among its batches"):
        Method(**ok, paired={"idk": "forget"})
    with pytest.raises(ValueError, match="constraint"):
        Method(**ok, constraint="kl")
    with pytest.raises(TypeError):
        Method("x", ("forget",), {}, lambda t, hp: 0)                # keyword arguments only


def test_objective_adds_the_constraint_with_the_given_epsilon():
    """lam * (terms[constraint] - eps): eps from the dual variable when given (the engine's calibrated one), else
    hp["epsilon"] (0 when null); no constraint: lam is ignored."""
    t = {"forget": torch.tensor(2.0), "retain": torch.tensor(3.0)}
    pd = get_method("pd_flat")
    assert pd.objective(t, {}, lam=4.0, epsilon=1.0).item() == pytest.approx(2 + 4 * (3 - 1))
    assert pd.objective(t, {"epsilon": None, "epsilon_rel": 0.5}, lam=4.0).item() == pytest.approx(2 + 4 * 3)
    assert get_method("grad_diff").objective(t, {}, lam=4.0, epsilon=1.0).item() == pytest.approx(2 + 3)


def test_paper_defaults():
    assert {k: get_method("palu").defaults[k] for k in ("gamma", "alpha", "K", "N", "detach_target", "kl_direction")} \
        == {"gamma": 1.0, "alpha": 1.0, "K": 5000, "N": 3, "detach_target": False, "kl_direction": "forward"}
    for name in ("pd_flat", "palu_pd"):
        d = get_method(name).defaults
        assert (d["lambda0"], d["eta_lambda"], d["epsilon"], d["epsilon_rel"]) == (100.0, 5.0, 0.3, None)
    assert get_method("npo").defaults["beta"] == 0.1 and get_method("idk_dpo").defaults["beta"] == 0.1
    assert {k: get_method("simnpo").defaults[k] for k in ("beta", "delta", "gamma", "alpha")} == \
        {"beta": 4.5, "delta": 0.0, "gamma": 0.125, "alpha": 1.0}
    assert get_method("palu").hparams({"K": 7})["K"] == 7 and get_method("palu").defaults["kl_topk"] == 256


# ---------------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("name", sorted(DECLARED))
def test_every_method_terms_objective_backward(name):
    m, w = get_method(name), World()
    x = w.inputs(K=5)
    terms = m.terms(x, {"K": 5})
    expect = ({"forget"} | ({"retain"} if "retain" in m.batches else set())
              | ({"kl"} if "kl" in m.reference_parts else set()))
    assert set(terms) == expect
    assert all(t.dim() == 0 and torch.isfinite(t) for t in terms.values())
    loss = m.objective(terms, {}, lam=2.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(w.W.grad).all() and w.W.grad.abs().sum() > 0


def test_baseline_terms_match_the_losses():
    w = World()
    x = w.inputs()
    f_s, f_y = shift(x.logits["forget"], x.batches["forget"]["labels"])
    r_s, r_y = shift(x.logits["retain"], x.batches["retain"]["labels"])
    t = get_method("grad_diff").terms(x)
    assert torch.allclose(t["forget"], -L.nll_loss(f_s, f_y)) and torch.allclose(t["retain"], L.nll_loss(r_s, r_y))
    npo = get_method("npo").terms(x)["forget"]
    assert torch.allclose(npo, L.npo_loss(L.sequence_logps(f_s, f_y), x.ref["forget"]["seq_logps"], 0.1).mean())
    flat = get_method("pd_flat").terms(x)["forget"]
    assert torch.allclose(flat, L.logit_margin_flat(f_s[f_y != -100]).mean())


def test_objectives_combine_terms_with_weights_and_lambda():
    t = {k: torch.tensor(v, requires_grad=True) for k, v in {"forget": 2.0, "retain": 3.0, "kl": 5.0}.items()}
    obj = lambda name, hp=None, lam=0.0: get_method(name).objective(t, hp, lam).item()
    assert obj("palu", {"gamma": 2.0, "alpha": 0.5}) == pytest.approx(2 * 2 + 0.5 * (3 + 5))
    assert obj("pd_flat", {}, lam=4.0) == pytest.approx(2 + 4 * (3 - 0.3))
    assert obj("palu_pd", {"alpha": 0.5, "epsilon": 1.0}, lam=4.0) == pytest.approx(2 + 0.5 * 5 + 4 * (3 - 1))
    assert obj("grad_ascent", {"gamma": 3.0}) == pytest.approx(6.0)
    assert obj("simnpo") == pytest.approx(0.125 * 2 + 3)
    get_method("pd_flat").objective(t, {}, 7.0).backward()
    assert t["retain"].grad.item() == pytest.approx(7.0)    # lambda is a coefficient, not a trained parameter


# ---------------------------------------------------------------------------------------------- equivalences
def test_precomputed_reference_equals_resident_reference():
    """Packed parts (kl_topk = V: sparse KL is then exact) give the same terms as the resident reference logits."""
    w = World()
    for name in WITH_REFERENCE:
        m = get_method(name)
        packed = m.terms(w.inputs(K=5, k=V), {"K": 5})
        resident = m.terms(w.inputs(ref="resident"), {"K": 5})
        for key in packed:
            assert torch.allclose(packed[key], resident[key], rtol=1e-9, atol=1e-10), (name, key)
    m = get_method("palu")
    exact = m.terms(w.inputs(ref="resident"), {"K": 5})
    # ids stored compactly (the cache's int16/int32) work too
    x = w.inputs(K=5, k=V)
    x.ref["forget"] = {k: v.int() if k.endswith("ids") else v for k, v in x.ref["forget"].items()}
    small = m.terms(x, {"K": 5})
    assert torch.allclose(small["kl"], exact["kl"]) and torch.allclose(small["forget"], exact["forget"])
    # a shorter kl_topk slices the stored ids: sparse KL != exact
    assert not torch.allclose(m.terms(w.inputs(K=5, k=V), {"K": 5, "kl_topk": 2})["kl"], exact["kl"])


@pytest.mark.parametrize("name", sorted(METHODS))
def test_terms_split_across_two_ranks_add_up_with_global_counts(name):
    m, w = get_method(name), World(B=5)
    full = m.terms(w.inputs(K=5), {"K": 5})
    norms = {n: counts(b) for n, b in w.batches.items()}
    parts = [m.terms(w.inputs(rows, normalizers=norms, K=5), {"K": 5}) for rows in (slice(0, 2), slice(2, 5))]
    for key in full:
        assert torch.allclose(parts[0][key] + parts[1][key], full[key], rtol=1e-9, atol=1e-10), key


# ---------------------------------------------------------------------------------------------- errors
def test_missing_reference_parts_raise_clear_errors():
    w = World()
    with pytest.raises(KeyError, match="topk_ids"):
        get_method("palu").terms(w.inputs(ref={}))
    x = w.inputs()
    del x.ref["forget"]["kl_logps"]
    with pytest.raises(KeyError, match="kl_logps"):
        get_method("palu").terms(x, {"K": 5})
    with pytest.raises(KeyError, match="seq_logps.*'forget'"):
        get_method("npo").terms(w.inputs(ref={"forget": {"topk_ids": torch.zeros(1, 1)}}))
    x = w.inputs()
    del x.ref["idk"]
    with pytest.raises(KeyError, match="'idk'"):
        get_method("idk_dpo").terms(x)
    assert get_method("simnpo").terms(w.inputs(ref={}))["forget"].isfinite()   # reference-free


def test_misaligned_reference_raises():
    w = World()
    x = w.inputs(K=5)
    x.ref["forget"]["topk_ids"] = x.ref["forget"]["topk_ids"][1:]
    with pytest.raises(ValueError, match="misaligned"):
        get_method("palu").terms(x, {"K": 5})


def test_palu_sensitive_hand_value_through_the_method():
    """One sequence, one I_init position: the method's forget term is the docstring example (4.5)."""
    labels = torch.tensor([[-100, 7, 8]])
    batch = {"labels": labels, "sens_mask": torch.tensor([[False, True, False]]),
             "common_mask": torch.tensor([[False, False, True]])}
    logits = torch.zeros(1, 3, 4)
    logits[0, 0] = torch.tensor([1.0, 2.0, 3.0, 6.0])       # the logit predicting token 1 (in I_init)
    ref = {"topk_ids": torch.tensor([[3, 2]]), "kl_ids": torch.tensor([[0]]), "kl_logps": torch.tensor([[math.log(.25)]])}
    x = StepInputs(logits={"forget": logits}, batches={"forget": batch}, ref={"forget": ref})
    m = get_method("palu")
    assert m.term_fns["forget"](x, m.hparams()).item() == pytest.approx(4.5)
    assert m.term_fns["kl"](x, m.hparams()).item() == pytest.approx(0.0, abs=1e-7)   # uniform vs uniform


@pytest.mark.parametrize("name", sorted(METHODS))
def test_packed_answer_logits_give_the_same_terms_and_gradients(name):
    """The engine's PackedLogits (LM head only at answer positions) == dense [B, T, V] logits, values and grads."""
    from palu_ds.batch import PackedLogits

    m = get_method(name)
    w = World(3)
    dense = w.inputs(K=5, k=4)
    packed_logits = {}
    for n, lg in dense.logits.items():
        answer = dense.batches[n]["labels"][:, 1:] != -100
        packed_logits[n] = PackedLogits(lg[:, :-1][answer], answer)
    packed = StepInputs(logits=packed_logits, batches=dense.batches, ref=dense.ref, hidden=dense.hidden)
    a, b = m.terms(dense), m.terms(packed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-12, atol=1e-12)
    ga = torch.autograd.grad(m.objective(a, lam=2.0), w.W, retain_graph=True)[0]
    gb = torch.autograd.grad(m.objective(b, lam=2.0), w.W)[0]
    torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-12)


def test_packed_logits_refuse_positions_without_labels():
    from palu_ds.batch import PackedLogits

    answer = torch.tensor([[False, True, True]])
    p = PackedLogits(torch.randn(2, 5), answer)
    assert p[torch.tensor([[False, False, True]])].shape == (1, 5)
    with pytest.raises(ValueError, match="without an answer label"):
        p[torch.tensor([[True, False, False]])]


def test_every_hyper_parameter_declares_its_range_and_config_checks_it():
    """A parameter is a Param (default + range) or the Method is refused at construction; palu_ds.config checks a
    given value against the range the method declares."""
    from palu_ds.config import ConfigError, load_config
    from palu_ds.methods import Param

    for m in METHODS.values():
        assert all(isinstance(p, Param) for p in m.params.values()), m.name
    ok = dict(name="x", batches=("forget",), term_fns={"forget": lambda x, hp: 0}, combine=lambda t, hp: 0)
    with pytest.raises(ValueError, match=r"\['tau'\] declared without a range"):
        Method(**ok, params={"tau": 0.5})
    assert Method(**ok, params={"tau": Param(0.5, "num", 0, 1)}).defaults == {"tau": 0.5}
    base = ["model.path=m", "data.forget.source=f", "reference.mode=none"]
    for over, msg in ((["method.name=simnpo", "data.retain.source=r", "method.params.beta=0"], "beta must be > 0"),
                      (["method.name=pd_flat", "data.retain.source=r", "method.params.dual_update=epoch"],
                       r"dual_update must be one of \['step', 'micro_batch'\]")):
        with pytest.raises(ConfigError, match=msg):
            load_config(None, base + over)


def test_family_and_reference_key_come_from_the_registry():
    """The lr family defaults to the method's own name; the reference key holds the parts per batch, the hyper-
    parameters the parts record (REFERENCE_PARTS' key fields) and N when a part follows the spans."""
    from palu_ds.methods import REFERENCE_PARTS, Param, RefPart

    assert get_method("palu").family == get_method("pd_flat").family == "entropy"
    ok = dict(name="x", batches=("forget",), term_fns={"forget": lambda x, hp: 0}, combine=lambda t, hp: 0)
    assert Method(**ok).family == "x"
    palu = get_method("palu")
    assert palu.reference_key(palu.hparams({"K": 7})) == {"batches": ["forget", "retain"],
                                                           "parts": {"forget": ["topk_ids", "kl"]}, "K": 7,
                                                           "kl_topk": 256, "N": 3}
    assert palu.reference_key(palu.defaults) == get_method("palu_pd").reference_key(get_method("palu_pd").defaults)
    assert get_method("idk_dpo").reference_key({})["parts"] == {"forget": ["seq_logps"], "idk": ["seq_logps"]}
    assert get_method("grad_diff").reference_key({}) == {}
    assert set(REFERENCE_PARTS) == {p for m in METHODS.values() for p in m.reference_parts}
    rmu, undial = get_method("rmu"), get_method("undial")  # the layer keys RMU's hidden part; no spans, no N
    assert rmu.reference_key(rmu.hparams({"layer": 3})) == {"batches": ["forget", "retain"],
                                                            "parts": {"retain": ["hidden"]}, "layer": 3}
    assert undial.reference_key(undial.defaults) == {"batches": ["forget", "retain"],
                                                     "parts": {"forget": ["answer_topk"]}, "kl_topk": 256}
    hidden_part = dict(ok, reference={"forget": ("hidden",)}, params={"layer": Param(0, "int")})
    with pytest.raises(ValueError, match="needs hidden_layer"):
        Method(**hidden_part)
    with pytest.raises(ValueError, match=r"record hyper-parameter\(s\) \['kl_topk'\] it does not declare"):
        Method(**dict(ok, reference={"forget": ("answer_topk",)}))
    with pytest.raises(ValueError, match="a layer's hidden states .unshifted. follow tokens"):
        RefPart(rows="answer", tensors={"h": "values"}, compute=lambda *a: {}, source="hidden")
