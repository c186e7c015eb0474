"""Build the data sets a run needs -- one per batch of its method (palu_ds.methods) -- from the data config."""

from __future__ import annotations

import dataclasses
import logging

from palu_ds.data.errors import DataError, at
from palu_ds.data.io import load_records
from palu_ds.data.qa import QADataset, QAOptions, with_refusals
from palu_ds.data.text import TextChunks


def qa_options(data_cfg, spans: bool = True) -> QAOptions:
    """The QA options of a dataset; ``spans=False`` (the retain and idk sets) labels no sensitive spans: only the
    forget set's spans are read by a loss, and ``data.span_source: labels`` must not demand labels elsewhere."""
    opts = {f.name: getattr(data_cfg, f.name) for f in dataclasses.fields(QAOptions)}
    return QAOptions(**{**opts, "span_source": data_cfg.span_source if spans else "none"})


def _name(src) -> str:
    return f"{src.source}[{src.config}]" if src.config else src.source


def build_one(src, data_cfg, tokenizer, spans: bool = True):
    """One data source as a dataset (QA rows or raw-text chunks); ``spans=False`` (the retain and idk sets) labels no
    sensitive spans, for raw text as for QA."""
    records = load_records(src.source, src.config, src.split)
    if src.kind == "text":
        docs = [r if isinstance(r, str) else r.get("text") for r in records]
        return TextChunks(docs, tokenizer, data_cfg.max_length, source=_name(src), n_init=data_cfg.n_init,
                          spans=spans and data_cfg.span_source != "none")
    return QADataset(records, tokenizer, qa_options(data_cfg, spans), source=_name(src))


log = logging.getLogger("palu_ds")


def report_spans(datasets: dict, method) -> dict | None:
    """For a span-using method (PALU's I_init / common tokens): the forget set's span source and counts, logged at
    start-up -- a warning when the spans were detected rather than labelled (e.g. locuslab/TOFU has no
    ``target_words``; PALU's GPT labels are the ``forget*_with_common_words_gpt`` folders). None otherwise."""
    if not getattr(method, "uses_spans", False) or "forget" not in datasets:
        return None
    info = datasets["forget"].span_info()
    counts = (f"{info['spans']} spans over {info['rows']} rows, {info['init_tokens']} I_init tokens "
              f"(n_init={info['n_init']}), {info['common_tokens']} common tokens")
    if info["source"] == "labels":
        log.info("%s: sensitive spans from the labels of %s: %s", method.name, info["dataset"], counts)
    elif info["source"] == "none":
        log.warning("%s runs WITHOUT sensitive spans on %s (no labels, no detector): %s", method.name,
                    info["dataset"], counts)
    else:
        log.warning("%s runs on DETECTED sensitive spans (source %s, not labels) of %s: %s. For PALU's own labels "
                    "give a labelled forget set (target_words; e.g. PALU's forget01_with_common_words_gpt "
                    "save_to_disk folder) with data.span_source: labels", method.name, info["source"],
                    info["dataset"], counts)
    return info


def build_paired(src, partner, data_cfg, tokenizer, seed: int = 0, what: str = "answers"):
    """A paired batch's data set: the ``partner`` source's rows (same prompts, same order, so example ids match
    row for row) with each answer replaced by one of the answers of ``src``, drawn with ``seed`` (IdkDPO: the
    forget prompts with refusal strings)."""
    partner_records = load_records(partner.source, partner.config, partner.split)
    rows = load_records(src.source, src.config, src.split)
    answers = []
    for i, r in enumerate(rows):
        text = r if isinstance(r, str) else r.get(data_cfg.answer_key) if isinstance(r, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise DataError(_name(src), at(rows, i), data_cfg.answer_key, "is missing or empty",
                            f"each row of {what} needs a non-empty answer")
        answers.append(text)
    recs = with_refusals(partner_records, answers, data_cfg.answer_key, seed)
    return QADataset(recs, tokenizer, qa_options(data_cfg, spans=False), source=_name(src))


def build_datasets(data_cfg, tokenizer, method, seed: int = 0) -> dict:
    """One data set per batch of ``method`` (palu_ds.methods.Method): ``data.<batch>``, or for a paired batch
    its partner's prompts with its own answers (:func:`build_paired`)."""
    out = {}
    for name in method.batches:
        src = getattr(data_cfg, name)
        if name in method.paired:
            partner = getattr(data_cfg, method.paired[name])
            out[name] = build_paired(src, partner, data_cfg, tokenizer, seed, method.needs.get(name, name))
        else:
            out[name] = build_one(src, data_cfg, tokenizer, spans=name == "forget")
    return out
