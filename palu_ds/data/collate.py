"""Right-pad a list of examples into the batch dict of :mod:`palu_ds.batch`."""

from __future__ import annotations

import torch

from palu_ds.batch import IGNORE_INDEX


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(e["input_ids"]) for e in examples)

    def pad(key, value, dtype):
        return torch.tensor([e[key] + [value] * (width - len(e[key])) for e in examples], dtype=dtype)

    return {
        "example_id": torch.tensor([e["example_id"] for e in examples], dtype=torch.long),
        "input_ids": pad("input_ids", pad_id, torch.long),
        "attention_mask": torch.tensor([[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"]))
                                        for e in examples], dtype=torch.long),
        "labels": pad("labels", IGNORE_INDEX, torch.long),
        "sens_mask": pad("sens_mask", False, torch.bool),
        "common_mask": pad("common_mask", False, torch.bool),
    }
