"""The one entry point for an in-memory model: :func:`evaluate` (used by ``palu_eval/run.py``), and
:func:`trainer_evaluator`, the callable the entry points hand the engine (the library never imports this package)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

from .config import SuiteConfig, as_suite_config
from .results import EvalOutput


def evaluate(model, tokenizer, suite_cfg: Any, *, out_dir=None, **overrides) -> EvalOutput:
    """Run the TOFU or MUSE suite on ``model`` (a Hugging Face causal LM, or a DeepSpeed engine / DDP wrapper
    around one) and return an :class:`~palu_eval.results.EvalOutput` (``.summary`` is a flat dict of metrics,
    ``.examples`` the per-example records).

    ``suite_cfg``: a :class:`~palu_eval.config.SuiteConfig`, a dict or a dataclass with its field names;
    ``overrides`` replace fields (e.g. ``max_examples=50``).  Call it on EVERY rank when torch.distributed is
    initialized: examples are split across ranks and gathered, and every rank gets the full output.  With
    ``out_dir``, rank 0 writes ``results.json`` and ``summary.json`` there.  The model is put in eval mode and its
    training mode restored afterwards; no gradients are kept.
    """
    from . import muse, tofu
    from palu_ds import dist

    cfg = as_suite_config(suite_cfg)
    if overrides:
        cfg = as_suite_config({**cfg.to_dict(), **overrides})
    suite = {"tofu": tofu, "muse": muse}[cfg.suite]
    was_training = model.training
    model.eval()
    try:
        out = suite.run(model, tokenizer, cfg)
    finally:
        model.train(was_training)
    out.meta.update(cfg.extra)
    if out_dir is not None:
        if dist.is_main():
            out.write(out_dir)
        dist.barrier()
    return out


def trainer_evaluator(run_cfg) -> Optional[Callable[..., dict]]:
    """The engine's evaluator for a training run (:class:`palu_ds.config.RunConfig`), None when no evaluation runs
    during training (``eval.every`` 0 and no ``eval.epochs``).

    ``evaluator(model, tokenizer, step=N, out_dir=DIR)`` runs :func:`evaluate` with the run's ``eval`` section
    (:meth:`SuiteConfig.from_run`, checked here, before any model loads), labels summary.json with the step and
    the method, and returns the flat summary.  Every rank calls it."""
    if not run_cfg.eval.enabled:
        return None
    suite = SuiteConfig.from_run(run_cfg)
    dtype = run_cfg.eval.dtype

    def evaluator(model, tokenizer, *, step: int, out_dir: str) -> dict:
        cfg = dataclasses.replace(suite, extra={"step": step, "method": run_cfg.method.name,
                                                **({"dtype": dtype} if dtype else {})})
        return evaluate(cast_copy(model, dtype) if dtype else model, tokenizer, cfg, out_dir=out_dir).summary

    return evaluator


def cast_copy(model, dtype: str):
    """A copy of the Hugging Face model inside ``model`` (a DeepSpeed engine or the model) in ``dtype``, built as
    ``from_pretrained(saved_dir, dtype=dtype)`` builds it, so an in-training evaluation with ``eval.dtype`` scores what
    ``palu_eval/run.py --dtype`` scores on the saved model.  Needs unpartitioned weights (ZeRO stage <= 2, no LoRA
    adapter): anything else is an error saying so."""
    import torch

    from .scoring import is_zero3, unwrap

    hf = unwrap(model)
    if is_zero3(model) or not hasattr(hf, "_from_config") or getattr(hf, "peft_config", None):
        raise ValueError("eval.dtype evaluates a cast copy of the model, which needs its whole weights on each rank: "
                         "ZeRO stage <= 2 and no LoRA adapter; set eval.dtype: null to evaluate the model as trained")
    copy = type(hf)._from_config(hf.config, dtype=getattr(torch, dtype))
    copy.load_state_dict(hf.state_dict())
    return copy.to(next(hf.parameters()).device).eval()
