"""What ``palu_eval/run.py`` refuses, each with the path and what is wrong (exit 2, no traceback): a model path that
is missing, a file, an empty folder, a folder without ``config.json`` (a data folder, say) or without weights, a
weight file that does not read (truncated, corrupt); weights holding NaN/inf; scores holding NaN/inf."""

from __future__ import annotations

import math
import numbers
import os
import re

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name: left to the hub loader
_DATA_FILES = (".json", ".jsonl", ".parquet", ".arrow", ".csv", ".txt")


class BadInput(ValueError):
    """Evaluation input that cannot be used; the message names the path (or metric) and what is wrong."""


def check_model_path(path: str) -> None:
    """A local model folder that transformers can load (config.json, readable weight files), or a hub id."""
    if not os.path.exists(path):
        if _HUB_ID.match(path) and not path.startswith((".", "~")):
            return  # a hub name: the hub loader names what is wrong
        raise BadInput(f"--model {path}: no such folder")
    if not os.path.isdir(path):
        raise BadInput(f"--model {path}: is a file; give the model's folder (config.json + weights)")
    names = sorted(os.listdir(path))
    if not names:
        raise BadInput(f"--model {path}: the folder is empty (no config.json, no weights)")
    if "config.json" not in names and "adapter_config.json" not in names:  # a model, or a PEFT adapter
        data = [n for n in names if n.endswith(_DATA_FILES)]
        hint = f"; it holds {', '.join(data[:3])}: a data folder?" if data else ""
        raise BadInput(f"--model {path}: not a model folder (no config.json){hint}")
    weights = [n for n in names if n.endswith((".safetensors", ".bin"))]
    if not weights:
        raise BadInput(f"--model {path}: no weight files (*.safetensors or *.bin) beside its config")
    from safetensors import safe_open

    for name in weights:
        if name.endswith(".safetensors"):
            try:
                with safe_open(os.path.join(path, name), framework="pt"):
                    pass
            except Exception as e:  # noqa: BLE001 - any unreadable weight file is named
                raise BadInput(f"--model {path}: {name} does not read (truncated or corrupt: {e}); copy or save "
                               "the model again") from None


def check_finite_weights(model, path: str) -> None:
    """Every parameter finite, else the parameters holding NaN/inf are named."""
    import torch

    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise BadInput(f"--model {path}: the weights hold NaN/inf in {len(bad)} tensor(s): {', '.join(bad[:5])}"
                       f"{' ...' if len(bad) > 5 else ''}; a diverged or damaged model, not evaluated")


def check_finite_scores(examples: dict) -> dict:
    """``examples`` (part -> records) when every per-example score is finite, else an error naming the first bad
    ones (called by the suites before their aggregates)."""
    bad = []
    for part, records in examples.items():
        for r in records:
            for key, v in r.items():
                values = v if isinstance(v, list) else [v]
                if any(isinstance(x, numbers.Real) and not isinstance(x, bool) and not math.isfinite(float(x))
                       for x in values):
                    bad.append(f"{part} example {r.get('index', '?')} {key}")
    if bad:
        raise BadInput(f"the scores hold NaN/inf ({len(bad)} value(s): {', '.join(bad[:5])}"
                       f"{' ...' if len(bad) > 5 else ''}): the model's outputs overflow; not written")
    return examples
