"""The runs of a preset, derived from the registry (palu_ds.methods): parameters (paper defaults, scaled to the
vocabulary where the preset says so), ``Method.family``, ``.uses_spans``, ``.batches`` and ``.reference_key`` (runs of
equal keys share a reference cache).  Nothing here names a method: a method added to the registry runs."""

from __future__ import annotations

import hashlib
import json

from palu_ds import methods as registry
from palu_ds.config import data_sources


def _spec(method: str, params: dict, spans: str | None, vocab: int, preset: dict, group: str) -> dict:
    m = registry.get_method(method)
    p = {k: max(1, min(vocab, round(m.params[k].default * vocab / paper)))
         for k, paper in preset["scale_to_vocab"].items() if k in m.params and m.params[k].default is not None}
    p.update(preset["params"].get(method, {}), **params)
    m.hparams(p)  # unknown parameters are errors here, not in a training log
    labels = "labels" if preset["spans"]["labels"] else "auto"
    return {"method": method, "params": p, "spans": (spans or labels) if m.uses_spans else None,
            "family": m.family, "group": group}


def run_specs(preset: dict, vocab: int) -> dict[str, dict]:
    """``{run: {"method", "params", "spans", "family", "group"[, "ablation"]}}``: the methods, the preset's extra
    ``runs`` and the ablations (an ablation equal to its method's main run is that run, labelled)."""
    methods = preset["methods"]
    if methods == "all":  # every unlearning method of the registry, in its order
        methods = [m.name for m in registry.METHODS.values() if m.unlearning]
    specs = {m: _spec(m, {}, None, vocab, preset, "method") for m in methods}
    for name, r in preset["runs"].items():
        specs[name] = _spec(r["method"], r.get("params", {}), r.get("spans"), vocab, preset, "method")
    method = preset["ablations"]["method"]
    for param, values in preset["ablations"]["grid"].items():
        for v in values:
            spec = _spec(method, {param: vocab if v == "vocab" else v}, None, vocab, preset, "ablation")
            main, m, tag = specs.get(method), registry.get_method(method), "all" if v in ("vocab", None) else v
            same = main is not None and m.hparams(main["params"]) == m.hparams(spec["params"])
            spec = specs.setdefault(method if same else f"{method}_{param}{tag}", spec)
            spec.setdefault("ablation", []).append(f"{param}={tag}" + (f" (={vocab})" if v == "vocab" else ""))
    return specs


def run_lr(spec: dict, preset: dict, family_lr: dict) -> float:
    """A run's unlearning lr: its family's (``family_lr``: the preset's table), else
    ``lr.value``, else the SFT lr (the rule open-unlearning follows)."""
    return family_lr.get(spec["family"], preset["lr"]["value"] or preset["sft"]["lr"])


def reference_dir(spec: dict) -> str | None:
    """The reference cache folder a run shares with every run of the same reference key and spans (None: the method
    needs no reference): ``ref/<parts>-<8 hex digits of the key>``."""
    m = registry.get_method(spec["method"])
    key = m.reference_key(m.hparams(spec["params"]))
    if not key:
        return None
    digest = hashlib.sha256(json.dumps([key, spec["spans"]], sort_keys=True).encode()).hexdigest()[:8]
    return f"ref/{'+'.join(sorted(m.needed_parts(m.hparams(spec['params']))))}-{digest}"


def batch_sources(spec: dict, info: dict, data_dir) -> list[str]:
    """The data overrides of a run: each batch of its method from its file in ``data_dir`` (the forget batch from
    PALU's labels when ``spec["spans"] == "labels"``, set by the caller), every optional source it has no batch for
    set to null (palu_ds.config refuses unused data)."""
    m = registry.get_method(spec["method"])
    files = {"forget": info["forget_split"], "retain": info["retain_split"], "idk": "idontknow"}
    missing = [b for b in m.batches if b not in files]
    if missing:
        raise ValueError(f"method {m.name} reads batches {missing}, which the TOFU data does not provide "
                         f"(it has {sorted(files)})")
    out = [o for b in m.batches for o in (f"data.{b}.source={data_dir}", f"data.{b}.config={files[b]}")]
    return out + [f"data.{b}=null" for b in data_sources(optional=True) if b not in m.batches]
