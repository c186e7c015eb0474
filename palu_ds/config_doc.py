"""The configuration reference, generated: every key of the run config (type, default, allowed values, meaning) from
the typed config (:mod:`palu_ds.config`: the dataclasses, their :func:`~palu_ds.config.setting` help and choices, the
numeric ``RANGES``), and every method's hyper-parameters (defaults, ranges, source) from the registry
(:mod:`palu_ds.methods`). ``palu-ds config`` prints it; ``docs/config.md`` is this text (a test fails when stale).
"""

from __future__ import annotations

import dataclasses
import typing

DOC_PATH = "docs/config.md"


def param_range(method, key: str) -> tuple | None:
    """The allowed range of hyper-parameter ``key`` of ``method`` (``(kind, low, high, open_low, nullable)``, as
    palu_ds.config checks it), None when it has none."""
    from palu_ds.methods import PARAM_RANGES

    return PARAM_RANGES.get(key)


def _value(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"' if v == "" else v
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_value(x)}" for k, x in v.items()) + "}"
    return str(v)


def _type(tp) -> str:
    args = typing.get_args(tp)
    if type(None) in args:
        return " or ".join(_type(a) for a in args if a is not type(None)) + " or null"
    if dataclasses.is_dataclass(tp):
        return "section"
    return getattr(tp, "__name__", str(tp))


def describe_range(rule: tuple | None) -> str:
    """``("int", 1, None, False, True)`` -> ``integer >= 1, or null``."""
    if not rule:
        return ""
    kind, low, high, open_low, nullable = rule
    if isinstance(kind, tuple):
        text = "one of " + ", ".join(kind)
    elif kind == "bool":
        text = "true or false"
    else:
        text = "integer" if kind == "int" else "number"
        bounds = ([f"{'>' if open_low else '>='} {low}"] if low is not None else []) + \
                 ([f"<= {high}"] if high is not None else [])
        text += " " + " and ".join(bounds) if bounds else ""
    return text + (", or null" if nullable else "")


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def config_rows(cls=None, prefix: str = "") -> list[tuple[str, str, str, str, str]]:
    """``(key, type, default, allowed, meaning)`` of every key of the run config, sections first-class rows too."""
    from palu_ds.config import RANGES, RunConfig

    cls = cls or RunConfig
    ranges = {key: rule for key, *rule in RANGES}
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        key, tp, default = f"{prefix}{f.name}", hints[f.name], _default(f)
        meaning = f.metadata.get("help", "")
        if dataclasses.is_dataclass(tp):
            rows.append((key, "section", "", "", meaning))
            rows += config_rows(tp, key + ".")
            continue
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        if inner:  # an optional section (data.retain, data.idk): the keys of its type
            rows.append((key, f"section ({inner[0].__name__}) or null", _value(default), "", meaning))
            continue
        many = "each one of " if typing.get_origin(tp) is list or tp is list else "one of "
        allowed = (many + ", ".join(map(str, f.metadata["choices"])) if "choices" in f.metadata
                   else describe_range(tuple(ranges[key])) if key in ranges else "")
        rows.append((key, _type(tp), _value(default), allowed, meaning))
    return rows


def method_sections() -> list[str]:
    """One section per method of the registry: what it is and needs, and its hyper-parameters."""
    from palu_ds.methods import METHODS

    out = []
    for name, m in METHODS.items():
        needs = [f"batches: {', '.join(m.batches)}"]
        if m.reference_parts:
            needs.append(f"reference: {', '.join(sorted(m.reference_parts))}")
        if m.constraint:
            needs.append(f"constraint: the {m.constraint} NLL <= eps (dual variable lambda)")
        lines = [f"### {name}", "", f"{m.doc or name}{'' if m.unlearning else ' (not unlearning)'}. "
                 + "; ".join(needs) + ".", ""]
        if m.defaults:
            lines += ["| method.params key | default | allowed |", "|---|---|---|"]
            lines += [f"| {k} | {_value(v)} | {describe_range(param_range(m, k))} |" for k, v in m.defaults.items()]
        else:
            lines.append("No hyper-parameters.")
        out.append("\n".join(lines))
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render() -> str:
    """The whole reference as Markdown (what ``palu-ds config`` prints and docs/config.md holds)."""
    head = ["# Configuration reference", "",
            "Generated by `palu-ds config` from the typed run config (`palu_ds/config.py`) and the method registry "
            "(`palu_ds/methods.py`); do not edit by hand (`palu-ds config --write` regenerates it, and "
            "`tests/test_config_doc.py` fails when it is stale).", "",
            "A run config is YAML (`--config FILE`) with dotted overrides on the command line (`train.lr=2e-5`). "
            "Unknown keys, values outside these ranges and incompatible settings are errors before any model loads.",
            "", "## Run config", "", "| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    table = [f"| `{k}` | {t} | {_cell(d)} | {_cell(a)} | {_cell(m)} |" for k, t, d, a, m in config_rows()]
    methods = ["", "## Methods (`method.name`) and their hyper-parameters (`method.params`)", "",
               "Defaults are the papers' (sources in each method's line); `method.params` overrides them.", ""]
    return "\n".join(head + table + methods + ["\n\n".join(method_sections())]) + "\n"
