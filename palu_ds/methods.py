"""Method registry: what each unlearning method computes from one step's logits, and what it needs.

The registry is the only place that knows a method: a :class:`Method` declares its batches and how each is sourced,
the reference parts each batch needs, its terms, its objective and the term a dual variable constrains. The engine,
the reference cache, data building, config validation and generation, and the tests derive from it (``for m in
METHODS``); no method-specific branch lives anywhere else.

Positions (after :func:`palu_ds.batch.shift`): answer tokens = ``labels != -100``; sensitive = ``sens_mask``
(I_init); common = ``common_mask``.  Reference tensors are packed in the row-major order of ``logits_s[mask_s]``.
A reference dict holds either precomputed parts (``topk_ids``, ``kl_ids``/``kl_logps``, ``seq_logps``) or, in
resident mode, ``logits`` [B, T, V] of the reference model, from which every part is derived.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from palu_ds import losses as L
from palu_ds.batch import IGNORE_INDEX, PackedLogits, shift



@dataclass
class StepInputs:
    """One micro-batch, for :meth:`Method.terms`.

    ``normalizers[batch]`` holds *global* counts (summed over ranks) for ``answer`` (answer tokens), ``sens``
    (I_init positions), ``common`` (common positions) and ``seqs`` (sequences with >= 1 answer token); with
    them the per-rank terms add up to the full-batch terms.  ``None`` = local counts (rank-local means).
    """

    logits: dict[str, Tensor]
    batches: dict[str, dict[str, Tensor]]
    ref: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    normalizers: dict[str, dict[str, Tensor]] | None = None


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------
def _norm(x: StepInputs, batch: str, key: str):
    return None if x.normalizers is None else x.normalizers[batch][key]


def _shifted(x: StepInputs, batch: str, *mask_keys: str):
    """``(logits_s, labels_s, *masks_s)`` of one batch; masks_s are boolean and include ``labels_s != -100``."""
    b = x.batches[batch]
    logits = x.logits[batch]
    if isinstance(logits, PackedLogits):  # already shifted: only the answer positions' rows exist
        labels_s, *masks = (t[:, 1:] for t in (b["labels"], *(b[k].bool() for k in mask_keys)))
        return (logits, labels_s, logits.answer, *masks)
    logits_s, labels_s, *masks = shift(logits, b["labels"], *(b[k].bool() for k in mask_keys))
    return (logits_s, labels_s, labels_s != IGNORE_INDEX, *masks)


def _ref(x: StepInputs, batch: str, *parts: str) -> dict[str, Tensor]:
    """The batch's reference dict, checked to hold ``parts`` (or resident ``logits``)."""
    ref = x.ref.get(batch, {})
    if "logits" in ref or all(p in ref for p in parts):
        return ref
    raise KeyError(f"reference part(s) {[p for p in parts if p not in ref]} missing for batch {batch!r} "
                   f"(have {sorted(ref)}; resident mode passes 'logits' instead)")


def _ref_seq_logps(x: StepInputs, batch: str) -> Tensor:
    ref = _ref(x, batch, "seq_logps")
    if "seq_logps" in ref:
        return ref["seq_logps"]
    with torch.no_grad():
        ref_logits_s, labels_s = shift(ref["logits"], x.batches[batch]["labels"])
        return L.sequence_logps(ref_logits_s, labels_s)


def _check_rows(name: str, got: int, want: int):
    if got != want:
        raise ValueError(f"reference {name} has {got} rows but the batch selects {want} positions: "
                         "cache and batch are misaligned (example_id / mask mismatch?)")


# ----------------------------------------------------------------------------------------------------------------
# Terms (each a scalar; weights applied in the objectives below)
# ----------------------------------------------------------------------------------------------------------------
def retain_nll(x: StepInputs, hp) -> Tensor:
    """NLL on the retain batch (GradDiff/NPO/... retain loss; the constrained quantity of the dual methods)."""
    logits_s, labels_s, _ = _shifted(x, "retain")
    return L.nll_loss(logits_s, labels_s, _norm(x, "retain", "answer"))


def forget_neg_nll(x: StepInputs, hp) -> Tensor:
    """GradAscent's forget term ``-NLL(forget)`` (open-unlearning ``grad_ascent.py``)."""
    logits_s, labels_s, _ = _shifted(x, "forget")
    return -L.nll_loss(logits_s, labels_s, _norm(x, "forget", "answer"))


def palu_sensitive(x: StepInputs, hp) -> Tensor:
    """L_sens: mean over I_init of PALU's local entropy loss."""
    logits_s, _, _, sens = _shifted(x, "forget", "sens_mask")
    ref = _ref(x, "forget", "topk_ids")
    if "topk_ids" in ref:
        ids = ref["topk_ids"][:, : hp["K"]].to(logits_s.device, torch.long)   # caches may store int16/int32
    else:
        ids = L.topk_ids(ref["logits"][:, :-1][sens], hp["K"])
    _check_rows("topk_ids", ids.shape[0], int(sens.sum()))
    per = L.map_rows(logits_s, sens, partial(L.palu_local_entropy, detach_target=hp["detach_target"]), ids)
    return L.aggregate_loss(per, None, _norm(x, "forget", "sens"))


def palu_common_kl(x: StepInputs, hp) -> Tensor:
    """KL(P_theta || P_ref) (or reverse) averaged over common positions: sparse from ``kl_ids``/``kl_logps``,
    exact from resident ``logits``."""
    logits_s, _, _, common = _shifted(x, "forget", "common_mask")
    ref = _ref(x, "forget", "kl_ids", "kl_logps")
    if "kl_ids" in ref and "kl_logps" in ref:
        k = hp["kl_topk"] or ref["kl_ids"].shape[-1]
        ids, logps = ref["kl_ids"][:, :k].to(logits_s.device, torch.long), ref["kl_logps"][:, :k].to(logits_s.device)
        _check_rows("kl_ids", ids.shape[0], int(common.sum()))
        per = L.map_rows(logits_s, common, partial(L.kl_sparse, direction=hp["kl_direction"]), ids, logps)
    else:
        ref_rows = ref["logits"][:, :-1][common].to(logits_s.device)
        per = L.map_rows(logits_s, common, partial(L.kl_exact, direction=hp["kl_direction"]), ref_rows)
    return L.aggregate_loss(per, None, _norm(x, "forget", "common"))


def flat_forget(x: StepInputs, hp) -> Tensor:
    """Logit-margin flattening averaged over the forget batch's answer tokens (arXiv 2506.05314)."""
    logits_s, _, answer = _shifted(x, "forget")
    return L.aggregate_loss(L.map_rows(logits_s, answer, L.logit_margin_flat), None, _norm(x, "forget", "answer"))


def npo_forget(x: StepInputs, hp) -> Tensor:
    logits_s, labels_s, answer = _shifted(x, "forget")
    per = L.npo_loss(L.sequence_logps(logits_s, labels_s), _ref_seq_logps(x, "forget").to(logits_s.device),
                     hp["beta"])
    return L.aggregate_loss(per, answer.any(-1), _norm(x, "forget", "seqs"))


def simnpo_forget(x: StepInputs, hp) -> Tensor:
    logits_s, labels_s, answer = _shifted(x, "forget")
    per = L.simnpo_loss(L.sequence_logps(logits_s, labels_s), answer.sum(-1), hp["beta"], hp["delta"])
    return L.aggregate_loss(per, answer.any(-1), _norm(x, "forget", "seqs"))


def idk_dpo_forget(x: StepInputs, hp) -> Tensor:
    """DPO with chosen = refusal answer (``idk`` batch), rejected = forget answer, same prompts, same row order."""
    lw, yw, aw = _shifted(x, "idk")
    ll, yl, al = _shifted(x, "forget")
    per = L.dpo_loss(L.sequence_logps(lw, yw), L.sequence_logps(ll, yl),
                     _ref_seq_logps(x, "idk").to(lw.device), _ref_seq_logps(x, "forget").to(ll.device), hp["beta"])
    return L.aggregate_loss(per, aw.any(-1) & al.any(-1), _norm(x, "forget", "seqs"))


# ----------------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------------
Terms = dict[str, Tensor]
TermFn = Callable[[StepInputs, Mapping[str, Any]], Tensor]

#: per-example reference parts, in the order the cache stores them (``retain_loss`` is a scalar of the manifest)
ROW_PARTS = ("topk_ids", "kl", "seq_logps")


@dataclass(frozen=True, kw_only=True)
class Method:
    """One unlearning method, declared once; the engine, the reference cache, data building, config validation,
    config generation and the tests all derive what they do from these fields.

    ``batches``      the batches of one micro-batch, e.g. ``("forget", "retain")``, the first one the batch an
                     epoch counts; each is read from the data source ``data.<name>`` (palu_ds.config.DataConfig) ...
    ``paired``       ... except a batch named here: ``{"idk": "forget"}`` = the idk batch is not sampled; it holds
                     the same prompts as the forget batch, row for row, with its answers taken from ``data.idk``
    ``needs``        what each batch's data source is, for the error when it is missing ("a retain set")
    ``reference``    the reference parts each batch needs (``ROW_PARTS``), e.g. ``{"forget": ("seq_logps",)}``
    ``term_fns``     the named scalar terms of one micro-batch (``terms``)
    ``combine``      ``(terms, hp) -> scalar``: the primal objective
    ``constraint``   the term a dual variable keeps below epsilon (None: no dual variable): a mean NLL over the
                     answer tokens of the batch of the same name; :meth:`objective` adds ``lam * (term - eps)``
    ``defaults``     the paper hyper-parameters (read-only); ``unlearning=False`` marks plain fine-tuning (sft)
    ``peer``         the open-unlearning trainer (``configs/trainer/<peer>.yaml``) this method is timed against by
                     benchmarks/vs_open_unlearning.py, with ``peer_args`` for its ``method_args`` (None: no pair)

    Adding a method = one entry in :data:`METHODS` + its term function(s) + one test.
    """

    name: str
    batches: tuple[str, ...]
    term_fns: Mapping[str, TermFn]
    combine: Callable[[Terms, Mapping[str, Any]], Tensor]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    paired: Mapping[str, str] = field(default_factory=dict)
    needs: Mapping[str, str] = field(default_factory=dict)
    reference: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    constraint: str | None = None
    unlearning: bool = True
    peer: str | None = None
    peer_args: Mapping[str, Any] = field(default_factory=dict)
    doc: str = ""

    def __post_init__(self):
        for key in ("defaults", "paired", "needs", "reference", "peer_args"):
            object.__setattr__(self, key, MappingProxyType(dict(getattr(self, key))))
        unknown = {p for parts in self.reference.values() for p in parts} - set(ROW_PARTS)
        if unknown:
            raise ValueError(f"{self.name}: unknown reference parts {sorted(unknown)}; valid: {list(ROW_PARTS)}")
        strays = (set(self.paired) | set(self.paired.values()) | set(self.reference)) - set(self.batches)
        if strays:
            raise ValueError(f"{self.name}: batches {sorted(strays)} are not among its batches {self.batches}")
        if self.constraint is not None and not (self.constraint in self.term_fns and self.constraint in self.batches):
            raise ValueError(f"{self.name}: the constraint {self.constraint!r} must name a term and its batch")

    # ------------------------------------------------------------------ what it needs (derived)
    @property
    def epoch_batch(self) -> str:
        """The batch an epoch is counted over: the first one (the forget set, or sft's training data)."""
        return self.batches[0]

    @property
    def sampled(self) -> tuple[str, ...]:
        """The batches drawn from their own data set (each with its own sampler); the others are ``paired``."""
        return tuple(b for b in self.batches if b not in self.paired)

    @property
    def reference_parts(self) -> frozenset[str]:
        return frozenset(p for parts in self.reference.values() for p in parts)

    @property
    def is_reference_free(self) -> bool:
        return not self.reference_parts

    @property
    def uses_dual(self) -> bool:
        return self.constraint is not None

    @property
    def uses_spans(self) -> bool:
        """Whether a term reads the forget batch's sensitive-span masks (I_init / common tokens)."""
        return any(fn in SPAN_TERMS for fn in self.term_fns.values())

    @property
    def needs_retain(self) -> bool:  # for scripts that assemble command lines
        return "retain" in self.batches

    @property
    def needs_idk(self) -> bool:
        return "idk" in self.batches

    def relative_epsilon(self, hp: Mapping[str, Any]) -> bool:
        """Whether eps = (1 + a) * (the reference's loss on the constraint batch) must be measured first."""
        return self.uses_dual and hp.get("epsilon_rel") is not None

    def needed_parts(self, hp: Mapping[str, Any]) -> frozenset[str]:
        """What the reference provides for a run with ``hp``: the declared parts, plus ``retain_loss`` (the
        reference's mean answer NLL on the constraint batch) when epsilon is relative. Empty: no reference at all."""
        return self.reference_parts | ({"retain_loss"} if self.relative_epsilon(hp) else set())

    def reference_parts_for(self, batch: str) -> tuple[str, ...]:
        """The per-example reference parts of ``batch``, in :data:`ROW_PARTS` order (empty: nothing to look up)."""
        return tuple(p for p in ROW_PARTS if p in self.reference.get(batch, ()))

    # ------------------------------------------------------------------ hyper-parameters and the objective
    def _merged(self, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
        """The one merge of paper defaults and overrides (palu_ds.config.resolve and everything below use it)."""
        return {**self.defaults, **(overrides or {})}

    def hparams(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Paper defaults updated with ``overrides``; unknown keys are errors."""
        unknown = sorted(set(overrides or {}) - set(self.defaults))
        if unknown:
            raise ValueError(f"unknown hyperparameters for {self.name}: {unknown}; valid: {sorted(self.defaults)}")
        return self._merged(overrides)

    def terms(self, x: StepInputs, hp: Mapping[str, Any] | None = None) -> Terms:
        """Named scalar losses of one micro-batch (the ``constraint`` term is the one the dual variable watches)."""
        hp = self._merged(hp)
        return {k: fn(x, hp) for k, fn in self.term_fns.items()}

    def objective(self, terms: Terms, hp: Mapping[str, Any] | None = None, lam: float = 0.0,
                  epsilon: float | None = None) -> Tensor:
        """The scalar to backpropagate: ``combine(terms) + lam * (terms[constraint] - eps)`` (the Lagrangian, lam
        a coefficient, not a trained parameter), the second part only with a constraint. ``eps`` is ``epsilon``
        when given (the dual variable's, calibrated when relative), else ``hp["epsilon"]`` (0 when null): a
        constant shift that changes no gradient."""
        hp = self._merged(hp)
        out = self.combine(terms, hp)
        if self.constraint is None:
            return out
        eps = epsilon if epsilon is not None else (hp["epsilon"] if hp.get("epsilon") is not None else 0.0)
        return out + float(lam) * (terms[self.constraint] - eps)


#: terms that read sens_mask / common_mask (the data's spans)
SPAN_TERMS = frozenset({palu_sensitive, palu_common_kl})


def _forget_retain(t, hp):
    return hp["gamma"] * t["forget"] + hp["alpha"] * t["retain"]


# PALU (arXiv 2601.03190; reference code nxZhai/PALU ``palu.py`` + ``configs/trainer/PALU.yaml``):
#   gamma * L_sens + alpha * NLL(retain) + alpha * KL_common   (alpha weighs both, as in the reference code)
#   K: top-K ids of the reference (clipped to V); N: I_init = first N tokens of each span (read by the data pipeline);
#   kl_topk: reference log-probs kept per common position for the sparse KL (ours; the reference code uses the exact
#   KL with a resident reference). 256 from the measured error (BENCHMARKS.md, benchmarks/precompute_vs_resident.py:
#   2.8% at k=256 vs 10% at k=128 on the demo's trained pair; see also tests/test_losses.py).
PALU_DEFAULTS = {"gamma": 1.0, "alpha": 1.0, "K": 5000, "N": 3, "detach_target": False, "kl_topk": 256,
                 "kl_direction": "forward"}
# PDU / constrained entropic unlearning (arXiv 2506.05314), TOFU settings of the authors' run script
# (tahaEntesari/open-unlearning ``community/methods/PDU/run.sh``): pref (lambda0) 100, dual_step_size (eta) 5,
# retain_loss_eps 0.3, gamma 1.  Defaults here: one dual step per optimizer step from the retain loss of the whole
# window and all ranks, no warm-up.  open-unlearning's run takes one dual step per MICRO-batch (gradient accumulation
# 4: four steps of eta per optimizer step, lambda moves ~4x faster) after a 5-epoch warm-up; to reproduce its lambda
# trajectory set  method.params.dual_update=micro_batch method.params.dual_warmup_epochs=5  (palu_ds.dual).
DUAL_DEFAULTS = {"lambda0": 100.0, "eta_lambda": 5.0, "epsilon": 0.3, "epsilon_rel": None,
                 "dual_warmup_steps": 0, "dual_warmup_epochs": 0.0, "dual_update": "step"}

FORGET_RETAIN = ("forget", "retain")
RETAIN_SET = {"retain": "a retain set"}
PALU_TERMS = {"forget": palu_sensitive, "kl": palu_common_kl, "retain": retain_nll}
PALU_REFERENCE = {"forget": ("topk_ids", "kl")}

METHODS: dict[str, Method] = {m.name: m for m in [
    Method(name="palu", batches=FORGET_RETAIN, needs=RETAIN_SET, reference=PALU_REFERENCE, defaults=PALU_DEFAULTS,
           term_fns=PALU_TERMS,
           combine=lambda t, hp: hp["gamma"] * t["forget"] + hp["alpha"] * (t["retain"] + t["kl"]),
           peer="NPO",  # open-unlearning has no PALU: its NPO is the nearest reference-using method
           doc="PALU: local top-K flattening at I_init + KL on common tokens + retain NLL"),
    Method(name="pd_flat", batches=FORGET_RETAIN, needs=RETAIN_SET, constraint="retain",
           defaults={"gamma": 1.0, **DUAL_DEFAULTS}, term_fns={"forget": flat_forget, "retain": retain_nll},
           combine=lambda t, hp: hp["gamma"] * t["forget"],
           peer="PDU", peer_args={"retain_loss_eps": DUAL_DEFAULTS["epsilon"], "dual_warmup_epochs": 0},
           doc="logit-margin flattening under the primal-dual retain constraint (arXiv 2506.05314)"),
    Method(name="palu_pd", batches=FORGET_RETAIN, needs=RETAIN_SET, reference=PALU_REFERENCE, constraint="retain",
           defaults={**PALU_DEFAULTS, **DUAL_DEFAULTS}, term_fns=PALU_TERMS,
           combine=lambda t, hp: hp["gamma"] * t["forget"] + hp["alpha"] * t["kl"],
           doc="PALU's local loss + KL on common tokens, retain NLL as a primal-dual constraint"),
    Method(name="grad_ascent", batches=("forget",), defaults={"gamma": 1.0}, term_fns={"forget": forget_neg_nll},
           combine=lambda t, hp: hp["gamma"] * t["forget"], doc="gradient ascent on the forget answers"),
    Method(name="grad_diff", batches=FORGET_RETAIN, needs=RETAIN_SET, defaults={"gamma": 1.0, "alpha": 1.0},
           term_fns={"forget": forget_neg_nll, "retain": retain_nll}, combine=_forget_retain, peer="GradDiff",
           doc="gradient difference"),
    Method(name="npo", batches=FORGET_RETAIN, needs=RETAIN_SET, reference={"forget": ("seq_logps",)},
           defaults={"beta": 0.1, "gamma": 1.0, "alpha": 1.0}, term_fns={"forget": npo_forget, "retain": retain_nll},
           combine=_forget_retain, peer="NPO", doc="NPO + retain NLL (arXiv 2404.05868)"),
    Method(name="simnpo", batches=FORGET_RETAIN, needs=RETAIN_SET,
           defaults={"beta": 4.5, "delta": 0.0, "gamma": 0.125, "alpha": 1.0},
           term_fns={"forget": simnpo_forget, "retain": retain_nll}, combine=_forget_retain,
           doc="SimNPO + retain NLL (arXiv 2410.07163)"),
    Method(name="idk_dpo", batches=("forget", "retain", "idk"), paired={"idk": "forget"},
           needs={**RETAIN_SET, "idk": "refusal strings"},
           reference={"forget": ("seq_logps",), "idk": ("seq_logps",)},
           defaults={"beta": 0.1, "gamma": 1.0, "alpha": 1.0},
           term_fns={"forget": idk_dpo_forget, "retain": retain_nll}, combine=_forget_retain,
           doc="DPO toward refusal answers + retain NLL"),
]}


def sft_nll(x: StepInputs, hp) -> Tensor:
    """Plain fine-tuning: answer-token NLL of the training batch (named "forget": launch/finetune.py's data)."""
    logits_s, labels_s, _ = _shifted(x, "forget")
    return L.nll_loss(logits_s, labels_s, _norm(x, "forget", "answer"))


# Not an unlearning method: launch/finetune.py uses it to make the target and retain models with the same engine.
METHODS["sft"] = Method(name="sft", batches=("forget",), term_fns={"forget": sft_nll},
                        combine=lambda t, hp: t["forget"], unlearning=False,
                        doc="supervised fine-tuning (answer-token NLL)")


# The valid range of every method hyper-parameter (checked at parse time by palu_ds.config): (kind, low, high,
# whether the low end is excluded, whether null is allowed). kind: "int", "num" (int or float), "bool" or a tuple of
# allowed strings.
PARAM_RANGES: dict[str, tuple] = {
    "K": ("int", 1, None, False, True),  # null: the whole vocabulary; above the vocabulary is an error at model load
    "N": ("int", 1, None, False, True),  # null (or "all"): every token of a span is in I_init
    "kl_topk": ("int", 1, None, False, True),
    "gamma": ("num", 0, None, False, False), "alpha": ("num", 0, None, False, False),
    "beta": ("num", 0, None, True, False), "delta": ("num", None, None, False, False),
    "lambda0": ("num", 0, None, False, False), "eta_lambda": ("num", 0, None, False, False),
    "epsilon": ("num", 0, None, False, True), "epsilon_rel": ("num", -1, None, True, True),
    "dual_warmup_steps": ("int", 0, None, False, False), "dual_warmup_epochs": ("num", 0, None, False, False),
    "detach_target": ("bool", None, None, False, False), "kl_direction": (("forward", "reverse"), None, None, False,
                                                                          False),
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; valid: {sorted(METHODS)}") from None
