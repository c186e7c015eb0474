"""What the reference contributes to a run: which parts a method needs and which batch carries them, and those parts
computed from reference logits -- the math is :mod:`palu_ds.losses`' (top-k ids, sequence log-probs, NLL), not a
second copy of it."""

from __future__ import annotations

import logging

import torch

from palu_ds import losses as L
from palu_ds import packing
from palu_ds.batch import IGNORE_INDEX, PackedLogits, shift
from palu_ds.methods import REFERENCE_PARTS, row_mask

log = logging.getLogger("palu_ds")


# ---------------------------------------------------------------------- what the reference contributes
# Which parts each batch needs is declared by the method (palu_ds.methods.Method.reference / needed_parts); what each
# part is (rows, stored tensors, math, cache-key fields) by the one table palu_ds.methods.REFERENCE_PARTS.


def row_masks(parts) -> tuple[str, ...]:
    """The row masks (palu_ds.methods.row_mask) the given parts' rows follow, in table order."""
    return tuple(dict.fromkeys(REFERENCE_PARTS[p].rows for p in parts if REFERENCE_PARTS[p].rows))


def offsets_name(rows: str) -> str:
    """The shard tensor of a row mask's per-example row offsets: ``sens_mask`` -> ``sens_offsets``."""
    return rows.split("_")[0] + "_offsets"


def reference_tensors(logits: torch.Tensor, batch: dict, parts: tuple[str, ...], K: int, k: int,
                      hidden: torch.Tensor | None = None) -> dict:
    """Packed reference tensors (palu_ds.batch's order), one table entry each, from the reference's logits [B, T, V]
    or their answer rows (a :class:`PackedLogits`, :func:`reference_forward`) and, for a part of source ``hidden``,
    its hidden states [B, T, D] of the method's layer."""
    sources = {"logits": shift(logits, batch["labels"]), "hidden": (hidden, batch["labels"])}
    out = {}
    for p in parts:
        part = REFERENCE_PARTS[p]
        source, labels = sources[part.source]
        if source is None:
            raise ValueError(f"the {p!r} reference part needs the reference's hidden states of the method's layer")
        rows = None if part.rows is None else row_mask(batch, part.rows)
        out.update(part.compute(source, labels, rows, {"K": K, "kl_topk": k}))
    return out


def reference_capture(model, method, hp):
    """A hook on the reference's decoder layer (palu_ds.hidden) when one of the method's parts reads its hidden states,
    else None."""
    from palu_ds.hidden import LayerCapture

    if not any(REFERENCE_PARTS[p].source == "hidden" for p in method.reference_parts):
        return None
    return LayerCapture(model, method.layer(hp))


def reference_forward(model, batch: dict, capture, packed: bool,
                      answer_only: bool = False) -> tuple[torch.Tensor | PackedLogits, torch.Tensor | None]:
    """The frozen reference's logits on a right-padded batch and, with ``capture``, its hooked layer's output
    [B, T, D], without gradients: its rows end to end when ``packed`` (palu_ds.packing, as the training forward with
    ``train.padding_free``), in the padded layout either way. The logits are [B, T, V], or with ``answer_only``
    (palu_ds.lm_head.start_answer_only, ``train.answer_only_logits``) only where the next token is an answer token,
    the only positions a reference part reads: a :class:`PackedLogits` (already shifted) formed by the model's own
    head on those positions' hidden states -- prompt and padding never form V-wide logits."""
    kw, answer = {}, row_mask(batch, "answer")  # [B, T-1]: the positions that predict an answer token
    if answer_only:
        keep = torch.nn.functional.pad(answer, (0, 1))  # [B, T]: the last position predicts nothing
        kw["logits_to_keep"] = keep[batch["attention_mask"].bool()][None] if packed else keep
    with torch.no_grad():
        out, unpack = packing.forward(model, batch["input_ids"], batch["attention_mask"], packed, **kw)
        logits = PackedLogits(out.logits, answer) if answer_only else unpack(out.logits)
    return logits, (unpack(capture.output) if capture is not None else None)


def answer_nll_sums(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """[sum of answer-token NLL, number of answer tokens] of a batch (for the reference retain loss)."""
    lg, labels = shift(logits, batch["labels"])
    nll = -L.sequence_logps(lg, labels).sum()
    return torch.stack([nll.double(), (labels != IGNORE_INDEX).sum().double()])


def _vocab_size(model) -> int:
    """Vocabulary size of an HF model or of a DeepSpeed engine wrapping one (whose ``.config`` is DeepSpeed's)."""
    return getattr(model, "module", model).config.vocab_size


def topk_sizes(hp, vocab_size: int, given: dict | None = None, model: str = "the reference model") -> tuple[int, int]:
    """(K, kl_topk) for a model of ``vocab_size`` tokens. A value the config sets above the vocabulary is an error
    (palu_ds.config.check_vocabulary); a method's paper default above it (PALU's K=5000 on a small vocabulary)
    becomes the whole vocabulary, logged."""
    from palu_ds.config import check_vocabulary

    check_vocabulary(given or {}, vocab_size, model)
    out = []
    for key in ("K", "kl_topk"):
        v = hp.get(key)
        if v is not None and int(v) > vocab_size:
            log.info("method default %s=%s exceeds the vocabulary (%d): using %d", key, v, vocab_size, vocab_size)
        out.append(int(min(v or vocab_size, vocab_size)))
    return out[0], out[1]


def id_dtype(vocab_size: int) -> torch.dtype:
    """The smallest signed integer type that holds every token id."""
    return torch.int16 if vocab_size <= 2 ** 15 else torch.int32
