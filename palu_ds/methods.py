"""Method registry: what each unlearning method computes from one step's logits, and what it needs.

The registry is the only place that knows a method: a :class:`Method` declares its batches and how each is sourced,
the reference parts each batch needs, its terms, its objective and the term a dual variable constrains. The engine,
the reference cache, data building, config validation and generation, and the tests derive from it (``for m in
METHODS``); no method-specific branch lives anywhere else.

Positions (after :func:`palu_ds.batch.shift`): answer tokens = ``labels != -100``; sensitive = ``sens_mask``
(I_init); common = ``common_mask``.  Reference tensors are packed in the row-major order of ``logits_s[mask_s]``.
A reference dict holds either precomputed parts (``topk_ids``, ``kl_ids``/``kl_logps``, ``seq_logps``,
``ans_ids``/``ans_logps``, ``hidden``) or, in resident mode, ``logits`` [B, T, V] of the reference model, from which
every logits part is derived.
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
    ``hidden[batch]``: the policy's hidden states [B, T, D] at the output of the decoder layer a method names
    (:attr:`Method.hidden_layer`; RMU), empty for the others.
    """

    logits: dict[str, Tensor]
    batches: dict[str, dict[str, Tensor]]
    ref: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    normalizers: dict[str, dict[str, Tensor]] | None = None
    hidden: dict[str, Tensor] = field(default_factory=dict)


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


def wga_forget(x: StepInputs, hp) -> Tensor:
    """WGA: each forget answer token's log-prob weighted by its own (detached) probability to the power beta."""
    logits_s, labels_s, answer = _shifted(x, "forget")
    per = L.wga_loss(L.token_logps(logits_s, labels_s), hp["beta"])
    return L.aggregate_loss(per, answer, _norm(x, "forget", "answer"))


def satimp_forget(x: StepInputs, hp) -> Tensor:
    """SatImp: as WGA with the weight ``p^beta1 (1 - p)^beta2``."""
    logits_s, labels_s, answer = _shifted(x, "forget")
    per = L.satimp_loss(L.token_logps(logits_s, labels_s), hp["beta1"], hp["beta2"])
    return L.aggregate_loss(per, answer, _norm(x, "forget", "answer"))


def undial_forget(x: StepInputs, hp) -> Tensor:
    """UNDIAL: cross-entropy to the reference's distribution with the answer token's logit lowered by beta, at every
    forget answer token; from ``ans_ids``/``ans_logps`` (the target first, then the reference's top kl_topk - 1),
    or exact from resident ``logits``."""
    logits_s, labels_s, answer = _shifted(x, "forget")
    ref = _ref(x, "forget", "ans_ids", "ans_logps")
    targets = labels_s[answer].to(logits_s.device)
    if "ans_ids" in ref and "ans_logps" in ref:
        k = hp["kl_topk"] or ref["ans_ids"].shape[-1]
        ids = ref["ans_ids"][:, :k].to(logits_s.device, torch.long)
        logps = ref["ans_logps"][:, :k].to(logits_s.device)
    else:
        with torch.no_grad():
            logps = ref["logits"][:, :-1][answer].to(logits_s.device).log_softmax(-1)
        ids = torch.arange(logps.shape[-1], device=logps.device).expand(logps.shape)
    _check_rows("ans_ids", ids.shape[0], int(answer.sum()))
    per = L.map_rows(logits_s, answer, partial(L.undial_loss, beta=hp["beta"]), targets, ids, logps)
    return L.aggregate_loss(per, None, _norm(x, "forget", "answer"))


def _sequence_mean(per: Tensor, mask: Tensor, normalizer) -> Tensor:
    """Mean over sequences of each sequence's mean of ``per`` (packed over ``mask`` [B, T]) -- RMU's reduction."""
    dense = torch.zeros(mask.shape, dtype=per.dtype, device=per.device).masked_scatter(mask, per)
    seq = dense.sum(-1) / mask.sum(-1).clamp(min=1).to(per.dtype)
    return L.aggregate_loss(seq, mask.any(-1), normalizer)


def _layer_hidden(x: StepInputs, batch: str) -> tuple[Tensor, Tensor]:
    """The policy's hidden states of the method's layer at the batch's answer tokens (labels != -100, unshifted: the
    tokens' own positions, as open-unlearning's RMU), packed [N, D], and that mask [B, T]."""
    if batch not in x.hidden:
        raise KeyError(f"no hidden states for batch {batch!r}: the engine captures them for a method that declares "
                       f"hidden_layer (have {sorted(x.hidden)})")
    h = x.hidden[batch]
    mask = (x.batches[batch]["labels"] != IGNORE_INDEX).to(h.device)
    return h[mask], mask


def rmu_forget(x: StepInputs, hp) -> Tensor:
    """RMU forget term: the layer's hidden states at the forget answer tokens pulled to the control vector."""
    h, mask = _layer_hidden(x, "forget")
    c = L.rmu_control_vector(h.shape[-1], hp["steering_coeff"], hp["control_seed"]).to(h.device)
    return _sequence_mean(L.rmu_distance(h, c), mask, _norm(x, "forget", "seqs"))


def rmu_retain(x: StepInputs, hp) -> Tensor:
    """RMU retain term: the layer's hidden states at the retain answer tokens kept at the frozen reference's (the
    precomputed ``hidden`` part, the same layer and tokens)."""
    h, mask = _layer_hidden(x, "retain")
    target = _ref(x, "retain", "hidden")["hidden"].to(h.device)
    _check_rows("hidden", target.shape[0], h.shape[0])
    return _sequence_mean(L.rmu_distance(h, target), mask, _norm(x, "retain", "seqs"))


# ----------------------------------------------------------------------------------------------------------------
# Reference parts and hyper-parameters
# ----------------------------------------------------------------------------------------------------------------
Terms = dict[str, Tensor]
TermFn = Callable[[StepInputs, Mapping[str, Any]], Tensor]


def _topk_part(lg, labels, rows, sizes):
    return {"topk_ids": L.topk_ids(lg[rows], sizes["K"])}


def _kl_part(lg, labels, rows, sizes):
    logps = torch.log_softmax(lg[rows].float(), dim=-1)
    ids = L.topk_ids(logps, sizes["kl_topk"])
    return {"kl_ids": ids, "kl_logps": logps.gather(-1, ids)}


def _seq_part(lg, labels, rows, sizes):
    return {"seq_logps": L.sequence_logps(lg, labels)}


def _answer_topk_part(lg, labels, rows, sizes):
    """UNDIAL: the target first (its logit is lowered), then the reference's top k-1 others, with their log-probs."""
    logps = torch.log_softmax(lg[rows].float(), dim=-1)
    ids = L.target_first_topk_ids(logps, labels[rows], sizes["kl_topk"])
    return {"ans_ids": ids, "ans_logps": logps.gather(-1, ids)}


def _hidden_part(hidden, labels, rows, sizes):
    """RMU: the reference's hidden states of the method's layer at the answer tokens."""
    return {"hidden": hidden[rows]}


#: what a part's rows follow (:attr:`RefPart.rows`, :func:`row_mask`); the first three are positions after the shift
ROWS = ("sens_mask", "common_mask", "answer", "tokens")
#: the row masks that follow the data's spans (``data.n_init``)
SPAN_ROWS = ("sens_mask", "common_mask")


def row_mask(batch: Mapping[str, Tensor], rows: str) -> Tensor:
    """The positions of a batch a part's rows follow (boolean): ``sens_mask`` / ``common_mask`` (I_init / common
    tokens) and ``answer`` (every answer token) at the logits that predict them ([B, T-1], after the shift);
    ``tokens``: the answer tokens themselves ([B, T], unshifted: where a layer's hidden states are read)."""
    if rows not in ROWS:
        raise ValueError(f"unknown row mask {rows!r}; valid: {ROWS}")
    if rows in SPAN_ROWS:
        return batch[rows][:, 1:].bool()
    answer = batch["labels"] != IGNORE_INDEX
    return answer if rows == "tokens" else answer[:, 1:]


@dataclass(frozen=True)
class RefPart:
    """One per-example part of the reference that the cache stores and the loop looks up (:data:`REFERENCE_PARTS`).

    ``rows``     the row mask its rows follow (:func:`row_mask`: ``sens_mask`` I_init positions, ``common_mask``
                 common positions, ``answer`` every answer position, ``tokens`` the answer tokens themselves; None:
                 one row per sequence); a part on ``sens_mask`` / ``common_mask`` depends on the data's spans
    ``tensors``  each stored tensor and its storage kind: ``ids`` (int16/int32 by vocabulary), ``values``
                 (``reference.dtype``), ``float32``
    ``compute``  ``(source, labels, row mask or None, sizes) -> {tensor: rows}``, the math of palu_ds.losses;
                 ``sizes`` = ``{"K": K, "kl_topk": k}`` clipped to the vocabulary
    ``key``      cache-key field -> the hyper-parameter it records (the cache is refused when it differs)
    ``source``   what ``compute`` reads: ``logits`` (the reference's shifted logits [B, T-1, V] and shifted labels)
                 or ``hidden`` (its hidden states [B, T, D] at the output of the method's decoder layer,
                 :attr:`Method.hidden_layer`, and the unshifted labels; rows ``tokens``)
    """

    rows: str | None
    tensors: Mapping[str, str]
    compute: Callable[..., dict[str, Tensor]]
    key: Mapping[str, str] = field(default_factory=dict)
    source: str = "logits"

    def __post_init__(self):
        if self.rows is not None and self.rows not in ROWS:
            raise ValueError(f"unknown row mask {self.rows!r}; valid: {ROWS}")
        if self.source not in ("logits", "hidden") or (self.source == "hidden") != (self.rows == "tokens"):
            raise ValueError(f"source {self.source!r} with rows {self.rows!r}: logits (shifted) follow sens_mask / "
                             "common_mask / answer / None, a layer's hidden states (unshifted) follow tokens")

    @property
    def spans(self) -> bool:
        """Whether its rows follow the data's spans (then the cache depends on ``data.n_init``)."""
        return self.rows in SPAN_ROWS


#: THE table of per-example reference parts, in the order the cache stores them; palu_ds.reference's compute, readers
#: and key iterate over it (``retain_loss``, a scalar of the manifest, is not a row part). A new part = one entry.
REFERENCE_PARTS: Mapping[str, RefPart] = MappingProxyType({
    "topk_ids": RefPart(rows="sens_mask", tensors={"topk_ids": "ids"}, compute=_topk_part, key={"K": "K"}),
    "kl": RefPart(rows="common_mask", tensors={"kl_ids": "ids", "kl_logps": "values"}, compute=_kl_part,
                  key={"k": "kl_topk"}),
    "seq_logps": RefPart(rows=None, tensors={"seq_logps": "float32"}, compute=_seq_part),
    "answer_topk": RefPart(rows="answer", tensors={"ans_ids": "ids", "ans_logps": "values"}, compute=_answer_topk_part,
                           key={"k": "kl_topk"}),
    "hidden": RefPart(rows="tokens", tensors={"hidden": "values"}, compute=_hidden_part, key={"layer": "layer"},
                      source="hidden"),
})


@dataclass(frozen=True)
class Param:
    """One hyper-parameter of a method: its paper default and its valid range, checked at parse time
    (palu_ds.config). ``kind``: ``"int"``, ``"num"`` (int or float), ``"bool"`` or a tuple of allowed strings;
    ``low`` / ``high`` bounds (None: unbounded), ``open_low``: the low end excluded; ``nullable``: null allowed."""

    default: Any
    kind: str | tuple = "num"
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    nullable: bool = False

    @property
    def rule(self) -> tuple:
        """``(kind, low, high, open_low, nullable)``, the form of palu_ds.config's range checks."""
        return (self.kind, self.low, self.high, self.open_low, self.nullable)


def weight(default: float) -> Param:
    """A non-negative loss weight (gamma, alpha)."""
    return Param(default, "num", 0)


@dataclass(frozen=True, kw_only=True)
class Method:
    """One unlearning method, declared once; the engine, the reference cache, data building, config validation,
    config generation and the tests all derive what they do from these fields.

    ``batches``      the batches of one micro-batch, e.g. ``("forget", "retain")``, the first one the batch an
                     epoch counts; each is read from the data source ``data.<name>`` (palu_ds.config.DataConfig) ...
    ``paired``       ... except a batch named here: ``{"idk": "forget"}`` = the idk batch is not sampled; it holds
                     the same prompts as the forget batch, row for row, with its answers taken from ``data.idk``
    ``needs``        what each batch's data source is, for the error when it is missing ("a retain set")
    ``reference``    the reference parts each batch needs (:data:`REFERENCE_PARTS`), e.g. ``{"forget": ("seq_logps",)}``
    ``term_fns``     the named scalar terms of one micro-batch (``terms``)
    ``combine``      ``(terms, hp) -> scalar``: the primal objective
    ``constraint``   the term a dual variable keeps below epsilon (None: no dual variable): a mean NLL over the
                     answer tokens of the batch of the same name; :meth:`objective` adds ``lam * (term - eps)``
    ``params``       each hyper-parameter's paper default and valid range (:class:`Param`; a bare value is an
                     error: every parameter is range-checked); ``defaults`` derives from it (read-only)
    ``family``       the learning-rate group it shares in benchmarks (methods of one loss family; default: its own
                     name); ``unlearning=False`` marks plain fine-tuning (sft)
    ``hidden_layer`` the hyper-parameter holding the index of the decoder layer whose output the terms read
                     (``StepInputs.hidden``; a reference part of source ``hidden`` is of the same layer); None: none
    ``peer``         the open-unlearning trainer (``configs/trainer/<peer>.yaml``) this method is timed against by
                     benchmarks/vs_open_unlearning.py, with ``peer_args`` for its ``method_args`` (None: no pair)

    Adding a method = one entry in :data:`METHODS` + its term function(s) + one test.
    """

    name: str
    batches: tuple[str, ...]
    term_fns: Mapping[str, TermFn]
    combine: Callable[[Terms, Mapping[str, Any]], Tensor]
    params: Mapping[str, Param] = field(default_factory=dict)
    family: str = ""
    paired: Mapping[str, str] = field(default_factory=dict)
    needs: Mapping[str, str] = field(default_factory=dict)
    reference: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    constraint: str | None = None
    hidden_layer: str | None = None
    unlearning: bool = True
    peer: str | None = None
    peer_args: Mapping[str, Any] = field(default_factory=dict)
    doc: str = ""

    def __post_init__(self):
        for key in ("params", "paired", "needs", "reference", "peer_args"):
            object.__setattr__(self, key, MappingProxyType(dict(getattr(self, key))))
        object.__setattr__(self, "family", self.family or self.name)
        bare = sorted(k for k, p in self.params.items() if not isinstance(p, Param))
        if bare:
            raise ValueError(f"{self.name}: hyper-parameter(s) {bare} declared without a range: give each a "
                             "Param(default, kind, low, high, ...) (palu_ds.methods.Param)")
        unknown = {p for parts in self.reference.values() for p in parts} - set(REFERENCE_PARTS)
        if unknown:
            raise ValueError(f"{self.name}: unknown reference parts {sorted(unknown)}; valid: {list(REFERENCE_PARTS)}")
        strays = (set(self.paired) | set(self.paired.values()) | set(self.reference)) - set(self.batches)
        if strays:
            raise ValueError(f"{self.name}: batches {sorted(strays)} are not among its batches {self.batches}")
        if self.constraint is not None and not (self.constraint in self.term_fns and self.constraint in self.batches):
            raise ValueError(f"{self.name}: the constraint {self.constraint!r} must name a term and its batch")
        if self.hidden_layer is not None and self.hidden_layer not in self.params:
            raise ValueError(f"{self.name}: hidden_layer {self.hidden_layer!r} must name a hyper-parameter")
        parts = [REFERENCE_PARTS[p] for p in self.reference_parts]
        if self.hidden_layer is None and any(part.source == "hidden" for part in parts):
            raise ValueError(f"{self.name}: a reference part of a layer's hidden states needs hidden_layer")
        unkeyed = sorted({h for part in parts for h in part.key.values()} - set(self.params))
        if unkeyed:
            raise ValueError(f"{self.name}: its reference parts record hyper-parameter(s) {unkeyed} it does not "
                             "declare")

    # ------------------------------------------------------------------ what it needs (derived)
    @property
    def defaults(self) -> Mapping[str, Any]:
        """The paper hyper-parameters (read-only), from :attr:`params`."""
        return MappingProxyType({k: p.default for k, p in self.params.items()})

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

    def layer(self, hp: Mapping[str, Any]) -> int | None:
        """The decoder layer whose hidden states the terms read (None: the method reads none)."""
        return None if self.hidden_layer is None else int(self._merged(hp)[self.hidden_layer])

    def relative_epsilon(self, hp: Mapping[str, Any]) -> bool:
        """Whether eps = (1 + a) * (the reference's loss on the constraint batch) must be measured first."""
        return self.uses_dual and hp.get("epsilon_rel") is not None

    def needed_parts(self, hp: Mapping[str, Any]) -> frozenset[str]:
        """What the reference provides for a run with ``hp``: the declared parts, plus ``retain_loss`` (the
        reference's mean answer NLL on the constraint batch) when epsilon is relative. Empty: no reference at all."""
        return self.reference_parts | ({"retain_loss"} if self.relative_epsilon(hp) else set())

    def reference_parts_for(self, batch: str) -> tuple[str, ...]:
        """The per-example reference parts of ``batch``, in :data:`REFERENCE_PARTS` order (empty: nothing to look
        up)."""
        return tuple(p for p in REFERENCE_PARTS if p in self.reference.get(batch, ()))

    def reference_key(self, hp: Mapping[str, Any]) -> dict[str, Any]:
        """What a reference cache of a run with ``hp`` depends on besides the model and the data: its batches (the
        cache key fingerprints each one's data), the parts of each, the hyper-parameters that key them
        (:attr:`RefPart.key`) and ``N`` (the I_init length) when a part follows the spans. Two runs with equal keys
        (and model and data) can share one cache; ``{}``: none needed.

        >>> get_method("palu").reference_key({**get_method("palu").defaults, "K": 7})
        {'batches': ['forget', 'retain'], 'parts': {'forget': ['topk_ids', 'kl']}, 'K': 7, 'kl_topk': 256, 'N': 3}
        """
        want = self.needed_parts(hp)
        if not want:
            return {}
        key: dict[str, Any] = {"batches": list(self.batches),
                               "parts": {b: list(self.reference_parts_for(b)) for b in self.batches
                                         if self.reference_parts_for(b)}}
        if "retain_loss" in want:
            key["retain_loss"] = self.constraint
        parts = [part for p, part in REFERENCE_PARTS.items() if p in self.reference_parts]
        for part in parts:
            key.update({h: hp.get(h) for h in part.key.values()})
        if any(part.spans for part in parts) and "N" in self.params:
            key["N"] = hp.get("N")
        return key

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
#   K: top-K ids of the reference (clipped to V; null: the whole vocabulary; above the vocabulary of the model is an
#   error at model load); N: I_init = first N tokens of each span (read by the data pipeline; null or "all": every
#   token of a span); kl_topk: reference log-probs kept per common position for the sparse KL (ours; the reference
#   code uses the exact KL with a resident reference). 256 from the measured error (BENCHMARKS.md,
#   benchmarks/precompute_vs_resident.py: 2.8% at k=256 vs 10% at k=128 on the demo's trained pair; see also
#   tests/test_losses.py).
PALU_PARAMS = {"gamma": weight(1.0), "alpha": weight(1.0), "K": Param(5000, "int", 1, nullable=True),
               "N": Param(3, "int", 1, nullable=True), "detach_target": Param(False, "bool"),
               "kl_topk": Param(256, "int", 1, nullable=True),
               "kl_direction": Param("forward", ("forward", "reverse"))}
# PDU / constrained entropic unlearning (arXiv 2506.05314), TOFU settings of the authors' run script
# (tahaEntesari/open-unlearning ``community/methods/PDU/run.sh``): pref (lambda0) 100, dual_step_size (eta) 5,
# retain_loss_eps 0.3, gamma 1.  Defaults here: one dual step per optimizer step from the retain loss of the whole
# window and all ranks, no warm-up.  open-unlearning's run takes one dual step per MICRO-batch (gradient accumulation
# 4: four steps of eta per optimizer step, lambda moves ~4x faster) after a 5-epoch warm-up; to reproduce its lambda
# trajectory set  method.params.dual_update=micro_batch method.params.dual_warmup_epochs=5  (palu_ds.dual).
DUAL_PARAMS = {"lambda0": Param(100.0, "num", 0), "eta_lambda": Param(5.0, "num", 0),
               "epsilon": Param(0.3, "num", 0, nullable=True), "epsilon_rel": Param(None, "num", -1, open_low=True,
                                                                                     nullable=True),
               "dual_warmup_steps": Param(0, "int", 0), "dual_warmup_epochs": Param(0.0, "num", 0),
               "dual_update": Param("step", ("step", "micro_batch"))}
BETA = {"beta": Param(0.1, "num", 0, open_low=True)}  # NPO / DPO inverse temperature

FORGET_RETAIN = ("forget", "retain")
RETAIN_SET = {"retain": "a retain set"}
PALU_TERMS = {"forget": palu_sensitive, "kl": palu_common_kl, "retain": retain_nll}
PALU_REFERENCE = {"forget": ("topk_ids", "kl")}

METHODS: dict[str, Method] = {m.name: m for m in [
    Method(name="palu", batches=FORGET_RETAIN, needs=RETAIN_SET, reference=PALU_REFERENCE, params=PALU_PARAMS,
           term_fns=PALU_TERMS, family="entropy",
           combine=lambda t, hp: hp["gamma"] * t["forget"] + hp["alpha"] * (t["retain"] + t["kl"]),
           peer="NPO",  # open-unlearning has no PALU: its NPO is the nearest reference-using method
           doc="PALU: local top-K flattening at I_init + KL on common tokens + retain NLL (arXiv 2601.03190)"),
    Method(name="pd_flat", batches=FORGET_RETAIN, needs=RETAIN_SET, constraint="retain", family="entropy",
           params={"gamma": weight(1.0), **DUAL_PARAMS}, term_fns={"forget": flat_forget, "retain": retain_nll},
           peer="PDU", peer_args={"retain_loss_eps": DUAL_PARAMS["epsilon"].default, "dual_warmup_epochs": 0},
           combine=lambda t, hp: hp["gamma"] * t["forget"],
           doc="logit-margin flattening under the primal-dual retain constraint (arXiv 2506.05314)"),
    Method(name="palu_pd", batches=FORGET_RETAIN, needs=RETAIN_SET, reference=PALU_REFERENCE, constraint="retain",
           params={**PALU_PARAMS, **DUAL_PARAMS}, term_fns=PALU_TERMS, family="entropy",
           combine=lambda t, hp: hp["gamma"] * t["forget"] + hp["alpha"] * t["kl"],
           doc="PALU's local loss + KL on common tokens, retain NLL as a primal-dual constraint (arXiv 2601.03190, "
               "2506.05314)"),
    Method(name="grad_ascent", batches=("forget",), params={"gamma": weight(1.0)}, term_fns={"forget": forget_neg_nll},
           combine=lambda t, hp: hp["gamma"] * t["forget"], family="nll",
           doc="gradient ascent on the forget answers (TOFU baseline, arXiv 2401.06121)"),
    Method(name="grad_diff", batches=FORGET_RETAIN, needs=RETAIN_SET, params={"gamma": weight(1.0),
                                                                               "alpha": weight(1.0)},
           term_fns={"forget": forget_neg_nll, "retain": retain_nll}, combine=_forget_retain, family="nll",
           peer="GradDiff", doc="gradient difference (TOFU baseline, arXiv 2401.06121)"),
    Method(name="npo", batches=FORGET_RETAIN, needs=RETAIN_SET, reference={"forget": ("seq_logps",)},
           params={**BETA, "gamma": weight(1.0), "alpha": weight(1.0)}, family="preference",
           term_fns={"forget": npo_forget, "retain": retain_nll},
           combine=_forget_retain, peer="NPO", doc="NPO + retain NLL (arXiv 2404.05868)"),
    Method(name="simnpo", batches=FORGET_RETAIN, needs=RETAIN_SET, family="preference",
           params={"beta": Param(4.5, "num", 0, open_low=True), "delta": Param(0.0, "num"), "gamma": weight(0.125),
                   "alpha": weight(1.0)},
           term_fns={"forget": simnpo_forget, "retain": retain_nll}, combine=_forget_retain,
           doc="SimNPO + retain NLL (arXiv 2410.07163)"),
    Method(name="idk_dpo", batches=("forget", "retain", "idk"), paired={"idk": "forget"},
           needs={**RETAIN_SET, "idk": "refusal strings"}, family="preference",
           reference={"forget": ("seq_logps",), "idk": ("seq_logps",)},
           params={**BETA, "gamma": weight(1.0), "alpha": weight(1.0)},
           term_fns={"forget": idk_dpo_forget, "retain": retain_nll}, combine=_forget_retain,
           doc="DPO toward refusal answers + retain NLL (TOFU's IdkPO, arXiv 2401.06121 / 2404.05868)"),
    # --- issue 28: token-weighted ascent (WGA, SatImp), adjusted-logit self-distillation (UNDIAL), representation
    # misdirection (RMU). Defaults: open-unlearning's configs/trainer/<Method>.yaml (d3d7cf9); its runs also set
    # lr 1e-5 / 5 epochs (WGA, SatImp), lr 1e-4 / 10 epochs (UNDIAL): train settings, not method parameters.
    # Families (not swept): WGA, SatImp, RMU with GradDiff's ("nll", open-unlearning's same lr 1e-5), UNDIAL with
    # NPO's ("preference", the higher lr).
    Method(name="wga", batches=FORGET_RETAIN, needs=RETAIN_SET, family="nll",
           params={"beta": Param(1.0, "num", 0, open_low=True), "gamma": weight(1.0), "alpha": weight(1.0)},
           term_fns={"forget": wga_forget, "retain": retain_nll}, combine=_forget_retain,
           doc="weighted gradient ascent (token weight p^beta) + retain NLL (arXiv 2502.19301)"),
    # SatImp: the paper's gamma 1, alpha 0.1 (forget:retain = 10; open-unlearning's community/methods/SatImp README
    # and satimp.py's keyword defaults; its SatImp.yaml has them swapped, gamma 0.1, alpha 1), beta1 5, beta2 1
    Method(name="satimp", batches=FORGET_RETAIN, needs=RETAIN_SET,
           family="nll", params={"beta1": Param(5.0, "num", 0), "beta2": Param(1.0, "num", 0),
                                 "gamma": weight(1.0), "alpha": weight(0.1)},
           term_fns={"forget": satimp_forget, "retain": retain_nll}, combine=_forget_retain,
           doc="saturation x importance weighted ascent (weight p^beta1 (1-p)^beta2) + retain NLL (arXiv 2505.11953)"),
    # UNDIAL.yaml: beta 10 (the paper: 3 / 10 / 30), gamma 1, alpha 0 (the paper uses no retain set; the retain
    # batch is still drawn, as there, for alpha > 0);
    # kl_topk: reference log-probs kept per forget answer token (null: the whole vocabulary, exact), as PALU's KL
    Method(name="undial", batches=FORGET_RETAIN, needs=RETAIN_SET, reference={"forget": ("answer_topk",)},
           family="preference", params={"beta": Param(10.0, "num", 0, open_low=True), "gamma": weight(1.0),
                                        "alpha": weight(0.0), "kl_topk": Param(256, "int", 1, nullable=True)},
           term_fns={"forget": undial_forget, "retain": retain_nll}, combine=_forget_retain,
           doc="self-distillation toward the reference with the answer token's logit lowered by beta "
               "(arXiv 2402.10052)"),
    # RMU.yaml: steering_coeff 2, gamma 1, alpha 1, layer 7 (module_regex model.layers.7), retain EMBED_DIFF, every
    # parameter trained (its trainable_params_regex ".*"; WMDP's code trains only layers 5-7's mlp.down_proj). The
    # WMDP paper's zephyr-7b run: layer 7, steering 6.5, alpha 1200. control_seed: ours (a fixed draw on every rank).
    Method(name="rmu", batches=FORGET_RETAIN, needs=RETAIN_SET, reference={"retain": ("hidden",)},
           family="nll", params={"steering_coeff": Param(2.0, "num", 0, open_low=True), "layer": Param(7, "int", 0),
                                 "gamma": weight(1.0), "alpha": weight(1.0), "control_seed": Param(0, "int", 0)},
           hidden_layer="layer", term_fns={"forget": rmu_forget, "retain": rmu_retain}, combine=_forget_retain,
           doc="representation misdirection: layer activations of forget tokens to a random vector, of retain "
               "tokens kept at the reference's (arXiv 2403.03218)"),
]}


def sft_nll(x: StepInputs, hp) -> Tensor:
    """Plain fine-tuning: answer-token NLL of the training batch (named "forget": launch/finetune.py's data)."""
    logits_s, labels_s, _ = _shifted(x, "forget")
    return L.nll_loss(logits_s, labels_s, _norm(x, "forget", "answer"))


# Not an unlearning method: launch/finetune.py uses it to make the target and retain models with the same engine.
METHODS["sft"] = Method(name="sft", batches=("forget",), term_fns={"forget": sft_nll},
                        combine=lambda t, hp: t["forget"], unlearning=False,
                        doc="supervised fine-tuning (answer-token NLL)")


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; valid: {sorted(METHODS)}") from None
