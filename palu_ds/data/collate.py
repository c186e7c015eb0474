"""Right-pad a list of examples into the batch dict of :mod:`palu_ds.batch`."""

from __future__ import annotations

import torch

from palu_ds.batch import IGNORE_INDEX


def pad_ids(seqs: list[list[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` [B, longest]: each sequence padded with ``pad_id`` on the right (``left``: on
    the left, as generation wants), the mask 1 on its tokens."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for j, s in enumerate(seqs):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        ids[j, cols] = torch.tensor(s, dtype=torch.long)
        mask[j, cols] = 1
    return ids, mask


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(e["input_ids"]) for e in examples)

    def pad(key, value, dtype):
        return torch.tensor([e[key] + [value] * (width - len(e[key])) for e in examples], dtype=dtype)

    ids, mask = pad_ids([e["input_ids"] for e in examples], pad_id)
    return {
        "example_id": torch.tensor([e["example_id"] for e in examples], dtype=torch.long),
        "input_ids": ids,
        "attention_mask": mask,
        "labels": pad("labels", IGNORE_INDEX, torch.long),
        "sens_mask": pad("sens_mask", False, torch.bool),
        "common_mask": pad("common_mask", False, torch.bool),
    }
