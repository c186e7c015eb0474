"""A config field declared once with its meaning and, where it takes a fixed set of values, its choices
(:func:`setting`), and the one check of those choices (:func:`check_choices`): used by the run config's sections
(palu_ds.config) and by the QA options they extend (palu_ds.data.qa); ``palu-ds config`` prints both."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable


def setting(default: Any = dataclasses.MISSING, help: str = "", *, factory: Callable | None = None,
            choices: tuple | None = None):
    """A config field with its one-line meaning (``help``) and, for a fixed set of values, its ``choices`` (checked
    by :func:`check_choices`); both are printed by ``palu-ds config`` (palu_ds.config_doc)."""
    meta = {"help": help, **({"choices": tuple(choices)} if choices else {})}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def check_choices(node, path: str, error: type[Exception] = ValueError, fields=None) -> None:
    """Every field of dataclass ``node`` (``fields``: only these) with ``choices`` holds one of them (a list: each
    item), through every section; else ``error`` naming the dotted key, the choices and the value."""
    for f in fields or dataclasses.fields(node):
        v, key = getattr(node, f.name), f"{path}.{f.name}".lstrip(".")
        if dataclasses.is_dataclass(v):
            check_choices(v, key, error)
        choices = f.metadata.get("choices")
        if choices and v is not None:
            bad = [x for x in (v if isinstance(v, list) else [v]) if x not in choices]
            if bad:
                names = [str(c) for c in choices]
                either = f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]
                raise error(f"{'each item of ' if isinstance(v, list) else ''}{key} must be {either}, got {bad[0]!r}")
