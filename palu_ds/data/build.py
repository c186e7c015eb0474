"""Build the datasets a run needs (forget, retain, idk) from the data config."""

from __future__ import annotations

from palu_ds.data.errors import DataError, at
from palu_ds.data.io import load_records
from palu_ds.data.qa import QADataset, QAOptions, with_refusals
from palu_ds.data.text import TextChunks


def qa_options(data_cfg) -> QAOptions:
    return QAOptions(question_key=data_cfg.question_key, answer_key=data_cfg.answer_key,
                     spans_key=data_cfg.spans_key, max_length=data_cfg.max_length, n_init=data_cfg.n_init,
                     span_source=data_cfg.span_source, span_model=data_cfg.span_model)


def _name(src) -> str:
    return f"{src.source}[{src.config}]" if src.config else src.source


def build_one(src, data_cfg, tokenizer):
    records = load_records(src.source, src.config, src.split)
    if src.kind == "text":
        docs = [r if isinstance(r, str) else r.get("text") for r in records]
        return TextChunks(docs, tokenizer, data_cfg.max_length, source=_name(src), n_init=data_cfg.n_init)
    return QADataset(records, tokenizer, qa_options(data_cfg), source=_name(src))


def build_datasets(data_cfg, tokenizer, names: tuple[str, ...], seed: int = 0) -> dict:
    """``names`` is the method's batches, e.g. ("forget", "retain", "idk")."""
    out = {}
    for name in names:
        if name == "idk":
            forget_records = load_records(data_cfg.forget.source, data_cfg.forget.config, data_cfg.forget.split)
            refusal_rows = load_records(data_cfg.idk.source, data_cfg.idk.config, data_cfg.idk.split)
            refusals = []
            for i, r in enumerate(refusal_rows):
                text = r if isinstance(r, str) else r.get(data_cfg.answer_key) if isinstance(r, dict) else None
                if not isinstance(text, str) or not text.strip():
                    raise DataError(_name(data_cfg.idk), at(refusal_rows, i), data_cfg.answer_key,
                                    "is missing or empty",
                                    "each refusal row needs a non-empty answer")
                refusals.append(text)
            recs = with_refusals(forget_records, refusals, data_cfg.answer_key, seed)
            out[name] = QADataset(recs, tokenizer, qa_options(data_cfg), source=_name(data_cfg.idk))
        else:
            out[name] = build_one(getattr(data_cfg, name), data_cfg, tokenizer)
    return out
