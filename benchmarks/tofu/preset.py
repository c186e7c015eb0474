"""Presets: one YAML file per experiment -- ``presets/mini.yaml``, ``presets/real.yaml`` or a file of the user's own
(their model, data, split, methods and grid).  A preset states what differs from :data:`DEFAULTS` (the schema: an
unknown key is an error naming it); ``--set key.path=value`` overrides a key (values parsed as YAML), ``--data DIR``
the TOFU folder.  Paths are relative to the repository root."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from palu_ds.config import apply_overrides, read_yaml

ROOT = Path(__file__).resolve().parents[2]
#: keys with a fixed set of values
CHOICES = {("data", "kind"): ("authors", "tofu"), ("data", "perturbed"): ("borrow", "tofu"),
           ("lr", "choice"): ("rule", "table")}
PRESETS = Path(__file__).resolve().parent / "presets"
#: sections whose keys are free (a recipe's train.* overrides, a table by method, run or family)
OPEN = {"sft", "unlearn", "params", "runs", "table", "grid", "tiny", "scale_to_vocab", "pairs"}
DEFAULTS = {
    "title": "TOFU", "report": "tofu", "seed": 0,
    # kind: authors = a range of TOFU authors (data.build_splits), tofu = TOFU's own forget split (data.build_tofu);
    # extra_authors (kind tofu): authors the target learns besides the retain authors and the split
    "data": {"tofu": None, "kind": "tofu", "split": "forget01", "retain_authors": 4, "utility_rows": None,
             "extra_authors": [], "authors": None, "forget": None, "perturbed": "borrow", "pretrain": None},
    "model": {"path": None, "fetch": None, "tiny": None},  # a folder, a palu_ds.models.fetch name, or a tiny Llama
    "max_length": 256, "ranks": 1, "threads": None, "ds_config": "ds_configs/cpu/zero2.json",
    "configs": {"sft": "launch/configs/finetune.yaml", "unlearn": "launch/configs/tofu_real.yaml"},
    "sft": {}, "pretrain_epochs": 8, "unlearn": {},
    "methods": "all", "params": {}, "scale_to_vocab": {}, "runs": {},
    "ablations": {"method": None, "grid": {}},
    # choice: rule (every run at lr.value, default the SFT lr) | table (lr.table by family; choosing it on development
    # authors is the efficacy protocol's grid below)
    "lr": {"choice": "rule", "value": None, "table": {}},
    "spans": {"labels": None},
    "eval": {"parts": ["forget", "retain", "real_authors", "world_facts"], "ranks": 1, "dtype": "auto",
             "base": False, "position_nll": False, "max_new_tokens": None},
    "footnote": "",
    # the efficacy protocol (benchmarks/tofu/protocol.py, BENCHMARKS issue 25): set dev to run it instead of the above
    "protocol": {"dev": None, "pairs": {}, "method": None, "lrs": [], "epochs": [], "dev_utility_rows": 20,
                 "perturbed": "forget05_perturbed", "labels_first_author": None, "utility_floor": 0.95,
                 "seed_rerun": 1, "n_boot": 10000, "fq_goal": 0.5,
                 "fp32_check": None},
}


def _merge(base: dict, raw: dict, where: str, path: str = "") -> dict:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: {path or 'the preset'} must be a mapping, got {raw!r}")
    out = copy.deepcopy(base)
    for k, v in raw.items():
        key = f"{path}.{k}".lstrip(".")
        if k not in base:
            raise ValueError(f"{where}: unknown key {key}; valid: {sorted(base)}")
        sub = isinstance(base[k], dict) and k not in OPEN and v is not None
        out[k] = _merge(base[k], v, where, key) if sub else v
    return out


def preset_path(name: str) -> Path:
    """``mini`` / ``real`` -> the shipped file; anything else is a path."""
    shipped = PRESETS / f"{name}.yaml"
    path = shipped if shipped.exists() and "/" not in name else Path(name)
    if not path.is_file():
        shipped = ", ".join(p.stem for p in sorted(PRESETS.glob("*.yaml")))
        raise ValueError(f"--preset {name}: neither a shipped preset ({shipped}) nor a file")
    return path


def repo_path(p: str | None) -> Path | None:
    """A preset path: absolute, or relative to the repository root."""
    return None if p is None else ROOT / p


def load(name: str, overrides=(), data: str | None = None) -> dict:
    """The preset ``name`` merged over :data:`DEFAULTS`, ``overrides`` applied; the data folder checked."""
    path = preset_path(name)
    raw = read_yaml(str(path))  # errors name the file, the line and the key (a key given twice too)
    try:
        raw = apply_overrides(raw, list(overrides))
    except (yaml.YAMLError, ValueError) as e:  # a --set value that is not YAML, a key that is not a section
        raise ValueError(f"{path}: {e}") from None
    preset = _merge(DEFAULTS, raw, str(path))
    if data:
        preset["data"]["tofu"] = data
    if not preset["data"]["tofu"]:
        raise ValueError(f"{path}: data.tofu is not set: name the folder of TOFU's jsonl files (or pass --data)")
    for (section, key), values in CHOICES.items():
        if preset[section][key] not in values:
            raise ValueError(f"{path}: {section}.{key} must be one of {values}, got {preset[section][key]!r}")
    if sum(bool(preset["model"][k]) for k in ("path", "fetch", "tiny")) != 1:
        raise ValueError(f"{path}: model needs exactly one of path, fetch, tiny")
    preset["name"] = path.stem
    return preset
