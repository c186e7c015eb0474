"""What the reference contributes to a run: which parts a method needs and which batch carries them, and those parts
computed from reference logits -- the math is :mod:`palu_ds.losses`' (top-k ids, sequence log-probs, NLL), not a
second copy of it."""

from __future__ import annotations

import logging

import torch

from palu_ds import losses as L
from palu_ds.batch import IGNORE_INDEX, shift

log = logging.getLogger("palu_ds")
ROW_PARTS = {"topk_ids": ("topk_ids",), "kl": ("kl_ids", "kl_logps")}


# ---------------------------------------------------------------------- what the reference contributes
# Which parts each batch needs is declared by the method (palu_ds.methods.Method.reference / needed_parts).


def reference_tensors(logits: torch.Tensor, batch: dict, parts: tuple[str, ...], K: int, k: int) -> dict:
    """Packed reference tensors (palu_ds.batch's order) from reference logits [B, T, V]."""
    lg, labels, sens, common = shift(logits, batch["labels"], batch["sens_mask"], batch["common_mask"])
    out = {}
    if "topk_ids" in parts:
        out["topk_ids"] = L.topk_ids(lg[sens], K)
    if "kl" in parts:
        logps = torch.log_softmax(lg[common].float(), dim=-1)
        out["kl_ids"] = L.topk_ids(logps, k)
        out["kl_logps"] = logps.gather(-1, out["kl_ids"])
    if "seq_logps" in parts:
        out["seq_logps"] = L.sequence_logps(lg, labels)
    return out


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
