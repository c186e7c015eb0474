"""Read QA / text records from a local .json/.jsonl file, a local folder of `<config>.jsonl` files, a `datasets`
``save_to_disk`` folder, or the hub.

Hub names go through ``datasets.load_dataset(name, config, split=...)`` (e.g. ``locuslab/TOFU`` + ``forget10``);
``save_to_disk`` folders (``dataset_info.json`` + ``state.json`` + arrow files, or a ``DatasetDict`` with
``dataset_dict.json``; e.g. PALU's ``forget01_with_common_words_gpt``) go through ``datasets.load_from_disk``;
local files are read directly so that a malformed line is reported with its line number.  Training data
(:func:`load_records`) and the evaluation suites (``palu_eval.data``) read through here.
"""

from __future__ import annotations

import json
import os

from palu_ds.data.errors import DataError


class Records(list):
    """The records of a JSONL file; ``lines[i]`` is the 1-based line of record ``i`` (blank lines are skipped)."""

    lines: list[int]


def _read_text(path: str) -> str:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = raw.rfind(b"\n", 0, e.start) + 1
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(path, f"line {line}", None,
                        f"is not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start - line_start + 1})",
                        "save the file as UTF-8") from None


def read_json_records(path: str) -> list:
    """The records of one .jsonl (one JSON value a line) or .json file (a list; or an object holding it under
    ``data`` or ``train``; or one string, as MUSE's raw files): a bad line, an empty file or a non-list is a
    :class:`DataError` naming the file and the line."""
    path = str(path)
    text = _read_text(path)
    if path.endswith(".jsonl"):
        rows = Records()
        rows.lines = []
        for i, line in enumerate(text.split("\n")):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(path, f"line {i + 1}", None, f"not valid JSON ({e.msg})",
                                "fix or remove that line") from e
            rows.lines.append(i + 1)
        if not rows:
            raise DataError(path, None, None, "holds no records (the file is empty)", "check the path and the file")
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if not text.strip():
            raise DataError(path, None, None, "holds no records (the file is empty)", "check the path and the file")
        raise DataError(path, f"line {e.lineno}", None, f"not valid JSON ({e.msg}, column {e.colno})") from e
    for key in ("data", "train"):
        if isinstance(data, dict) and isinstance(data.get(key), list):
            data = data[key]
    if isinstance(data, str):  # MUSE raw files hold one string
        data = [data]
    if not isinstance(data, list):
        raise DataError(path, None, None, f"expected a JSON list of records, got {type(data).__name__}")
    if not data:
        raise DataError(path, None, None, "holds no records (an empty list)", "check the path and the file")
    return data


def is_saved_dataset(path: str) -> bool:
    """A folder written by ``datasets`` ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return os.path.isdir(path) and (os.path.isfile(os.path.join(path, "dataset_dict.json")) or (
        os.path.isfile(os.path.join(path, "state.json")) and os.path.isfile(os.path.join(path, "dataset_info.json"))))


def _read_saved_dataset(path: str, split: str) -> list:
    import datasets  # lazy: heavy import

    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:  # noqa: BLE001 - re-raised with the folder named
        raise DataError(path, None, None, f"is not a readable datasets save_to_disk folder ({e})",
                        "write it again with Dataset.save_to_disk") from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(path, None, None, f"is a DatasetDict without the split {split!r} (it has {list(ds)})",
                            "set data.<name>.split to one of them")
        ds = ds[split]
    return [dict(r) for r in ds]


def load_records(source: str, config: str | None = None, split: str = "train") -> list:
    """Return the records (dicts, or strings for raw text) of ``source``.

    ``source`` is a .json/.jsonl path, a ``datasets`` ``save_to_disk`` folder (a ``DatasetDict`` one: ``split``
    picks the split), a folder holding ``<config>.jsonl`` / ``<config>.json`` / a ``<config>`` save_to_disk folder,
    or a hub dataset name (then ``config`` is its configuration, e.g. ``forget10``).
    """
    if os.path.isfile(source):
        return read_json_records(source)
    if is_saved_dataset(source):  # config names nothing inside a dataset folder
        return _read_saved_dataset(source, split)
    if os.path.isdir(source):
        if not config:
            raise DataError(source, None, None, "is a folder", "name the file inside it with a config (e.g. forget10)")
        for ext in (".jsonl", ".json"):
            path = os.path.join(source, config + ext)
            if os.path.isfile(path):
                return read_json_records(path)
        if is_saved_dataset(os.path.join(source, config)):
            return _read_saved_dataset(os.path.join(source, config), split)
        raise DataError(source, None, None, f"has no {config}.jsonl, {config}.json or {config}/ save_to_disk folder",
                        "check the config name")
    if source.endswith((".json", ".jsonl")) or os.sep in source.strip("./") and not _looks_like_hub_name(source):
        raise DataError(source, None, None, "file not found", "check the path")
    return load_hub(source, config, split)


def load_hub(name: str, config: str | None, split: str,
             fix: str = "give a local .json/.jsonl path instead when offline") -> list:
    """The rows of hub dataset ``name`` (configuration ``config``, split ``split``) as dicts; a failure is a
    :class:`DataError` naming the dataset, with ``fix`` saying what to do."""
    import datasets  # lazy: heavy import

    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001 - re-raised with the source named
        raise DataError(f"{name}[{config}]", None, None, f"could not be loaded from the hub (split {split!r}: "
                        f"{type(e).__name__}: {e})", fix) from e
    return [dict(r) for r in ds]


def _looks_like_hub_name(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "/"))
