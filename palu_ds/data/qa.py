"""TOFU-style QA datasets: tokenized prompt + answer, labels masked and ready to shift, sensitive-span masks.

Each example holds ``input_ids``, ``labels`` (-100 on the prompt; answer tokens and EOS carry their ids), and the
token masks ``sens_mask`` (I_init) and ``common_mask`` described in :mod:`palu_ds.batch`.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass

from palu_ds.batch import IGNORE_INDEX
from palu_ds.data.errors import DataError, at
from palu_ds.data.examples import ExampleDataset
from palu_ds.data.io import load_records
from palu_ds.data.prompt import DEFAULT_FORMAT, PromptFormat, encode_pair, uses_chat
from palu_ds.data.spans import (check_offsets, detect_spans, model_spans, parse_target_words, split_init_common,
                                token_mask_from_spans)
from palu_ds.settings import check_choices, setting

log = logging.getLogger(__name__)


SPAN_SOURCES = ("auto", "labels", "detector", "model", "none")


@dataclass
class QAOptions:
    """How to read and label a QA dataset: declared once, the ``data`` section of a run config extends it
    (palu_ds.config.DataConfig)."""

    question_key: str = setting("question", "the question field of a QA row")
    answer_key: str = setting("answer", "the answer field of a QA row")
    spans_key: str = setting("target_words", "the field of a row's labelled sensitive spans")
    max_length: int = setting(256, "longest tokenized example (prompt + answer); longer ones are cut")
    n_init: int | None = setting(3, "I_init = the first n_init tokens of each sensitive span; null: whole spans (set "
                                    "by method.params.N when given)")
    span_source: str = setting("auto", "the forget set's spans: auto (labels when present, else detector) | labels | "
                                       "detector | model | none", choices=SPAN_SOURCES)
    span_model: str | None = setting(None, "a transformers token-classification model for span_source: model")
    prompt: PromptFormat = setting(DEFAULT_FORMAT, "how QA becomes tokens for training, precompute and in-training "
                                                   "evaluation (the tokenizer's chat template as open-unlearning "
                                                   "applies it)")

    def __post_init__(self):  # its own fields only: the run config checks its sections in validate_config
        check_choices(self, "data", fields=dataclasses.fields(QAOptions))


class QADataset(ExampleDataset):
    """Tokenized QA examples. ``source`` names the file (for error messages)."""

    def __init__(self, records: list, tokenizer, options: QAOptions = QAOptions(), source: str = "<records>"):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("a fast tokenizer is needed (offset mappings locate the sensitive spans)")
        self.options, self.source = options, source
        uses_chat(tokenizer, options.prompt)  # a required chat template that is missing fails here, not per row
        self._records = records  # error locations: JSONL line numbers when the records came from a file
        self.truncated = 0
        self.span_rows = {"labels": 0, "detector": 0, "model": 0, "none": 0}  # rows whose spans came from each source
        self.n_spans = 0
        pipe = _span_pipeline(options)
        self.examples = [self._encode(i, r, tokenizer, pipe) for i, r in enumerate(records)]
        self._records = None
        if self.truncated:
            log.warning("%s: %d of %d answers were cut at max_length=%d", source, self.truncated, len(records),
                        options.max_length)

    @classmethod
    def from_source(cls, source: str, tokenizer, options: QAOptions = QAOptions(), config: str | None = None):
        name = f"{source}[{config}]" if config and not source.endswith((".json", ".jsonl")) else source
        return cls(load_records(source, config), tokenizer, options, source=name)

    def span_info(self) -> dict:
        """Where the sensitive spans came from and how many: ``source`` is ``labels`` / ``detector`` / ``model``
        (or ``mixed`` when rows differ), with per-source row counts, spans, I_init and common token counts."""
        used = [k for k, n in self.span_rows.items() if n]
        return {"dataset": self.source, "source": used[0] if len(used) == 1 else "mixed" if used else "none",
                "span_source_setting": self.options.span_source, "rows": len(self.examples),
                "rows_by_source": dict(self.span_rows), "spans": self.n_spans, "n_init": self.options.n_init,
                **self.token_counts()}

    def _at(self, i: int):
        return at(self._records, i)

    def _field(self, i: int, record, key: str) -> str:
        if not isinstance(record, dict):
            raise DataError(self.source, self._at(i), None,
                            f"expected an object, got {type(record).__name__}")
        if key not in record:
            raise DataError(self.source, self._at(i), key, "is missing", f"present keys: {sorted(record)}; "
                            "set data.question_key / data.answer_key if your fields have other names")
        value = record[key]
        if not isinstance(value, str) or not value.strip():
            raise DataError(self.source, self._at(i), key, "is empty" if isinstance(value, str) else
                            f"is {type(value).__name__}, not text", "every example needs a non-empty text")
        return value

    def _encode(self, i: int, record, tokenizer, pipe) -> dict:
        o = self.options
        question, answer = self._field(i, record, o.question_key), self._field(i, record, o.answer_key)
        try:
            prompt, ans_ids, offsets = encode_pair(tokenizer, question, answer, o.prompt)
        except ValueError as e:
            raise DataError(self.source, self._at(i), o.answer_key, str(e)) from e
        if len(prompt) >= o.max_length:
            raise DataError(self.source, self._at(i), o.question_key, f"the prompt is {len(prompt)} tokens, "
                            f"max_length is {o.max_length}", "raise data.max_length or shorten the question")
        where = self._at(i)
        check_offsets(tokenizer, ans_ids, offsets,
                      f"{self.source}, {where if isinstance(where, str) else f'record {where + 1}'}")
        char_spans, kind = self._spans(i, record, question, answer, pipe)
        self.span_rows[kind] += 1
        self.n_spans += len(char_spans)
        init, common = split_init_common(token_mask_from_spans(offsets, char_spans), o.n_init)
        room = o.max_length - len(prompt)
        if len(ans_ids) > room:
            self.truncated += 1
            ans_ids, init, common = ans_ids[:room], init[:room], common[:room]
        n_p = len(prompt)
        return {
            "example_id": i,
            "input_ids": prompt + ans_ids,
            "labels": [IGNORE_INDEX] * n_p + ans_ids,
            "sens_mask": [False] * n_p + init,
            "common_mask": [False] * n_p + common,
        }

    def _spans(self, i: int, record, question: str, answer: str, pipe) -> tuple[list[tuple[int, int]], str]:
        o = self.options
        return row_spans(record, question, answer, o.span_source, o.spans_key, pipe, self.source, self._at(i))


def row_spans(record, question: str, answer: str, span_source: str = "auto", spans_key: str = "target_words",
              pipe=None, source: str = "<records>", row: int = 0) -> tuple[list[tuple[int, int]], str]:
    """The sensitive character spans of one QA row and where they came from (``labels`` / ``model`` /
    ``detector``): the one labelling rule of training (:class:`QADataset`) and of ``palu-ds spans``."""
    if span_source == "none":  # the retain / idk sets: no loss reads their spans
        return [], "none"
    has_labels = isinstance(record, dict) and record.get(spans_key) is not None
    if span_source == "labels" or (span_source == "auto" and has_labels):
        if not has_labels:
            raise DataError(source, row, spans_key, "is missing and data.span_source is 'labels'",
                            "add the field or use span_source: detector")
        return parse_target_words(record[spans_key], answer, source, row, spans_key), "labels"
    if span_source == "model":
        return model_spans(pipe, answer), "model"
    return detect_spans(question, answer), "detector"


def _span_pipeline(options: QAOptions):
    if options.span_source != "model":
        return None
    return span_pipeline(options.span_model)


def span_pipeline(model: str | None):
    """The transformers token-classification pipeline of ``span_source: model``."""
    if not model:
        raise ValueError("data.span_source is 'model' but data.span_model names no token-classification model")
    from transformers import pipeline

    return pipeline("token-classification", model=model, aggregation_strategy="simple")


def with_refusals(records: list[dict], refusals: list[str], answer_key: str = "answer", seed: int = 0) -> list[dict]:
    """The forget records with each answer replaced by a refusal string (IdkDPO's preferred answers); seeded."""
    if not refusals:
        raise ValueError("the refusal list is empty")
    rng = random.Random(seed)
    return [{**r, answer_key: rng.choice(refusals), "target_words": []} for r in records]
