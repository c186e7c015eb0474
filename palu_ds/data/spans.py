"""Sensitive spans: from labels (PALU's ``target_words``) or from a detector, mapped to answer tokens.

PALU (arXiv 2601.03190) localizes unlearning to the first tokens of each sensitive span: consecutive sensitive
tokens form a span, ``I_init`` is the first ``N`` tokens of each span, and every other answer token that lies
outside all spans (EOS included) is "common". The rest of a span is neither.
"""

from __future__ import annotations

import json
import re

from palu_ds.data.errors import DataError

# Function words and the generic words of biography QA; a word outside this list and absent from the question is a
# candidate fact word.
STOP_WORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before being below between both
but by can could did do does doing down during each few for from further had has have having he her here hers
herself him himself his how i if in into is it its itself just me more most my myself no nor not now of off on once
only or other our ours ourselves out over own same she should so some such than that the their theirs them
themselves then there these they this those through to too under until up very was we were what when where which
while who whom why will with would you your yours yourself yourselves one two many much well known often notable
author authors writer writers book books work works novel novels wrote written writes write writing born birth
name named full father mother parents parent profession job genre genres award awards received won receive wins
style themes theme theme's inspired inspiration influence influenced life career early later first second known
famous fictitious fictional is's has been like including include includes often frequently particularly especially
deeply heavily largely mainly primarily mostly strongly widely significantly unique distinct title titled called
features feature featured characters character story stories people person world readers reader literary
literature also various several within across among toward towards upon s worked works published studied
university adapted stage lives lived living now before after explores explored writes wrote yes indeed however
certainly absolutely sure
""".split())

_WORD = re.compile(r"[\w][\w'\u2019\-./]*\w|\w")
_POSSESSIVE = re.compile(r"['\u2019]s$")


def _base(word: str) -> str:
    """Lower-cased, without a trailing full stop or possessive: "Rahman's" -> "rahman", "Jones" -> "jones"."""
    return _POSSESSIVE.sub("", word.lower().rstrip("."))


def parse_target_words(value, answer: str, source: str, row: int, field: str = "target_words") -> list[tuple[int, int]]:
    """Character spans ``[(start, end)]`` from PALU's ``target_words`` (a JSON string or a list of {word,start,end}).

    Every span must lie inside the answer and ``answer[start:end]`` must equal its ``word``: a mismatch is an
    error naming the file, row and field (offsets computed on another version of the answer are a common bug).
    """
    if value is None:
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else []
        except json.JSONDecodeError as e:
            raise DataError(source, row, field, f"not valid JSON ({e.msg})") from e
    if not isinstance(value, list):
        raise DataError(source, row, field, f"expected a list of {{word, start, end}}, got {type(value).__name__}")
    spans = []
    for j, item in enumerate(value):
        if not isinstance(item, dict) or not {"word", "start", "end"} <= set(item):
            raise DataError(source, row, f"{field}[{j}]", "needs keys word, start, end")
        s, e, w = item["start"], item["end"], item["word"]
        if not (isinstance(s, int) and isinstance(e, int) and 0 <= s < e <= len(answer)):
            raise DataError(source, row, f"{field}[{j}]", f"offsets [{s}, {e}) fall outside the answer "
                            f"(length {len(answer)})", "offsets are character offsets into the answer")
        if answer[s:e] != w:
            raise DataError(source, row, f"{field}[{j}]", f"answer[{s}:{e}] is {answer[s:e]!r}, not the word {w!r}",
                            "recompute the offsets against this answer")
        spans.append((s, e))
    return sorted(spans)


def detect_spans(question: str, answer: str) -> list[tuple[int, int]]:
    """Network-free detector: maximal runs of answer words that are absent from the question and not stop words.

    Names, dates, titles and places are the words a QA answer adds to its question, so they are caught; runs are
    maximal sequences of such words separated only by spaces, commas of a date, or hyphens.
    """
    qwords = {_base(w) for w in _WORD.findall(question)}
    spans: list[list[int]] = []
    prev_end = None
    for m in _WORD.finditer(answer):
        w = m.group(0)
        lw = _base(w)
        is_fact = lw not in STOP_WORDS and lw not in qwords
        if is_fact:
            gap = answer[prev_end:m.start()] if prev_end is not None else None
            if spans and gap is not None and re.fullmatch(r"[ \-]+|, ?", gap) and spans[-1][1] == prev_end:
                spans[-1][1] = m.end()
            else:
                spans.append([m.start(), m.end()])
        prev_end = m.end()
    return [(s, e - 1 if answer[e - 1] == "." else e) for s, e in spans]


_NUM = r"\d+(?:[,./:\-]\d+)*"
_PROPER = re.compile(rf"(?<![.!?]\s)(?<!^)\b(?:[A-Z][\w'\-]*|{_NUM})(?:[ \t]+(?:[A-Z][\w'\-]*|{_NUM}))*")


def detect_text_spans(text: str) -> list[tuple[int, int]]:
    """Raw text (no question to compare with): maximal runs of capitalised words and numbers that do not open a
    sentence -- the names, places, titles and dates of a document."""
    spans = []
    for m in _PROPER.finditer(text):
        s, e = m.start(), m.end()
        while e > s and text[e - 1] in ".,:/-":
            e -= 1
        if text[s:e].lower() not in STOP_WORDS:
            spans.append((s, e))
    return spans


def model_spans(pipeline, answer: str) -> list[tuple[int, int]]:
    """Character spans of the entities a transformers token-classification ``pipeline`` finds in ``answer``."""
    return sorted((int(ent["start"]), int(ent["end"])) for ent in pipeline(answer))


class ZeroWidthOffsets(ValueError):
    """The tokenizer's character offsets are zero-width: spans cannot be mapped to tokens."""


def check_offsets(tokenizer, ids: list[int], offsets: list[tuple[int, int]], where: str = "") -> None:
    """Refuse a tokenizer whose offsets are zero-width for a token that stands for text: with such offsets
    (``(a, a)``; e.g. Llama-3 tokenizers under tokenizers releases before the fix of huggingface/tokenizers#1553,
    PR #1640) no token overlaps a sensitive span, so I_init is empty and PALU's L_sens is silently 0.  Special
    tokens (EOS) and whitespace-only tokens may be zero-width."""
    special = None
    for n, (tid, (a, b)) in enumerate(zip(ids, offsets)):
        if a != b:
            continue
        if special is None:
            special = set(tokenizer.all_special_ids)
        if tid in special or not tokenizer.decode([tid]).strip():
            continue
        import tokenizers

        raise ZeroWidthOffsets(
            f"{where + ': ' if where else ''}the tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__!r} "
            f"returns a zero-width character offset ({a}, {b}) for token {n} ({tokenizer.decode([tid])!r}, id {tid}); "
            f"refusing it: sensitive spans could not be mapped to tokens, so I_init would be empty and PALU's "
            f"L_sens silently 0. This is a known tokenizers bug for Llama-3 tokenizers (huggingface/tokenizers#1553); "
            f"installed tokenizers=={tokenizers.__version__}: install the version of requirements.lock "
            f"(pip install -c requirements.lock tokenizers)")


def token_mask_from_spans(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """Token i is sensitive when its character range ``[a, b)`` overlaps a span ``[s, e)`` (``a < e`` and ``b > s``)."""
    return [a < b and any(a < e and b > s for s, e in spans) for a, b in offsets]


def split_init_common(sensitive: list[bool], n_init: int | None) -> tuple[list[bool], list[bool]]:
    """``I_init`` = the first ``n_init`` tokens of each run of consecutive sensitive tokens (all of it when
    ``n_init`` is None); "common" = the tokens outside every run. The rest of a run is in neither."""
    init, common = [], []
    run = 0
    for s in sensitive:
        run = run + 1 if s else 0
        init.append(s and (n_init is None or run <= n_init))
        common.append(not s)
    return init, common
