"""Loaders for the TOFU and MUSE evaluation files, local or from the Hugging Face hub, with field checks.

TOFU: ``--data`` is a folder of ``<config>.jsonl`` (one JSON object a line, as in ``locuslab/TOFU``) or a hub
name loaded with ``datasets.load_dataset(name, config)``.
MUSE: ``--data`` is a folder holding ``knowmem/ verbmem/ privleak/`` (or ``<corpus>/knowmem/...``) with the
files of ``muse-bench/MUSE-News`` / ``MUSE-Books``, or a hub name (default ``muse-bench/MUSE-<Corpus>``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

TOFU_HUB = "locuslab/TOFU"


class DataError(ValueError):
    """A missing file, row or field; the message says which and what to do."""


def _read_json_or_jsonl(path: Path) -> list:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {n + 1} is not valid JSON ({e})") from e
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e
    if isinstance(data, dict) and "train" in data:
        data = data["train"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
    return data


def _load_hub(name: str, config: str | None, split: str, hint: str) -> list:
    try:
        import datasets

        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001 - re-raised with what to do
        raise DataError(
            f"could not load hub dataset {name!r} (config {config!r}, split {split!r}): {type(e).__name__}: {e}. "
            f"{hint}") from e
    return [dict(r) for r in ds]


def check_fields(rows: Sequence, fields: dict[str, type], source: str, what: str) -> None:
    """Each row must be a dict with every field of the right type (``list`` = non-empty list of strings)."""
    if not rows:
        raise DataError(f"{source}: no rows ({what})")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{source}: row {i} is a {type(row).__name__}, expected an object with {list(fields)}")
        for f, typ in fields.items():
            if f not in row or row[f] is None:
                raise DataError(f"{source}: row {i} has no field {f!r} (it has {sorted(row)}); {what} rows need "
                                f"{list(fields)}. Fix the file or choose splits that do not need it (--splits).")
            v = row[f]
            ok = (isinstance(v, str) if typ is str else
                  isinstance(v, list) and len(v) > 0 and all(isinstance(x, str) for x in v))
            if not ok:
                raise DataError(f"{source}: row {i} field {f!r} should be "
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
                rows = _read_json_or_jsonl(base / name)
                break
        else:
            have = sorted(p.name for p in base.glob("*.json*"))
            raise DataError(f"{base}/{config}.jsonl not found (the folder has {have or 'no .json/.jsonl files'}). "
                            f"Put the TOFU file {config}.jsonl there (one JSON object a line), or pass --data "
                            f"{TOFU_HUB} to load it from the hub.")
    else:
        source = f"{data}:{config}"
        rows = _load_hub(data, config, "train", f"Pass --data DIR with {config}.jsonl to use local files.")
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
                rows = _read_json_or_jsonl(base / folder / name)
                break
        else:
            raise DataError(f"{base / folder / names[0]} not found: MUSE {corpus} needs {folder}/{names[0]} under "
                            f"--data (a folder with knowmem/ verbmem/ privleak/, or with {corpus}/ holding them), "
                            f"or --data {muse_hub_name(corpus)} to load from the hub.")
    else:
        source = f"{data}:{hub_config}/{hub_split}"
        rows = _load_hub(data, hub_config, hub_split, "Pass --data DIR with the MUSE json files to use local files.")
    if fields is None:
        texts = []
        for i, r in enumerate(rows):
            t = r.get("text") if isinstance(r, dict) else r
            if not isinstance(t, str) or not t:
                raise DataError(f"{source}: row {i} should be a non-empty string (or an object with a 'text' "
                                f"string), got {r!r:.80}")
            texts.append(t)
        if not texts:
            raise DataError(f"{source}: no rows")
        return texts
    check_fields(rows, fields, source, f"MUSE {corpus} {part}")
    return rows
