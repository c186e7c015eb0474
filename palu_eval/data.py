"""Loaders for the TOFU and MUSE evaluation files, local or from the Hugging Face hub, with field checks.  Files and
the hub are read by the library's readers (:mod:`palu_ds.data.io`); bad input is its :class:`DataError`.

TOFU: ``--data`` is a folder of ``<config>.jsonl`` (one JSON object a line, as in ``locuslab/TOFU``) or a hub
name loaded with ``datasets.load_dataset(name, config)``.
MUSE: ``--data`` is a folder holding ``knowmem/ verbmem/ privleak/`` (or ``<corpus>/knowmem/...``) with the
files of ``muse-bench/MUSE-News`` / ``MUSE-Books``, or a hub name (default ``muse-bench/MUSE-<Corpus>``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from palu_ds.data.errors import DataError
from palu_ds.data.io import load_hub, read_json_records

TOFU_HUB = "locuslab/TOFU"


def check_fields(rows: Sequence, fields: dict[str, type], source: str, what: str) -> None:
    """Each row must be a dict with every field of the right type (``list`` = non-empty list of strings)."""
    if not rows:
        raise DataError(source, None, None, f"no rows ({what})")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(source, None, None, f"row {i} is a {type(row).__name__}, expected an object with "
                            f"{list(fields)}")
        for f, typ in fields.items():
            if f not in row or row[f] is None:
                raise DataError(source, None, None, f"row {i} has no field {f!r} (it has {sorted(row)}); {what} rows "
                                f"need {list(fields)}", "fix the file or choose splits that do not need it (--splits)")
            v = row[f]
            ok = (isinstance(v, str) if typ is str else
                  isinstance(v, list) and len(v) > 0 and all(isinstance(x, str) for x in v))
            if not ok:
                raise DataError(source, None, None, f"row {i} field {f!r} should be "
                                f"{'a string' if typ is str else 'a non-empty list of strings'}, got {v!r:.80}")


# ----------------------------------------------------------------------------------------------------------- TOFU
def load_tofu(data: str | None, config: str, fields: dict[str, type]) -> list[dict]:
    """Rows of TOFU config ``config`` (e.g. ``forget10_perturbed``) from a local folder or the hub."""
    data = data or TOFU_HUB
    base = Path(data)
    if base.is_dir():
        for name in (f"{config}.jsonl", f"{config}.json"):
            if (base / name).is_file():
                source = str(base / name)
                rows = read_json_records(base / name)
                break
        else:
            have = sorted(p.name for p in base.glob("*.json*"))
            raise DataError(f"{base}/{config}.jsonl", None, None, f"not found (the folder has "
                            f"{have or 'no .json/.jsonl files'})", f"put the TOFU file {config}.jsonl there (one JSON "
                            f"object a line), or pass --data {TOFU_HUB} to load it from the hub")
    else:
        source = f"{data}:{config}"
        rows = load_hub(data, config, "train", f"pass --data DIR with {config}.jsonl to use local files")
    check_fields(rows, fields, source, f"TOFU {config}")
    return rows


# ----------------------------------------------------------------------------------------------------------- MUSE
#: (local folder, local file candidates, hub config, hub split) per MUSE part
MUSE_FILES = {
    "verbmem_forget": ("verbmem", ["forget.json"], "verbmem", "forget"),
    "knowmem_forget_qa": ("knowmem", ["forget_qa.json"], "knowmem", "forget_qa"),
    "knowmem_forget_qa_icl": ("knowmem", ["forget_qa_icl.json"], "knowmem", "forget_qa_icl"),
    "knowmem_retain_qa": ("knowmem", ["retain2_qa.json", "retain_qa.json"], "knowmem", "retain_qa"),
    "knowmem_retain_qa_icl": ("knowmem", ["retain2_qa_icl.json", "retain_qa_icl.json"], "knowmem", "retain_qa_icl"),
    "privleak_forget": ("privleak", ["forget.json"], "privleak", "forget"),
    "privleak_holdout": ("privleak", ["holdout.json"], "privleak", "holdout"),
}


def muse_hub_name(corpus: str) -> str:
    return f"muse-bench/MUSE-{corpus.capitalize()}"


def load_muse(data: str | None, corpus: str, part: str, fields: dict[str, type] | None) -> list:
    """Rows of one MUSE part (a key of :data:`MUSE_FILES`).  ``fields=None`` means a list of texts (PrivLeak): a
    list of strings, or of objects with a ``text`` field, gives a list of strings."""
    folder, names, hub_config, hub_split = MUSE_FILES[part]
    data = data or muse_hub_name(corpus)
    base = Path(data)
    if base.is_dir():
        if (base / corpus / folder).is_dir():
            base = base / corpus
        for name in names:
            if (base / folder / name).is_file():
                source = str(base / folder / name)
                rows = read_json_records(base / folder / name)
                break
        else:
            raise DataError(str(base / folder / names[0]), None, None, f"not found: MUSE {corpus} needs "
                            f"{folder}/{names[0]} under --data (a folder with knowmem/ verbmem/ privleak/, or with "
                            f"{corpus}/ holding them)", f"or pass --data {muse_hub_name(corpus)} to load from the hub")
    else:
        source = f"{data}:{hub_config}/{hub_split}"
        rows = load_hub(data, hub_config, hub_split, "pass --data DIR with the MUSE json files to use local files")
    if fields is None:
        texts = []
        for i, r in enumerate(rows):
            t = r.get("text") if isinstance(r, dict) else r
            if not isinstance(t, str) or not t:
                raise DataError(source, None, None, f"row {i} should be a non-empty string (or an object with a "
                                f"'text' string), got {r!r:.80}")
            texts.append(t)
        if not texts:
            raise DataError(source, None, None, "no rows")
        return texts
    check_fields(rows, fields, source, f"MUSE {corpus} {part}")
    return rows
