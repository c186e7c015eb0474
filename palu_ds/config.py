"""Typed run configuration: YAML + dotted CLI overrides (``train.lr=1e-5``), validated at parse time.

Unknown keys and incompatible settings raise :class:`ConfigError` naming the key, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml


class ConfigError(ValueError):
    """An invalid configuration; the message names the key and what to do."""


@dataclass
class DataSource:
    source: str = ""  # a .json/.jsonl path, a folder of <config>.jsonl, or a hub dataset name
    config: str | None = None  # hub config / file stem inside a folder (e.g. forget10)
    split: str = "train"  # hub split (MUSE: forget, retain1, ...)
    kind: str = "qa"  # qa | text (MUSE-style raw documents)


@dataclass
class ModelConfig:
    path: str = ""
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    lora: dict | None = None  # peft LoraConfig kwargs, e.g. {r: 8, lora_alpha: 16, target_modules: [q_proj, v_proj]}


@dataclass
class DataConfig:
    forget: DataSource = field(default_factory=DataSource)
    retain: DataSource | None = None
    idk: DataSource | None = None  # refusal strings for idk_dpo (records with an "answer" field)
    question_key: str = "question"
    answer_key: str = "answer"
    spans_key: str = "target_words"
    max_length: int = 256
    n_init: int | None = 3
    span_source: str = "auto"
    span_model: str | None = None


@dataclass
class MethodConfig:
    name: str = "palu"
    params: dict = field(default_factory=dict)  # overrides of the method's paper defaults


@dataclass
class ReferenceConfig:
    mode: str = "precomputed"  # precomputed | resident | none
    model: str | None = None  # defaults to model.path (the model before unlearning)
    cache_dir: str | None = None  # defaults to <output_dir>/reference_cache
    dtype: str = "float16"  # storage dtype of cached values


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    seed: int = 42
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    scheduler: str = "constant"  # constant | linear | cosine
    batch_size: int = 4  # per rank, per micro-batch
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int | None = None  # optimizer steps; overrides epochs
    max_grad_norm: float = 1.0
    save_every: int = 0  # 0: only at the end
    keep_last: int = 2
    resume: str = "auto"  # auto | never | <checkpoint dir>
    max_nonfinite: int = 3  # consecutive non-finite steps before stopping
    answer_only_logits: bool = True  # LM head only where the next token is an answer token (False: full logits)
    head_path: str = "dense"  # dense: the answer rows' logits at once | chunked: head + losses in chunks (issue 17)
    head_chunk_elems: int = 1 << 24  # chunked: logits elements alive at a time (rows = this // vocabulary)


@dataclass
class EvalConfig:
    """Evaluation during training (evaluation.evaluate on every rank, data split across ranks and merged)."""

    every: int = 0  # optimizer steps between evaluations; 0 = off
    suite: str = "tofu"
    split: str = "forget10"  # TOFU forget split / MUSE corpus
    data: str | None = None  # folder or hub name (default: the suite's hub dataset)
    splits: list | None = None  # e.g. [forget, retain]; None = all of the suite
    batch_size: int = 16
    max_new_tokens: int | None = None
    max_examples: int | None = None
    retain_results: str | None = None  # a retain model's results: adds forget quality


@dataclass
class LogConfig:
    tensorboard_dir: str | None = None  # defaults to <output_dir>/tensorboard
    log_every: int = 1


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)


def _build(cls, raw: Any, path: str):
    """Recursively build dataclass ``cls`` from ``raw``; unknown keys are errors naming their dotted path."""
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(f'{path}.{k}'.lstrip('.') for k in unknown)}; valid keys: {sorted(names)}")
    kwargs = {}
    for k, v in raw.items():
        kwargs[k] = _coerce(hints[k], v, f"{path}.{k}".lstrip("."))
    return cls(**kwargs)


def _coerce(tp, v, path):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if v is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], v, path)
    if dataclasses.is_dataclass(tp):
        return _build(tp, v, path)
    if tp is float and isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if tp is float and isinstance(v, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
        try:
            return float(v)
        except ValueError:
            pass
    if tp in (int, str, bool) and not (isinstance(v, tp) and not (tp is int and isinstance(v, bool))):
        raise ConfigError(f"{path}: expected {tp.__name__}, got {v!r}")
    if tp is float and not isinstance(v, float):
        raise ConfigError(f"{path}: expected a number, got {v!r}")
    if (origin or tp) is dict and not isinstance(v, dict):
        raise ConfigError(f"{path}: expected a mapping, got {v!r}")
    return v


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to the nested dict ``raw``."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        key, value = item.split("=", 1)
        node = raw
        parts = key.split(".")
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        node[parts[-1]] = yaml.safe_load(value)
    return raw


def load_config(path: str | None, overrides: list[str] = (), validate: bool = True) -> RunConfig:
    """Load ``path`` (YAML), apply dotted ``overrides``, build and validate the typed config."""
    raw = {}
    if path:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
    raw = apply_overrides(raw, list(overrides))
    cfg = _build(RunConfig, raw, "")
    if validate:
        validate_config(cfg)
    return cfg


def validate_config(cfg: RunConfig, method=None) -> None:
    """Incompatible combinations are errors here, before any model is loaded."""
    if not cfg.model.path:
        raise ConfigError("model.path is empty: give a local model dir or a hub name")
    if not cfg.data.forget.source:
        raise ConfigError("data.forget.source is empty: give the forget (or fine-tuning) data")
    for name in ("forget", "retain", "idk"):
        src = getattr(cfg.data, name)
        if src is not None and src.kind not in ("qa", "text"):
            raise ConfigError(f"data.{name}.kind must be qa or text, got {src.kind!r}")
    if cfg.reference.mode not in ("precomputed", "resident", "none"):
        raise ConfigError(f"reference.mode must be precomputed, resident or none, got {cfg.reference.mode!r}")
    if cfg.train.scheduler not in ("constant", "linear", "cosine"):
        raise ConfigError(f"train.scheduler must be constant, linear or cosine, got {cfg.train.scheduler!r}")
    for key in ("batch_size", "grad_accum", "keep_last", "max_nonfinite", "head_chunk_elems"):
        if getattr(cfg.train, key) < 1:
            raise ConfigError(f"train.{key} must be >= 1")
    if cfg.train.head_path not in ("dense", "chunked"):
        raise ConfigError(f"train.head_path must be dense or chunked, got {cfg.train.head_path!r}")
    if cfg.train.head_path == "chunked" and not cfg.train.answer_only_logits:
        raise ConfigError("train.head_path=chunked computes the head from the answer positions' hidden states: "
                          "it needs train.answer_only_logits: true (or set train.head_path: dense)")
    if cfg.eval.every < 0 or cfg.eval.suite not in ("tofu", "muse"):
        raise ConfigError("eval.every must be >= 0 and eval.suite tofu or muse")
    if cfg.data.n_init is not None and cfg.data.n_init < 1:
        raise ConfigError("data.n_init must be >= 1 (or null for whole spans)")
    if method is None:
        from palu_ds.methods import get_method

        try:
            method = get_method(cfg.method.name)
        except (KeyError, ValueError) as e:
            raise ConfigError(f"method.name: {e}") from None
    unknown = sorted(set(cfg.method.params) - set(method.defaults))
    if unknown:
        raise ConfigError(f"method.params: unknown for {method.name}: {unknown}; valid: {sorted(method.defaults)}")
    hp = {**method.defaults, **cfg.method.params}
    if "N" in cfg.method.params:  # PALU's N is the data's I_init length
        cfg.data.n_init = cfg.method.params["N"]
    if method.uses_dual and (hp.get("epsilon") is None) == (hp.get("epsilon_rel") is None):
        raise ConfigError(f"method.params: {method.name} needs exactly one of epsilon (absolute) and epsilon_rel "
                          "(eps = (1 + a) * L_retain(reference)); set the other to null")
    from palu_ds.reference import needed_parts

    parts = needed_parts(method, hp)
    if not parts and cfg.reference.mode != "none" and (cfg.reference.cache_dir or cfg.reference.model):
        which = "cache_dir" if cfg.reference.cache_dir else "model"
        raise ConfigError(f"method {method.name} is reference-free but reference.{which} is set: "
                          "remove it or set reference.mode: none")
    if parts and cfg.reference.mode == "none":
        raise ConfigError(f"method {method.name} needs the reference ({sorted(parts)}): "
                          "set reference.mode to precomputed or resident")
    if "retain" in method.batches and cfg.data.retain is None:
        raise ConfigError(f"method {method.name} needs a retain set: set data.retain.source")
    if "idk" in method.batches and cfg.data.idk is None:
        raise ConfigError(f"method {method.name} needs refusal strings: set data.idk.source")
    if cfg.data.retain is not None and "retain" not in method.batches:
        raise ConfigError(f"data.retain is set but method {method.name} uses no retain set: remove it")


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)
