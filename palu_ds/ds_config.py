"""Load a DeepSpeed JSON config and fill its ``"auto"`` values from the run config and world size.

One file then serves any world size: ``train_batch_size = micro_batch × grad_accum × world``. On a CPU accelerator
(no bf16 kernels worth using, no FusedAdam) precision is fp32 and an un-offloaded Adam is ``torch.optim.AdamW``.
"""

from __future__ import annotations

import copy
import json


def _is_auto(v) -> bool:
    return v == "auto"


def fill_ds_config(ds: dict, train, world: int, on_cpu: bool) -> dict:
    ds = copy.deepcopy(ds)
    micro, gas = train.batch_size, train.grad_accum
    for key, value in (("train_micro_batch_size_per_gpu", micro), ("gradient_accumulation_steps", gas),
                       ("train_batch_size", micro * gas * world), ("gradient_clipping", train.max_grad_norm)):
        if _is_auto(ds.get(key, "auto")):
            ds[key] = value
    if ds["train_batch_size"] != ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world:
        raise ValueError(f"DeepSpeed config: train_batch_size {ds['train_batch_size']} != micro batch "
                         f"{ds['train_micro_batch_size_per_gpu']} × grad accum {ds['gradient_accumulation_steps']} "
                         f"× world {world}; use \"auto\"")
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = opt.setdefault("params", {})
    for key, value in (("lr", train.lr), ("weight_decay", train.weight_decay)):
        if _is_auto(params.get(key, "auto")):
            params[key] = value
    for key, value in (("betas", [0.9, 0.999]), ("eps", 1e-8)):
        if _is_auto(params.get(key, value)):
            params[key] = value
    offload = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") not in ("none", None)
    if on_cpu and not offload and opt.get("type", "").lower() in ("adam", "adamw"):
        params["torch_adam"] = True
    for prec in ("bf16", "fp16"):
        sect = ds.get(prec)
        if sect is not None and _is_auto(sect.get("enabled", "auto")):
            sect["enabled"] = (prec == "bf16") and not on_cpu
    ds.pop("scheduler", None) if _is_auto(ds.get("scheduler")) else None
    return ds


def load_ds_config(path: str, train, world: int, on_cpu: bool) -> dict:
    with open(path, encoding="utf-8") as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e
    return fill_ds_config(raw, train, world, on_cpu)


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))
