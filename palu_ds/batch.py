"""The batch contract shared by data, reference cache, methods and engine.

A collated training batch is a dict of tensors (right-padded, batch size B, length T):

* ``example_id``   LongTensor [B]    stable row index of the example in its dataset (aligns the reference cache)
* ``input_ids``    LongTensor [B, T]
* ``attention_mask`` LongTensor [B, T]
* ``labels``       LongTensor [B, T] aligned with ``input_ids`` (Hugging Face convention): the answer tokens and
                   EOS carry their own id, prompt and padding carry -100.  The logit at position t predicts
                   ``labels[t + 1]``; use :func:`shift` before any loss.
* ``sens_mask``    BoolTensor [B, T] token t is in I_init (first N tokens of a sensitive span)
* ``common_mask``  BoolTensor [B, T] token t is an answer token (EOS included) outside every sensitive span

Reference tensors for a batch (from the precompute cache or a resident reference) are *packed* over the selected
positions in row-major (b, t) order of the *shifted* masks, i.e. the order of ``logits[mask]`` after :func:`shift`:

* ``topk_ids``        [N_sens, K]   reference top-K token ids at the I_init positions
* ``kl_ids``          [N_common, k] reference top-k token ids at the common positions
* ``kl_logps``        [N_common, k] the reference log-probs of those ids (the tail mass is 1 - sum(exp))
* ``seq_logps``       [B]           sum of the reference's answer-token log-probs per sequence (NPO, SimNPO, DPO)
* ``ans_ids``         [N_answer, k] at every answer position: the target id, then the reference's top k-1 others
* ``ans_logps``       [N_answer, k] the reference log-probs of those ids (UNDIAL)
* ``hidden``          [N_tokens, D] the reference's hidden states of a decoder layer at the answer tokens themselves
                                    (``labels != -100`` unshifted; RMU)
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
MASK_KEYS = ("sens_mask", "common_mask")


def shift(logits: torch.Tensor, labels: torch.Tensor, *masks: torch.Tensor):
    """Align logits with the token they predict: ``logits[:, :-1]`` scores ``labels[:, 1:]``.

    Returns ``(logits[:, :-1], labels[:, 1:], *(m[:, 1:] for m in masks))``; every mask is a mask over *target*
    tokens, so after the shift it selects the logits that predict those tokens. A :class:`PackedLogits` is already
    shifted (its rows are the positions that predict answer tokens): it comes back as it is, with the shifted labels
    and masks.
    """
    if isinstance(logits, PackedLogits):
        return (logits, labels[:, 1:], *(m[:, 1:] for m in masks))
    return (logits[:, :-1], labels[:, 1:], *(m[:, 1:] for m in masks))


class PackedLogits:
    """Logits only at the positions whose next token is an answer token, packed in row-major (b, t) order.

    The engine builds it from the final hidden states with one LM-head call (prompt and padding positions never
    form V-wide logits: compute and memory scale with answer tokens, not with B·T). It stands for the *shifted*
    logits: ``self[mask]`` for a shifted mask that selects answer positions (I_init, common, all answer tokens)
    returns the rows ``logits[:, :-1][mask]`` would.
    """

    def __init__(self, rows: torch.Tensor, answer: torch.Tensor):
        if rows.shape[0] != int(answer.sum()):
            raise ValueError(f"{rows.shape[0]} packed rows for {int(answer.sum())} answer positions")
        self.rows, self.answer = rows, answer

    @property
    def device(self) -> torch.device:
        return self.rows.device

    @property
    def dtype(self) -> torch.dtype:
        return self.rows.dtype

    def __getitem__(self, mask: torch.Tensor) -> torch.Tensor:
        if mask.shape != self.answer.shape or mask.dtype != torch.bool:
            raise TypeError("PackedLogits is indexed by a boolean mask over the shifted positions")
        if mask is self.answer:
            return self.rows
        if (mask & ~self.answer).any():
            raise ValueError("mask selects positions without an answer label: their logits were not computed")
        return self.rows[mask[self.answer]]

    def map_rows(self, mask: torch.Tensor, fn, *row_args: torch.Tensor) -> torch.Tensor:
        """``fn(self[mask], *row_args)`` for a per-row function ``fn`` (see :func:`palu_ds.losses.map_rows`;
        :class:`palu_ds.lm_head.ChunkedLogits` evaluates the same call chunk by chunk from the hidden states)."""
        return fn(self[mask], *row_args)

    def zero_loss(self) -> torch.Tensor:
        """A zero attached to the graph through every row (the engine's loss for a skipped, non-finite step)."""
        return torch.nan_to_num(self.rows).sum() * 0.0
