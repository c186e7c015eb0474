"""Load a DeepSpeed JSON config and fill its ``"auto"`` values from the run config and world size.

One file then serves any world size: ``train_batch_size = micro_batch × grad_accum × world``. On a CPU accelerator
(no FusedAdam) an un-offloaded Adam is torch's fused ``torch.optim.AdamW`` (one pass over the parameters instead
of a loop over tensors; 7x faster on a 108M-parameter step, 2 threads).

Precision is decided here, once (:func:`resolve_precision`), from ``train.precision`` and the JSON's
``bf16.enabled``: ``"auto"`` in the JSON follows ``train.precision``; ``train.precision: auto`` follows the JSON
(its ``"auto"``: bf16 on an accelerator, fp32 on CPU); an explicit JSON value that contradicts an explicit
``train.precision`` is an error. bf16 is ``torch_autocast`` (bf16) at every ZeRO stage: the weights stay fp32 and
are themselves the master weights (ZeRO partitions them; Adam's state and the accumulated gradients are fp32), only
the matrix products (and, under ZeRO, the Linear weights' all-gathers and gradient reductions) run in bf16. The
JSON's ``bf16`` section is always turned off, for two reasons:

* stage 0: DeepSpeed's own bf16 keeps bf16 gradients and accumulates in bf16;
* ZeRO 1-3 (issue 29): DeepSpeed's bf16 needs the model in bf16 before ``deepspeed.initialize``, so its fp32 master
  partitions are made from bf16-rounded weights: every master starts exactly on the bf16 grid, and the bf16 copy the
  forward runs on moves only once a master has drifted half a bf16 ulp (|w|/512 to |w|/256), about 50 Adam steps
  at lr 1e-5 for |w| ~ 0.15. The masters did accumulate every update (SmolLM2, 2-rank ZeRO-3, npo, lr 1e-5, 8
  steps: master change cosine 0.97 with fp32's, same norm), but the forward saw 7.7% of the weights move and the
  objective fell 16.3 -> 12.7 where fp32's fell to 4.3. Under autocast each product rounds the fp32 weight
  afresh, whose sub-bf16 part is kept, so small updates flip a rounding in proportion to their size and the
  products follow the weights on average: the same run now falls 16.3 -> 4.6, its weight change at cosine 0.997
  with fp32's. The saved model is the fp32 weights. Test: tests/test_engine_e2e.py::
  test_bf16_under_zero3_moves_the_weights_as_fp32_does. (A checkpoint stored in bf16 starts on the grid either way;
  its products then lag as any bf16 training's do, while the norms and embeddings, fp32 under autocast, do not --
  unless ``train.bf16_dither`` spreads the start over the bf16 cells: palu_ds.dither.)
  Memory: under ZeRO-3 the fp32 partitions are the masters (no bf16 partition beside them); under ZeRO 1-2 each
  rank holds fp32 weights and gradients, not bf16 ones.

The loss terms take bf16 logits and compute in fp32 (palu_ds.losses); the engine runs them outside autocast.
"""

from __future__ import annotations

import copy
import json

import torch


PRECISIONS = ("auto", "fp32", "bf16")  # train.precision


def _is_auto(v) -> bool:
    return v == "auto"


def resolve_precision(ds: dict, precision: str, on_cpu: bool) -> str:
    """``fp32`` or ``bf16`` from ``train.precision`` and the JSON's ``bf16.enabled`` (see the module docstring)."""
    given = (ds.get("bf16") or {}).get("enabled", "auto")
    if precision == "auto":
        return ("fp32" if on_cpu else "bf16") if _is_auto(given) else ("bf16" if given else "fp32")
    if not _is_auto(given) and bool(given) != (precision == "bf16"):
        raise ValueError(f'train.precision={precision} but the DeepSpeed config sets "bf16": {{"enabled": '
                         f'{str(given).lower()}}}: set it to "auto" (train.precision decides) or drop '
                         "train.precision")
    return precision


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
        if "foreach" not in params:
            params.setdefault("fused", True)
    if resolve_precision(ds, getattr(train, "precision", "auto"), on_cpu) == "bf16":  # at every stage (docstring)
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", **ds.get("torch_autocast", {})}
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": False}
    sect = ds.get("fp16")
    if sect is not None and _is_auto(sect.get("enabled", "auto")):
        sect["enabled"] = False
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


def autocast_dtype(ds: dict) -> torch.dtype | None:
    """The dtype of the filled config's ``torch_autocast`` (None: off): the engine runs the LM head under it too,
    outside the model's forward, where DeepSpeed's own autocast does not reach."""
    sect = ds.get("torch_autocast") or {}
    return getattr(torch, str(sect.get("dtype", "bfloat16")).removeprefix("torch.")) if sect.get("enabled") else None
