"""TOFU-style QA datasets: tokenized prompt + answer, labels masked and ready to shift, sensitive-span masks.

Each example holds ``input_ids``, ``labels`` (-100 on the prompt; answer tokens and EOS carry their ids), and the
token masks ``sens_mask`` (I_init) and ``common_mask`` described in :mod:`palu_ds.batch`.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import torch

from palu_ds.batch import IGNORE_INDEX
from palu_ds.data.errors import DataError, at
from palu_ds.data.io import load_records
from palu_ds.data.prompt import encode_answer, encode_prompt
from palu_ds.data.spans import detect_spans, model_spans, parse_target_words, split_init_common, token_mask_from_spans

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QAOptions:
    """How to read and label a QA dataset."""

    question_key: str = "question"
    answer_key: str = "answer"
    spans_key: str = "target_words"
    max_length: int = 256
    n_init: int | None = 3  # None = every token of a span is in I_init
    span_source: str = "auto"  # auto (labels when present, else detector) | labels | detector | model
    span_model: str | None = None  # a transformers token-classification model (span_source=model)


class QADataset(torch.utils.data.Dataset):
    """Tokenized QA examples. ``source`` names the file (for error messages)."""

    def __init__(self, records: list, tokenizer, options: QAOptions = QAOptions(), source: str = "<records>"):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("a fast tokenizer is needed (offset mappings locate the sensitive spans)")
        self.options, self.source = options, source
        self._records = records  # error locations: JSONL line numbers when the records came from a file
        self.truncated = 0
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

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]

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
        prompt = encode_prompt(tokenizer, question)
        if len(prompt) >= o.max_length:
            raise DataError(self.source, self._at(i), o.question_key, f"the prompt is {len(prompt)} tokens, "
                            f"max_length is {o.max_length}", "raise data.max_length or shorten the question")
        ans_ids, offsets = encode_answer(tokenizer, answer)
        char_spans = self._spans(i, record, question, answer, pipe)
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

    def _spans(self, i: int, record, question: str, answer: str, pipe) -> list[tuple[int, int]]:
        o = self.options
        has_labels = isinstance(record, dict) and record.get(o.spans_key) is not None
        if o.span_source == "labels" or (o.span_source == "auto" and has_labels):
            if not has_labels:
                raise DataError(self.source, self._at(i), o.spans_key, "is missing and data.span_source is "
                                "'labels'", "add the field or use span_source: detector")
            return parse_target_words(record[o.spans_key], answer, self.source, self._at(i), o.spans_key)
        if o.span_source == "model":
            return model_spans(pipe, answer)
        return detect_spans(question, answer)


def _span_pipeline(options: QAOptions):
    if options.span_source != "model":
        return None
    if not options.span_model:
        raise ValueError("data.span_source is 'model' but data.span_model names no token-classification model")
    from transformers import pipeline

    return pipeline("token-classification", model=options.span_model, aggregation_strategy="simple")


def with_refusals(records: list[dict], refusals: list[str], answer_key: str = "answer", seed: int = 0) -> list[dict]:
    """The forget records with each answer replaced by a refusal string (IdkDPO's preferred answers); seeded."""
    if not refusals:
        raise ValueError("the refusal list is empty")
    rng = random.Random(seed)
    return [{**r, answer_key: rng.choice(refusals), "target_words": []} for r in records]
