"""The configuration reference (palu_ds.config_doc, `palu-ds config`): generated from the typed config and the
registry, complete, and docs/config.md is current."""
import dataclasses
import os

import pytest

from palu_ds import cli
from palu_ds.config import RANGES, ConfigError, RunConfig, load_config
from palu_ds.config_doc import DOC_PATH, config_rows, render
from palu_ds.methods import METHODS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_docs_config_md_is_current():
    with open(os.path.join(ROOT, DOC_PATH), encoding="utf-8") as f:
        assert f.read() == render(), f"{DOC_PATH} is stale: regenerate it with `palu-ds config --write`"


def test_palu_ds_config_prints_the_reference(capsys):
    assert cli.main(["config"]) == 0
    assert capsys.readouterr().out == render()


def _leaf_keys(cls, prefix=""):
    for f in dataclasses.fields(cls):
        tp = cls.__annotations__.get(f.name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from _leaf_keys(type(default), f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", tp


def test_every_key_has_a_type_a_meaning_and_its_range():
    rows = {k: (t, d, a, m) for k, t, d, a, m in config_rows()}
    keys = [k for k, _ in _leaf_keys(RunConfig)]
    assert keys and set(keys) <= set(rows)
    assert not [k for k, (_, _, _, m) in rows.items() if not m.strip()], "keys without a meaning"
    for key, kind, low, high, *_ in RANGES:  # every checked range is shown where its key is
        assert str(low) in rows[key][2], (key, rows[key])
    assert rows["train.scheduler"][2] == "one of constant, linear, cosine"
    assert rows["train.max_steps"][:3] == ("int or null", "null", "integer >= 1, or null")


def test_every_method_and_hyper_parameter_is_documented():
    text = render()
    for name, m in METHODS.items():
        section = text.split(f"### {name}\n", 1)[1].split("\n### ", 1)[0]
        assert m.doc in section
        for k in m.defaults:
            assert f"| {k} | " in section, (name, k)
    assert "| K | 5000 | integer >= 1, or null |" in text


@pytest.mark.parametrize("value,message", [
    ("[mlflow]", "each item of log.report_to must be wandb, got 'mlflow'"),
    ("wandb", "log.report_to must be a list"),
])
def test_an_unknown_tracker_is_a_config_error(value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["model.path=m", "data.forget.source=f", "method.name=sft", "reference.mode=none",
                           f"log.report_to={value}"])
