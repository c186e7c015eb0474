"""What to evaluate (:class:`SuiteConfig`) and the retain-model results that forget quality / PrivLeak compare to."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from palu_ds.config import ConfigError, EvalSuite
from palu_ds.data.prompt import PromptFormat

SUITES = ("tofu", "muse")
TOFU_PARTS = ("forget", "retain", "real_authors", "world_facts", "holdout")
MUSE_PARTS = ("verbmem", "knowmem_forget", "knowmem_retain", "privleak")


class MissingRetainResults(RuntimeError):
    """Forget quality / PrivLeak were asked for but the retain model's results are missing or do not fit."""


@dataclass
class SuiteConfig(EvalSuite):
    """One evaluation suite run: the fields of :class:`palu_ds.config.EvalSuite` (shared with the run config's
    ``eval`` section), then ``forget_quality``, ``prompt`` and ``extra``.

    * ``suite``: ``"tofu"`` or ``"muse"``.
    * ``split``: TOFU forget split (``forget01`` / ``forget05`` / ``forget10``); MUSE corpus (``news`` / ``books``).
    * ``data``: local folder or hub name (default ``locuslab/TOFU``, ``muse-bench/MUSE-<Corpus>``).
    * ``splits``: which parts run (TOFU: forget, retain, real_authors, world_facts, holdout; MUSE: verbmem,
      knowmem_forget, knowmem_retain, privleak); ``None`` = all.
    * ``max_new_tokens``: overrides the suite defaults (TOFU 200; MUSE VerbMem 128, KnowMem 32).
    * ``max_length``: longest scored sequence in tokens (default TOFU 512, MUSE 2048).
    * ``max_examples``: first N rows of each part (``None`` = all).
    * ``k``: Min-K% / Min-K%++ fraction (0.4 as in open-unlearning's and MUSE's configs).
    * ``retain_results``: results JSON (or its folder) of the same suite run on the retain model; for TOFU also
      open-unlearning's ``TOFU_EVAL.json`` of the retain model (its ``retain_logs_path``), see
      :mod:`palu_eval.open_unlearning`.
    * ``prompt``: how a question and its answers become tokens (:class:`palu_ds.data.prompt.PromptFormat`: chat
      template as open-unlearning applies it, system prompt, date string) -- the same as the model was trained with.
    * ``forget_quality``: False omits the retain-relative metrics (forget quality, PrivLeak) instead of raising
      when ``retain_results`` is missing.
    """

    forget_quality: bool = True
    prompt: PromptFormat = field(default_factory=PromptFormat)
    extra: dict = field(default_factory=dict)  # free-form labels copied into summary.json (run name, step)

    def __post_init__(self):
        if isinstance(self.prompt, dict):
            self.prompt = PromptFormat(**self.prompt)
        if self.suite not in SUITES:
            raise ValueError(f"suite must be one of {SUITES}, got {self.suite!r}")
        if isinstance(self.splits, str):
            self.splits = tuple(s.strip() for s in self.splits.split(",") if s.strip())
        allowed = TOFU_PARTS if self.suite == "tofu" else MUSE_PARTS
        if self.splits is not None:
            self.splits = tuple(self.splits)
            bad = [s for s in self.splits if s not in allowed]
            if bad or not self.splits:
                raise ValueError(f"unknown {self.suite} splits {bad or '(none given)'}; choose from {list(allowed)}")
        if not 0 < self.k <= 1:
            raise ValueError(f"k must be in (0, 1], got {self.k}")
        if self.suite == "tofu" and not re.fullmatch(r"forget\d+", self.split):
            raise ValueError(f"TOFU split must look like forget01 / forget05 / forget10, got {self.split!r}")
        if self.suite == "muse" and self.split not in ("news", "books"):
            raise ValueError(f"MUSE split is the corpus: 'news' or 'books', got {self.split!r}")

    @classmethod
    def from_run(cls, run_cfg) -> "SuiteConfig":
        """The suite of a training run (:class:`palu_ds.config.RunConfig`): its ``eval`` section, the prompt format
        the model is trained with, forget quality exactly when retain results are given.  A bad value is a
        :class:`~palu_ds.config.ConfigError` naming the ``eval`` key, raised before any model loads."""
        e = run_cfg.eval
        try:
            return cls(**{f.name: getattr(e, f.name) for f in dataclasses.fields(EvalSuite)},
                       forget_quality=bool(e.retain_results), prompt=run_cfg.data.prompt)
        except ValueError as err:
            raise ConfigError(f"eval: {err}") from None

    @property
    def parts(self) -> tuple[str, ...]:
        return self.splits or (TOFU_PARTS if self.suite == "tofu" else MUSE_PARTS)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["splits"] = list(self.parts)
        return d


def as_suite_config(cfg: Any) -> SuiteConfig:
    """A :class:`SuiteConfig` from itself, a dict, or another dataclass / object with the same field names."""
    if isinstance(cfg, SuiteConfig):
        return cfg
    if dataclasses.is_dataclass(cfg):
        cfg = dataclasses.asdict(cfg)
    elif not isinstance(cfg, dict):
        cfg = {k: v for k, v in vars(cfg).items() if not k.startswith("_")}
    names = {f.name for f in dataclasses.fields(SuiteConfig)}
    unknown = sorted(set(cfg) - names)
    if unknown:
        raise ValueError(f"unknown evaluation config keys {unknown}; known: {sorted(names)}")
    return SuiteConfig(**cfg)


def retain_command(cfg: SuiteConfig) -> str:
    data = f" --data {cfg.data}" if cfg.data else ""
    return (f"python palu_eval/run.py --model RETAIN_MODEL --suite {cfg.suite} --split {cfg.split}{data} "
            f"--no-forget-quality --out RETAIN_EVAL_DIR")


def load_retain_results(cfg: SuiteConfig, needed_parts: list[str]) -> Optional[dict]:
    """The retain model's results JSON, checked against ``cfg``; None when ``cfg.forget_quality`` is False or
    nothing needs it.  Raises :class:`MissingRetainResults` saying what to run when it is missing or does not fit."""
    if not cfg.forget_quality or not needed_parts:
        return None
    how = (f"Evaluate the retain model (trained without the forget set) first:\n  {retain_command(cfg)}\n"
           f"then pass --retain-results RETAIN_EVAL_DIR/results.json (retain_results= in a config), "
           f"or pass --no-forget-quality (forget_quality=False) to leave these metrics out.")
    if not cfg.retain_results:
        raise MissingRetainResults(
            f"{'forget quality' if cfg.suite == 'tofu' else 'PrivLeak'} compares with a retain model, but no retain "
            f"results were given. {how}")
    path = Path(cfg.retain_results)
    if path.is_dir():
        found = [path / n for n in ("results.json", "TOFU_EVAL.json") if (path / n).is_file()]
        path = found[0] if found else path / "results.json"
    if not path.is_file():
        raise MissingRetainResults(f"retain results {path} not found. {how}")
    try:
        res = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MissingRetainResults(f"retain results {path} is not valid JSON ({e}). {how}") from None
    from .open_unlearning import NotOpenUnlearningLog, OU_MIN_K, is_tofu_eval, tofu_eval_as_results

    if is_tofu_eval(res):  # open-unlearning's TOFU_EVAL.json (its retain_logs_path)
        if cfg.suite != "tofu":
            raise MissingRetainResults(f"retain results {path} are an open-unlearning TOFU log, but this run is "
                                       f"suite {cfg.suite!r}. {how}")
        try:
            res = tofu_eval_as_results(res, cfg.split, str(path))
        except NotOpenUnlearningLog as e:
            raise MissingRetainResults(f"{e}. {how}") from None
        if abs(cfg.k - OU_MIN_K) > 1e-12 and "holdout" in needed_parts:
            raise MissingRetainResults(f"retain results {path} are an open-unlearning log, whose Min-K% uses "
                                       f"k={OU_MIN_K}; this run has k={cfg.k}: pass --k {OU_MIN_K}.")
    if res.get("suite") != cfg.suite or res.get("split") != cfg.split:
        raise MissingRetainResults(
            f"retain results {path} are for suite {res.get('suite')!r} split {res.get('split')!r}, but this run is "
            f"suite {cfg.suite!r} split {cfg.split!r}. {how}")
    missing = [p for p in needed_parts if not res.get("examples", {}).get(p)]
    if missing:
        raise MissingRetainResults(f"retain results {path} have no per-example values for {missing} (that run had "
                                   f"splits {res.get('config', {}).get('splits')}). {how}")
    rk = res.get("config", {}).get("k")
    if rk is not None and abs(rk - cfg.k) > 1e-12 and any("privleak" in p or p == "holdout" for p in needed_parts):
        raise MissingRetainResults(f"retain results {path} used Min-K k={rk}, this run k={cfg.k}; use the same k.")
    res["_path"] = str(path)
    return res
