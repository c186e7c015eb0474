"""MUSE-style raw text: documents joined with "\\n\\n" and cut into ``max_length``-token chunks (BOS on each).

Every token is a label. Sensitive spans come from :func:`detect_text_spans` (names, places, titles, dates): I_init =
the first ``n_init`` tokens of each span (every token of it when ``n_init`` is None, as for QA data), common = the
tokens outside spans. ``spans=False``: no span at all (every token common).
"""

from __future__ import annotations

from palu_ds.data.errors import DataError
from palu_ds.data.examples import ExampleDataset
from palu_ds.data.spans import check_offsets, detect_text_spans, split_init_common, token_mask_from_spans


class TextChunks(ExampleDataset):
    """Next-token examples over raw text; ``n_init`` as ``data.n_init`` (None: whole spans); ``spans=False`` marks
    no span (every token common, no offsets needed)."""

    def __init__(self, documents: list, tokenizer, max_length: int, source: str = "<documents>",
                 n_init: int | None = None, spans: bool = True):
        for i, d in enumerate(documents):
            if not isinstance(d, str) or not d.strip():
                raise DataError(source, i, None, "is not a non-empty string", "raw-text files hold a list of texts")
        if max_length < 2:
            raise ValueError("max_length must be at least 2")
        self.source = source
        text = "\n\n".join(documents)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=spans)
        ids = enc["input_ids"]
        if not spans:
            init, common = [False] * len(ids), [True] * len(ids)
        else:
            check_offsets(tokenizer, ids, enc["offset_mapping"], source)
            found = detect_text_spans(text)
            sens = token_mask_from_spans(enc["offset_mapping"], found)
            init, common = split_init_common(sens, n_init)
        self.n_spans = len(found) if spans else 0
        self.n_init = n_init
        self.span_source = "text_detector" if spans else "none"
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        step = max_length - len(bos)
        self.examples = []
        for n, start in enumerate(range(0, len(ids), step)):
            chunk = bos + ids[start:start + step]
            self.examples.append({
                "example_id": n,
                "input_ids": chunk,
                "labels": [-100] * len(bos) + chunk[len(bos):],
                "sens_mask": [False] * len(bos) + init[start:start + step],
                "common_mask": [False] * len(bos) + common[start:start + step],
            })

    def span_info(self) -> dict:
        """As :meth:`palu_ds.data.qa.QADataset.span_info`: raw text is always labelled by the detector."""
        return {"dataset": self.source, "source": self.span_source, "rows": len(self.examples),
                "spans": self.n_spans, "n_init": self.n_init, **self.token_counts()}
