"""The base of the training datasets (QA rows, raw-text chunks): a list of tokenized examples, the dicts
:func:`palu_ds.data.collate.collate` pads, and the count of their I_init and common tokens."""

from __future__ import annotations

import torch


class ExampleDataset(torch.utils.data.Dataset):
    """``self.examples``: one dict per example (``input_ids``, ``labels``, ``sens_mask``, ``common_mask``, ...)."""

    examples: list[dict]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]

    def token_counts(self) -> dict:
        """``{"init_tokens": ..., "common_tokens": ...}``: tokens marked by ``sens_mask`` / ``common_mask``."""
        return {"init_tokens": sum(sum(e["sens_mask"]) for e in self.examples),
                "common_tokens": sum(sum(e["common_mask"]) for e in self.examples)}
