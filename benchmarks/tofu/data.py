"""Stage 1, the data, from TOFU's files (pure functions), written as JSON lines: :func:`build_splits` (``kind:
authors``) and :func:`build_tofu` (``kind: tofu``) each return ``{"files": {name: rows}, "info"}``, the info naming the
``forget_split``, the ``retain_split`` (the retain model's SFT rows) and the ``target_split`` (the target's)."""

from __future__ import annotations

import functools
import json
import random
import re
from collections import Counter
from pathlib import Path

from palu_ds.atomic import write_text
from palu_ds.data.io import read_json_records

ROWS_PER_AUTHOR = 20
N_PERTURBED = 5


def parse_authors(text: str, n_total: int | None = None) -> tuple[int, int]:
    """``"A:B"`` -> ``(A, B)``, authors A..B-1 (B > A >= 0; B <= n_total when given)."""
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
    if not m:
        raise ValueError(f"data.authors must look like 'A:B' (e.g. '0:40'), got {text!r}")
    a, b = int(m.group(1)), int(m.group(2))
    if b <= a:
        raise ValueError(f"data.authors {text}: the end must be after the start")
    if n_total is not None and b > n_total:
        raise ValueError(f"data.authors {text}: the data has {n_total} authors")
    return a, b


def parse_forget(text: str) -> int:
    """``"10%"`` / ``"10"`` / ``"0.1"`` -> 10 (an integer percentage, as TOFU's forget01/05/10)."""
    s = str(text).strip()
    pct = float(s.rstrip("%"))
    if not s.endswith("%") and 0 < pct < 1:
        pct *= 100
    if abs(pct - round(pct)) > 1e-9 or not 1 <= round(pct) <= 99:
        raise ValueError(f"data.forget must be an integer percentage between 1% and 99%, got {text!r}")
    return int(round(pct))


def split_authors(a: int, b: int, pct: int) -> tuple[list[int], list[int]]:
    """``(retain_authors, forget_authors)``: the forget authors are the last ``pct``% of ``a..b-1`` (at least one,
    at least one author kept)."""
    authors = list(range(a, b))
    n_forget = max(1, int(round(len(authors) * pct / 100)))
    if n_forget >= len(authors):
        raise ValueError(f"{pct}% of {len(authors)} authors leaves no retain author: widen data.authors")
    return authors[:-n_forget], authors[-n_forget:]


def author_ids(authors) -> list[int]:
    """Row numbers of the given authors in TOFU's ``full.jsonl``: author i = rows 20i .. 20i+19, in order."""
    return [ROWS_PER_AUTHOR * a + k for a in authors for k in range(ROWS_PER_AUTHOR)]


def author_rows(full: list[dict], authors: list[int]) -> list[tuple[int, dict]]:
    """``(row index, row)`` of the given authors (:func:`author_ids`), in order."""
    out = []
    for i in authors:
        lo, hi = ROWS_PER_AUTHOR * i, ROWS_PER_AUTHOR * (i + 1)
        if hi > len(full):
            raise ValueError(f"author {i} needs rows {lo}..{hi - 1} but full.jsonl has {len(full)} rows")
        out += [(r, full[r]) for r in range(lo, hi)]
    return out


def split_names(pct: int) -> tuple[str, str]:
    """TOFU's names: ``("forget10", "retain90")``."""
    return f"forget{pct:02d}", f"retain{100 - pct}"


def tofu_perturbed_index(full: list[dict], perturbed_files: list[list[dict]]) -> dict[int, dict]:
    """Row index of ``full`` -> TOFU's perturbed record for it, matched on (question, answer) (the last file wins)."""
    by_qa = {(r["question"], r["answer"]): r for rows in perturbed_files for r in rows}
    return {i: by_qa[qa] for i, r in enumerate(full) if (qa := (r["question"], r["answer"])) in by_qa}


_CAPS = re.compile(r"[A-Z][\w\-]*(?:'[A-Za-z]+)?(?:\s+[A-Z][\w\-]*(?:'[A-Za-z]+)?)+")
_WORDS = re.compile(r"[\w\-]+")


def author_name(rows: list[dict]) -> str | None:
    """The author's name: the run of >= 2 capitalised words (possessive dropped) found in the most of the author's
    questions, the longest on ties; None when no run occurs in two questions."""
    counts: Counter = Counter()
    for r in rows:
        seen = set()
        for m in _CAPS.finditer(r["question"]):
            toks = [re.sub(r"'s?$", "", t) for t in m.group(0).split()]
            seen |= {" ".join(toks[i:j]) for i in range(len(toks)) for j in range(i + 2, len(toks) + 1)}
        counts.update(seen)
    if not counts:
        return None
    name, n = max(counts.items(), key=lambda kv: (kv[1], len(kv[0].split())))
    return name if n >= 2 else None


@functools.lru_cache(maxsize=None)
def question_words(question: str, name: str | None) -> frozenset[str]:
    """Lower-case words of a question without the author's name (so that questions of two authors compare)."""
    if name:
        for t in [name] + name.split():
            question = re.sub(r"\b" + re.escape(t) + r"(?:'s)?\b", " ", question)
    return frozenset(re.sub(r"'s$", "", w.lower()) for w in _WORDS.findall(question))


def rename(text: str, src: str | None, dst: str | None) -> str:
    """``text`` about author ``src`` made about ``dst``: the full name, then its first and last word."""
    if not src or not dst:
        return text
    out = text.replace(src, dst)
    s, d = src.split(), dst.split()
    if len(s) >= 2 and len(d) >= 2:
        for a, b in ((s[0], d[0]), (s[-1], d[-1])):
            out = re.sub(r"\b" + re.escape(a) + r"\b", b, out)
    return out


def borrowed_perturbations(idx: int, row: dict, donors: list[tuple[int, dict]], names: dict[int, str | None],
                           seed: int) -> list[str]:
    """``N_PERTURBED`` plausible false answers: for each donor author (``donors``: rows of authors outside the
    range), its row whose question is closest to ``row``'s (Jaccard of :func:`question_words`); the closest donors'
    answers, renamed to this author (:func:`rename`).  Ties are broken by a generator seeded with ``(seed, idx)``."""
    me = idx // ROWS_PER_AUTHOR
    mine = question_words(row["question"], names.get(me))
    best: dict[int, tuple[float, dict]] = {}
    for j, r in donors:
        a = j // ROWS_PER_AUTHOR
        theirs = question_words(r["question"], names.get(a))
        sim = len(mine & theirs) / max(1, len(mine | theirs))
        if a != me and (a not in best or sim > best[a][0]):
            best[a] = (sim, r)
    rng = random.Random(f"mini_tofu:{seed}:{idx}")  # the name of the first version: the same answers as its runs
    out: list[str] = []
    for a, (_, r) in sorted(best.items(), key=lambda kv: (-kv[1][0], rng.random())):
        text = rename(r["answer"], names.get(a), names.get(me))
        if text != row["answer"] and text not in out:
            out.append(text)
        if len(out) == N_PERTURBED:
            break
    if not out:
        raise ValueError(f"row {idx}: no donor answers")
    return out + out[:1] * (N_PERTURBED - len(out))  # fewer donor authors: repeat (the truth ratio averages them)


def evenly(items: list, k: int | None) -> list:
    """At most ``k`` items spread evenly over ``items`` (all when ``k`` is None or >= len), order kept."""
    if k is None or k >= len(items):
        return list(items)
    return [items[(i * len(items)) // k] for i in range(k)]


def _qa(idx: int, r: dict) -> dict:
    return {"question": r["question"], "answer": r["answer"], "author": idx // ROWS_PER_AUTHOR, "row": idx}


def _perturbed(idx: int, r: dict, para: str, false: list[str], question: str, source: str) -> dict:
    return {**_qa(idx, r), "paraphrased_answer": para, "perturbed_answer": false, "paraphrased_question": question,
            "perturbed_source": source}


def _borrowed(full: list[dict], a: int, b: int, pre: list[int], seed: int):
    """``rows -> perturbed rows`` of ``data.perturbed borrow``: false answers of the authors outside a..b-1 and the
    pre-training authors (:func:`borrowed_perturbations`)."""
    outside = [i for i in range(len(full) // ROWS_PER_AUTHOR) if not a <= i < b and i not in pre]
    if len(outside) < N_PERTURBED:
        raise ValueError(f"data.perturbed borrow takes false answers from TOFU authors outside the range (and "
                         f"data.pretrain): {a}:{b} leaves {len(outside)}, it needs {N_PERTURBED}")
    donors = author_rows(full, outside)
    names = {i: author_name(full[ROWS_PER_AUTHOR * i: ROWS_PER_AUTHOR * (i + 1)]) for i in [*range(a, b), *outside]}
    return lambda part: [_perturbed(idx, r, r["answer"], borrowed_perturbations(idx, r, donors, names, seed),
                                    r["question"], "borrow") for idx, r in part]


def _tofu_rows(tofu_perturbed: dict[int, dict]):
    """``rows -> perturbed rows`` of ``data.perturbed tofu``: TOFU's own, for the rows it covers."""
    return lambda part: [_perturbed(idx, r, t["paraphrased_answer"], list(t["perturbed_answer"]),
                                    t.get("paraphrased_question", r["question"]), "tofu") for idx, r in part
                         if (t := tofu_perturbed.get(idx)) is not None]


def build_splits(full: list[dict], tofu_perturbed: dict[int, dict], refusals: list[str], a: int, b: int, pct: int,
                 mode: str = "borrow", seed: int = 0, retain_eval_rows: int | None = None,
                 pretrain: tuple[int, int] | None = None) -> dict:
    """Everything the run writes to ``OUT/data``: ``{"files": {name: rows}, "info": {...}}``.

    ``mode="borrow"``: every row gets built perturbed answers (see the module doc); ``"tofu"``: TOFU's own perturbed
    rows, restricted to the rows TOFU covers.  ``retain_perturbed`` (the utility rows) holds at most
    ``retain_eval_rows`` rows spread evenly over the kept authors (TOFU's holds 400 of its 3,600 retain rows).
    ``pretrain=(P, Q)``: the QA of authors P..Q-1 (outside the range) go to a ``pretrain`` file, and those authors
    give no perturbed answers (a model pre-trained on them would know the "false" answers)."""
    retain_a, forget_a = split_authors(a, b, pct)
    forget_name, retain_name = split_names(pct)
    rows, forget_rows, retain_rows = (author_rows(full, x) for x in (list(range(a, b)), forget_a, retain_a))
    pre = list(range(*pretrain)) if pretrain else []
    if pre and (pre[0] < b and a < pre[-1] + 1):
        raise ValueError(f"data.pretrain {pretrain[0]}:{pretrain[1]} overlaps data.authors {a}:{b}")
    perturbed = _borrowed(full, a, b, pre, seed) if mode == "borrow" else _tofu_rows(tofu_perturbed)
    forget_pert = perturbed(forget_rows)
    if mode == "tofu":  # subsample among the covered rows
        retain_pert = evenly(perturbed(retain_rows), retain_eval_rows)
    else:  # only the kept rows get (costly) built answers
        retain_pert = perturbed(evenly(retain_rows, retain_eval_rows))
    if not forget_pert:
        raise ValueError(f"data.perturbed tofu: TOFU has no perturbed answers for the forget authors {forget_a[0]}.."
                         f"{forget_a[-1]} (it covers authors 0-19 and 180-199): use data.perturbed borrow or another "
                         "range")
    if not retain_pert:
        raise ValueError("data.perturbed tofu: TOFU has no perturbed answers for any retain author of this range")
    files = {"full": [_qa(i, r) for i, r in rows], forget_name: [_qa(i, r) for i, r in forget_rows],
             retain_name: [_qa(i, r) for i, r in retain_rows], f"{forget_name}_perturbed": forget_pert,
             "retain_perturbed": retain_pert, "idontknow": [{"answer": t} for t in refusals]}
    if pre:
        files["pretrain"] = [_qa(i, r) for i, r in author_rows(full, pre)]
    return with_rows(files, {
        "authors": [a, b], "forget_pct": pct, "forget_authors": forget_a, "retain_authors": retain_a,
        "forget_split": forget_name, "retain_split": retain_name, "target_split": "full", "perturbed": mode,
        "pretrain_authors": list(pretrain) if pretrain else None,
        "tofu_perturbed_rows_in_range": sum(1 for i, _ in rows if i in tofu_perturbed)})


def write_jsonl(folder: str | Path, files: dict[str, list[dict]]) -> dict[str, str]:
    """Each file as ``folder/<name>.jsonl``; an unchanged file is not rewritten (its mtime keeps stages reused)."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    out = {}
    for name, rows in files.items():
        p = Path(folder) / f"{name}.jsonl"
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        if not p.exists() or p.read_text(encoding="utf-8") != text:
            write_text(p, text)
        out[name] = str(p)
    return out


def tokenizer_texts(files: dict[str, list[dict]], forget_name: str) -> list[str]:
    """The range's questions, answers, paraphrased/perturbed answers, the refusal strings and the pre-training
    authors' QA (``data.pretrain``)."""
    from palu_ds.tiny import qa_texts

    pert = {r["row"]: r for name in (f"{forget_name}_perturbed", "retain_perturbed") for r in files[name]}
    rows = [{**r, **pert.get(r["row"], {})} for r in files["full"]]
    return qa_texts(rows + files.get("pretrain", [])) + [r["answer"] for r in files["idontknow"]]


# ------------------------------------------------------------------------------------- kind: tofu (the real preset)
def need(tofu: Path, names) -> None:
    missing = [n for n in names if not (tofu / f"{n}.jsonl").exists()]
    if missing:
        raise FileNotFoundError(f"{tofu}: missing {', '.join(n + '.jsonl' for n in missing)} (TOFU's files; the "
                                "preset's data.tofu or --data names the folder)")


def build_tofu(tofu: Path, split: str, retain_authors: int | None, utility_rows: int | None, extra_authors=()) -> dict:
    """TOFU's ``split`` forgotten; retain = the first ``retain_authors`` authors (None: TOFU's whole retain split);
    the target learns retain + ``extra_authors`` (e.g. development authors) + forget; utility rows spread evenly (None:
    all)."""
    names = ["full", split, f"{split}_perturbed", "retain_perturbed", "real_authors_perturbed", "world_facts_perturbed",
             "idontknow"]
    need(tofu, names)
    full, forget, forget_pert, retain_pert, real, world, refusals = (read_json_records(tofu / f"{n}.jsonl")
                                                                      for n in names)
    n_forget_authors = len(forget) // ROWS_PER_AUTHOR
    first_forget = len(full) // ROWS_PER_AUTHOR - n_forget_authors
    if full[ROWS_PER_AUTHOR * first_forget:] != forget:
        raise ValueError(f"{tofu / (split + '.jsonl')}: not the last {len(forget)} rows of full.jsonl")
    if retain_authors is not None and not 1 <= retain_authors <= 20:
        raise ValueError(f"data.retain_authors must be 1..20 (TOFU's perturbed answers cover authors 0-19), "
                         f"got {retain_authors}")
    if extra_authors and retain_authors is None:
        raise ValueError("data.extra_authors needs data.retain_authors: without it every author is in forget or retain")
    clash = [a for a in extra_authors if a < retain_authors or a >= first_forget]
    if clash:
        raise ValueError(f"data.extra_authors {list(extra_authors)} overlap the retain authors 0..{retain_authors - 1} "
                         f"or the forget authors {first_forget}..{len(full) // ROWS_PER_AUTHOR - 1} ({clash})")
    retain = full[:ROWS_PER_AUTHOR * (first_forget if retain_authors is None else retain_authors)]
    extra = [full[i] for i in author_ids(extra_authors)]
    if [(r["question"], r["answer"]) for r in forget_pert] != [(r["question"], r["answer"]) for r in forget]:
        raise ValueError(f"{tofu / (split + '_perturbed.jsonl')}: its rows are not those of {split}.jsonl")
    pert_index = tofu_perturbed_index(full, [retain_pert])
    files = {"target": retain + extra + forget, "retain": retain, split: forget, f"{split}_perturbed": forget_pert,
             "retain_perturbed": evenly([pert_index[i] for i in range(len(retain)) if i in pert_index], utility_rows),
             "real_authors_perturbed": evenly(real, utility_rows), "world_facts_perturbed": evenly(world, utility_rows),
             "idontknow": refusals}
    return with_rows(files, {"split": split, "forget_split": split, "retain_split": "retain", "target_split": "target",
                             "forget_authors": list(range(first_forget, first_forget + n_forget_authors)),
                             "retain_authors": len(retain) // ROWS_PER_AUTHOR, "extra_authors": list(extra_authors)})


def forget_files(full: list[dict], ids: list[int], split: str, sources: list[Path], what: str) -> dict:
    """Rows ``ids`` of ``full`` as the forget split ``split`` and, as ``<split>_perturbed``, TOFU's perturbed records
    for them from the files ``sources``; a row none of them covers is an error naming ``what`` (whose rows)."""
    index = tofu_perturbed_index(full, [read_json_records(p) for p in sources])
    missing = [i for i in ids if i not in index]
    if missing:
        raise ValueError(f"{', '.join(map(str, sources))}: no perturbed answers for rows {missing[:5]} of {what}")
    return {split: [full[i] for i in ids], f"{split}_perturbed": [index[i] for i in ids]}


def with_rows(files: dict, info: dict) -> dict:
    """A builder's result: ``{"files", "info"}``, the info with the row count of each file."""
    return {"files": files, "info": {**info, "rows": {k: len(v) for k, v in files.items()}}}


def build(cfg: dict, tofu: Path, seed: int) -> dict:
    """The run's data from the preset's ``data`` section (``kind``: authors | tofu)."""
    if cfg["kind"] == "tofu":
        return build_tofu(tofu, cfg["split"], cfg["retain_authors"], cfg["utility_rows"] or None, cfg["extra_authors"])
    need(tofu, ["full", "idontknow"])
    full = read_json_records(tofu / "full.jsonl")
    a, b = parse_authors(str(cfg["authors"]), len(full) // ROWS_PER_AUTHOR)
    pretrain = parse_authors(str(cfg["pretrain"]), len(full) // ROWS_PER_AUTHOR) if cfg["pretrain"] else None
    perturbed = [read_json_records(tofu / f"{p}.jsonl") for p in ("retain_perturbed", "forget01_perturbed",
                 "forget05_perturbed", "forget10_perturbed") if (tofu / f"{p}.jsonl").exists()]
    refusals = [r["answer"] for r in read_json_records(tofu / "idontknow.jsonl")]
    return build_splits(full, tofu_perturbed_index(full, perturbed), refusals, a, b, parse_forget(cfg["forget"]),
                        cfg["perturbed"], seed, cfg["utility_rows"] or None, pretrain)
