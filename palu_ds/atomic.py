"""Atomic writes, one copy for the whole tree: write under a temporary name beside the target, then rename it onto
the target (``os.replace``, atomic on POSIX), so that a reader never sees a half-written file or folder -- a crash
leaves the temporary behind, never a torn target.

    with atomic_path("out/model") as tmp:      # a file or a folder, written by anything
        model.save_pretrained(tmp)
    write_json("out/summary.json", summary)    # text, JSON, JSON lines
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from typing import Iterable, Iterator


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[str]:
    """The temporary name ``<path><suffix>`` to write ``path`` under (its folder is created; a stale temporary is
    removed first).  When the block ends without an error the temporary replaces ``path`` (a folder already there
    is removed first); when it raises, ``path`` is left as it was.  ``suffix`` with the process id keeps concurrent
    writers of one file apart (the last one wins, every version whole)."""
    path = os.fspath(path).rstrip("/")
    tmp = path + suffix
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _remove(tmp)
    yield tmp
    if os.path.isdir(tmp) and os.path.isdir(path):
        shutil.rmtree(path)
    os.replace(tmp, path)


def write_text(path: str | os.PathLike, text: str, suffix: str = ".tmp") -> str:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    with atomic_path(path, suffix) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    return os.fspath(path)


def write_json(path: str | os.PathLike, obj, indent: int | None = 1, suffix: str = ".tmp", **dumps_kwargs) -> str:
    """``json.dumps(obj, indent=indent, **dumps_kwargs)`` written to ``path`` atomically; returns ``path``."""
    return write_text(path, json.dumps(obj, indent=indent, **dumps_kwargs), suffix)


def write_jsonl(path: str | os.PathLike, rows: Iterable, **dumps_kwargs) -> str:
    """One JSON value a line, written to ``path`` atomically; returns ``path``."""
    return write_text(path, "".join(json.dumps(r, **dumps_kwargs) + "\n" for r in rows))
