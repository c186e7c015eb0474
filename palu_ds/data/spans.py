"""Sensitive spans: from labels (PALU's ``target_words``) or from a detector, mapped to answer tokens.

PALU (arXiv 2601.03190) localizes unlearning to the first tokens of each sensitive span: consecutive sensitive
tokens form a span, ``I_init`` is the first ``N`` tokens of each span, and every other answer token that lies
outside all spans (EOS included) is "common". The rest of a span is neither.
"""

from __future__ import annotations

import json
import re

from palu_ds.data.errors import DataError

# Function words, the generic words of biography QA and plain praise; a word outside this list is a candidate fact
# word.  Topic nouns that facts are made of ("French literature", "writing style", "Tolstoy Literary Award",
# "character development") are NOT here: they join the fact words next to them.
STOP_WORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before being below between both
but by can could did do does doing down during each few for from further had has have having he her here hers
herself him himself his how i if in into is it its itself just me more most my myself no nor not now of off on once
only or other our ours ourselves out over own same she should so some such than that the their theirs them
themselves then there these they this those through to too under until up very was we were what when where which
while who whom why will with would you your yours yourself yourselves one two many much well known often notable
author authors writer writers book books work works novel novels wrote written writes write born birth
name named full father mother parents parent profession job received won receive wins
themes theme theme's inspired inspiration influence influenced life career early later first second known
famous fictitious fictional is's has been like including include includes often frequently particularly especially
deeply heavily largely mainly primarily mostly strongly widely significantly unique distinct title titled called
features feature featured story stories people person world readers reader
also various several within across among toward towards upon s worked works published studied
university adapted stage lives lived living now before after explores explored writes wrote yes indeed however
certainly absolutely sure prestigious renowned esteemed celebrated distinctive compelling remarkable rich innovative
""".split())
# lower-case words that continue a capitalised title across them ("Promise by the Seine", "River of Jasmine"); a
# preposition only before "the" ("by the Seine"), so that "Kestria on May 3" or "Atlas by Kalo Vomi" stay apart
_TITLE_GLUE = frozenset("of the and de le la les du des von van".split())
_TITLE_PREP = frozenset("by in on at for to from with under over".split())
_TIME_MODIFIERS = frozenset({"early", "late", "mid"})  # "early 1980s"
_DETERMINERS = frozenset("the a an his her their its this that these those our my your".split())

_WORD = re.compile(r"[\w][\w'\u2019\-./+]*[\w+]|\w\+?")  # a trailing + is part of a word: "LGBTQ+"
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


def _is_cap(word: str) -> bool:
    return word[:1].isupper() or word[:1].isdigit()


def _name_runs(question: str, answer: str) -> set[str]:
    """The capitalised runs of the question that name someone (lower-cased bases): runs of 2+ capitalised words,
    or one possessive word, of which some occurrence (question or answer) is possessive or is followed by something
    other than a lower-case content word -- "Kalo Vomi's", "Kalo Vomi was", "Kalo Vomi?".  A run always followed by
    a lower-case content word modifies it ("the African American genre"), and one after a determiner is a thing
    ("his Historical Fiction"): those are kept."""
    def runs(text: str):
        ws = list(_WORD.finditer(text))
        j = 0
        while j < len(ws):
            if ws[j].group(0)[:1].isupper() and _base(ws[j].group(0)) not in STOP_WORDS:  # not "What", "Has"
                k = j
                while (k + 1 < len(ws) and not _POSSESSIVE.search(ws[k].group(0)) and ws[k + 1].group(0)[:1].isupper()
                       and text[ws[k].end():ws[k + 1].start()] in (" ", "-")):
                    k += 1
                nxt = ws[k + 1].group(0) if k + 1 < len(ws) and text[ws[k].end():ws[k + 1].start()] == " " else None
                possessive = bool(_POSSESSIVE.search(ws[k].group(0)))
                modifies = nxt is not None and not possessive and nxt[:1].islower() and _base(nxt) not in STOP_WORDS
                # "his Historical Fiction", "the Prix Goncourt": a determiner makes it a thing, not the person
                modifies = modifies or (j > 0 and ws[j - 1].group(0).lower() in _DETERMINERS)
                yield " ".join(_base(w.group(0)) for w in ws[j:k + 1]), k - j + 1, possessive, modifies
                j = k + 1
            else:
                j += 1

    in_question = {key for key, *_ in runs(question)}
    names, modifiers = set(), set()
    for key, n, possessive, modifies in list(runs(question)) + list(runs(answer)):
        if key in in_question and (n >= 2 or possessive):
            (modifiers if modifies else names).add(key)
    return names


def detect_spans(question: str, answer: str) -> list[tuple[int, int]]:
    """Network-free detector of the sensitive spans of a QA answer (what PALU's GPT labels mark: names, places,
    dates, titles, and the noun phrases of the facts: "French literature", "writing style", "LGBTQ+").

    * fact words: every word outside :data:`STOP_WORDS`, and every capitalised word that does not open a sentence;
      facts repeated from the question count (a genre or identity asked about is still the fact) -- except the name
      of the person asked about (:func:`_name_runs`), which is context, not the fact;
    * spans are maximal runs of fact words separated by spaces or hyphens; a comma or colon joins only capitalised or
      numeric words ("Kuwait City, Kuwait", "May 3, 1950", "...Leadership: A Blueprint"), not a list of unrelated
      words;
    * titles continue across lower-case function words between capitalised words ("Promise by the Seine"), and a
      quoted title keeps its opening "The" ("The Nightingale of Paris"); "early / late / mid" + a number is a date.
    """
    names = _name_runs(question, answer)
    words = list(_WORD.finditer(answer))
    n = len(words)

    def opens_sentence(j: int) -> bool:
        return j == 0 or re.search(r"[.!?][\"\u201d']?\s+$", answer[words[j - 1].end():words[j].start()]) is not None

    def gap(j: int) -> str:  # text between word j - 1 and word j
        return answer[words[j - 1].end():words[j].start()]

    fact = []
    for j, m in enumerate(words):
        w = m.group(0)
        fact.append(_base(w) not in STOP_WORDS or (w[:1].isupper() and not opens_sentence(j) and w != "I"))
    for j in range(n - 1):
        if _base(words[j].group(0)) in _TIME_MODIFIERS and words[j + 1].group(0)[:1].isdigit() and gap(j + 1) == " ":
            fact[j] = True
    def glue(k: int) -> bool:
        w = words[k].group(0)
        return w in _TITLE_GLUE or (w in _TITLE_PREP and k + 1 < n and words[k + 1].group(0) == "the")

    j = 1
    while j < n:  # lower-case glue words inside a capitalised title
        if words[j - 1].group(0)[:1].isupper() and glue(j):
            k = j
            while k < n and glue(k) and gap(k) == " ":
                k += 1
            if k < n and gap(k) == " " and words[k].group(0)[:1].isupper():
                for i in range(j, k):
                    fact[i] = True
            j = k
        j += 1
    for j in range(n - 1):  # a quoted title's opening "The"
        if words[j].group(0) in ("The", "A", "An") and gap(j + 1) == " " and words[j + 1].group(0)[:1].isupper() and (
                j > 0 and gap(j).endswith(('"', "\u201c"))):
            fact[j] = True

    spans: list[list] = []
    for j, m in enumerate(words):
        if not fact[j]:
            continue
        joins = j > 0 and fact[j - 1] and spans and (
            re.fullmatch(r"[ \-]+", gap(j)) or (re.fullmatch(r"[,:] ?", gap(j)) and _is_cap(words[j].group(0))
                                                 and _is_cap(words[j - 1].group(0))))
        if joins:
            spans[-1][1], spans[-1][2] = m.end(), spans[-1][2] + [j]
        else:
            spans.append([m.start(), m.end(), [j]])
    out = []
    for s, e, idx in spans:
        lead = 0  # the leading capitalised run (up to a possessive): the asked-about person's name when it is one
        while lead < len(idx) and words[idx[lead]].group(0)[:1].isupper():
            lead += 1
            if _POSSESSIVE.search(words[idx[lead - 1]].group(0)):
                break
        if lead and " ".join(_base(words[i].group(0)) for i in idx[:lead]) in names and not (
                s > 0 and answer[s - 1] in "\"\u201c"):
            if lead == len(idx):
                continue
            s = words[idx[lead]].start()
        out.append((s, e - 1 if answer[e - 1] == "." else e))
    return out


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

        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ZeroWidthOffsets(
            f"{where + ': ' if where else ''}the tokenizer {name!r} "
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
