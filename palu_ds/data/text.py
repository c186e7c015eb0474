"""MUSE-style raw text: documents joined with "\\n\\n" and cut into ``max_length``-token chunks (BOS on each)."""

from __future__ import annotations

import torch

from palu_ds.data.errors import DataError


class TextChunks(torch.utils.data.Dataset):
    """Next-token examples over raw text: every token is a label and "common"; there is no sensitive span."""

    def __init__(self, documents: list, tokenizer, max_length: int, source: str = "<documents>"):
        for i, d in enumerate(documents):
            if not isinstance(d, str) or not d.strip():
                raise DataError(source, i, None, "is not a non-empty string", "raw-text files hold a list of texts")
        if max_length < 2:
            raise ValueError("max_length must be at least 2")
        ids = tokenizer("\n\n".join(documents), add_special_tokens=False)["input_ids"]
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        step = max_length - len(bos)
        self.examples = []
        for n, start in enumerate(range(0, len(ids), step)):
            chunk = bos + ids[start:start + step]
            self.examples.append({
                "example_id": n,
                "input_ids": chunk,
                "labels": [-100] * len(bos) + chunk[len(bos):],
                "sens_mask": [False] * len(chunk),
                "common_mask": [False] * len(bos) + [True] * (len(chunk) - len(bos)),
            })

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]
