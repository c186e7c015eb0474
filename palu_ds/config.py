"""Typed run configuration: YAML + dotted CLI overrides (``train.lr=1e-5``), validated at parse time.

Unknown keys and incompatible settings raise :class:`ConfigError` naming the key, before any model is loaded.
:func:`load_config` parses and validates (the parsed config is never changed); :func:`resolve` is the one resolution
of a run -- the method and its hyper-parameters (paper defaults updated with ``method.params``, merged once, in
``Method.hparams``), ``data.n_init`` from PALU's ``N``, the reference model, cache and TensorBoard folders, the
tokenizer -- and every entry point (launch/train.py, launch/finetune.py, launch/precompute.py) trains or
precomputes from its :class:`Run`.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml

from palu_ds.data.prompt import PromptFormat
from palu_ds.ds_config import PRECISIONS
from palu_ds.schedule import SCHEDULERS


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
    n_init: int | None = 3  # I_init = the first n_init tokens of each sensitive span; null: whole spans (QA, text)
    span_source: str = "auto"  # the forget set's: auto | labels | detector | model | none (retain/idk: none)
    span_model: str | None = None
    # how QA becomes tokens for training, precompute and in-training evaluation (palu_ds.data.prompt): the
    # tokenizer's chat template as open-unlearning applies it, with this system prompt and date string
    prompt: PromptFormat = field(default_factory=PromptFormat)


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
    scheduler: str = "constant"  # constant | linear | cosine (palu_ds.schedule)
    batch_size: int = 4  # per rank, per micro-batch
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int | None = None  # optimizer steps; overrides epochs
    max_grad_norm: float = 1.0
    save_every: int = 0  # 0: only at the end
    keep_last: int = 2
    resume: str = "auto"  # auto | never | <checkpoint dir>
    max_nonfinite: int = 3  # consecutive non-finite steps before stopping
    timeout: float = 600.0  # seconds: bound on any collective (process-group timeout) and on one step (watchdog)
    answer_only_logits: bool = True  # LM head only where the next token is an answer token (False: full logits)
    head_path: str = "dense"  # dense: the answer rows' logits at once | chunked: head + losses in chunks (issue 17)
    head_chunk_elems: int = 1 << 24  # chunked: logits elements alive at a time (rows = this // vocabulary)
    # auto (the DeepSpeed config's bf16.enabled; its "auto": bf16 on GPUs, fp32 on CPU) | fp32 | bf16: mixed
    # precision with fp32 master weights and fp32 losses (ZeRO 1-3: DeepSpeed's bf16; stage 0: autocast; ds_config)
    precision: str = "auto"


@dataclass
class EvalSuite:
    """What one TOFU / MUSE evaluation runs, defined once: the run config's ``eval`` section (:class:`EvalConfig`)
    and ``evaluation.SuiteConfig`` (which documents each field and validates them) both extend it."""

    suite: str = "tofu"
    split: str = "forget10"  # TOFU forget split / MUSE corpus
    data: str | None = None  # folder or hub name (default: the suite's hub dataset)
    splits: list | None = None  # e.g. [forget, retain]; None = all of the suite
    batch_size: int = 16
    max_new_tokens: int | None = None  # None: the suite's defaults
    max_length: int | None = None  # longest scored sequence; None: the suite's default
    max_examples: int | None = None
    k: float = 0.4  # Min-K% fraction
    retain_results: str | None = None  # retain results.json / open-unlearning TOFU_EVAL.json: adds forget quality


@dataclass
class EvalConfig(EvalSuite):
    """Evaluation during training: every ``every`` optimizer steps the engine calls the evaluator its entry point gave
    it (launch/train.py: ``evaluation.trainer_evaluator``) on every rank, data split across ranks and merged."""

    every: int = 0  # optimizer steps between evaluations; 0 = off


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
    cfg.model.path = os.path.expanduser(cfg.model.path)  # "~/.cache/palu_ds/models/..." in shipped configs
    if cfg.reference.model:
        cfg.reference.model = os.path.expanduser(cfg.reference.model)
    if validate:
        validate_config(cfg)
    return cfg


def validate_config(cfg: RunConfig) -> None:
    """Incompatible combinations are errors here, before any model is loaded. ``cfg`` is not changed."""
    if not cfg.model.path:
        raise ConfigError("model.path is empty: give a local model dir or a hub name")
    if cfg.model.path.endswith(".gguf"):
        raise ConfigError(f"model.path={cfg.model.path} is a GGUF file: convert it first with "
                          "`palu-ds import-model FILE.gguf OUT_DIR` and set model.path=OUT_DIR")
    if not cfg.data.forget.source:
        raise ConfigError("data.forget.source is empty: give the forget (or fine-tuning) data")
    for name in data_sources():
        src = getattr(cfg.data, name)
        if src is not None and src.kind not in ("qa", "text"):
            raise ConfigError(f"data.{name}.kind must be qa or text, got {src.kind!r}")
    if cfg.reference.mode not in ("precomputed", "resident", "none"):
        raise ConfigError(f"reference.mode must be precomputed, resident or none, got {cfg.reference.mode!r}")
    if cfg.train.scheduler not in SCHEDULERS:
        raise ConfigError(f"train.scheduler must be one of {', '.join(SCHEDULERS)}, got {cfg.train.scheduler!r}")
    _check_ranges(cfg)
    if cfg.eval.suite not in ("tofu", "muse"):
        raise ConfigError(f"eval.suite must be tofu or muse, got {cfg.eval.suite!r}")
    if cfg.train.head_path not in ("dense", "chunked"):
        raise ConfigError(f"train.head_path must be dense or chunked, got {cfg.train.head_path!r}")
    if cfg.train.head_path == "chunked" and not cfg.train.answer_only_logits:
        raise ConfigError("train.head_path=chunked computes the head from the answer positions' hidden states: "
                          "it needs train.answer_only_logits: true (or set train.head_path: dense)")
    _check_method(cfg, resolve(cfg))


def _check_method(cfg: RunConfig, run: "Run") -> None:
    """The method's hyper-parameters, reference and data sources against the (unresolved) ``cfg``."""
    from palu_ds.methods import PARAM_RANGES

    method, hp = run.method, run.hp
    for k in cfg.method.params:
        if k in PARAM_RANGES:
            _check(f"method.params.{k}", hp[k], *PARAM_RANGES[k])
    if method.uses_dual and (hp.get("epsilon") is None) == (hp.get("epsilon_rel") is None):
        raise ConfigError(f"method.params: {method.name} needs exactly one of epsilon (absolute) and epsilon_rel "
                          "(eps = (1 + a) * L_retain(reference)); set the other to null")
    parts = run.reference_parts
    if not parts and cfg.reference.mode != "none" and (cfg.reference.cache_dir or cfg.reference.model):
        which = "cache_dir" if cfg.reference.cache_dir else "model"
        raise ConfigError(f"method {method.name} is reference-free but reference.{which} is set: "
                          "remove it or set reference.mode: none")
    if parts and cfg.reference.mode == "none":
        raise ConfigError(f"method {method.name} needs the reference ({sorted(parts)}): "
                          "set reference.mode to precomputed or resident")
    for name in method.batches:  # each batch reads data.<name> (a paired one its answers)
        if getattr(cfg.data, name) is None:
            raise ConfigError(f"method {method.name} needs {method.needs.get(name, name)}: set data.{name}.source")
    for name in data_sources(optional=True):
        if getattr(cfg.data, name) is not None and name not in method.batches:
            raise ConfigError(f"data.{name} is set but method {method.name} uses no {name} set: remove it")


def data_sources(optional: bool = False) -> tuple[str, ...]:
    """The ``DataConfig`` fields that are data sources (forget, retain, idk: one per batch a method may declare);
    ``optional``: only those that default to null, which only some methods read (retain, idk)."""
    hints = typing.get_type_hints(DataConfig)
    return tuple(f.name for f in dataclasses.fields(DataConfig)
                 if DataSource in (hints[f.name], *typing.get_args(hints[f.name]))
                 and (f.default is None or not optional))


@dataclass(frozen=True)
class Run:
    """A run after :func:`resolve`: the one place its derived settings are decided, read by every entry point.

    ``cfg`` is a resolved copy: ``data.n_init`` is the method's ``N`` when the config sets it (PALU's I_init
    length), ``reference.model`` defaults to ``model.path``, ``reference.cache_dir`` to
    ``<output_dir>/reference_cache``, ``log.tensorboard_dir`` to ``<output_dir>/tensorboard``; ``hp`` is the
    method's paper defaults updated with ``method.params`` (read-only)."""

    cfg: RunConfig
    method: Any  # palu_ds.methods.Method
    hp: Mapping[str, Any]

    @property
    def reference_parts(self) -> frozenset[str]:
        """What the reference provides for this run (empty: the run needs no reference)."""
        return self.method.needed_parts(self.hp)

    @property
    def tokenizer_path(self) -> str:
        """The one tokenizer of a run: the data are tokenized once, for training and the reference alike."""
        return self.cfg.model.path


def resolve(cfg: RunConfig) -> Run:
    """The one resolution of a run's settings (hyper-parameters, n_init, reference model, cache and TensorBoard
    folders, tokenizer) from a parsed config; ``cfg`` itself is not changed. Errors name the key."""
    import copy
    from types import MappingProxyType

    from palu_ds.methods import get_method

    try:
        method = get_method(cfg.method.name)
    except ValueError as e:
        raise ConfigError(f"method.name: {e}") from None
    cfg = copy.deepcopy(cfg)
    params = cfg.method.params
    if params.get("N") == "all":
        params["N"] = None
    unknown = sorted(set(params) - set(method.defaults))
    if unknown:
        raise ConfigError(f"method.params: unknown for {method.name}: {unknown}; valid: {sorted(method.defaults)}")
    if "N" in params:  # PALU's N is the data's I_init length
        cfg.data.n_init = params["N"]
    out = cfg.train.output_dir
    cfg.reference.model = cfg.reference.model or cfg.model.path
    cfg.reference.cache_dir = cfg.reference.cache_dir or os.path.join(out, "reference_cache")
    cfg.log.tensorboard_dir = cfg.log.tensorboard_dir or os.path.join(out, "tensorboard")
    return Run(cfg, method, MappingProxyType(method.hparams(params)))


# (key, kind, low, high, low excluded, null allowed) of every numeric setting; checked by validate_config
RANGES = [
    ("train.lr", "num", 0, None, True, False), ("train.weight_decay", "num", 0, None, False, False),
    ("train.warmup_steps", "int", 0, None, False, False), ("train.batch_size", "int", 1, None, False, False),
    ("train.grad_accum", "int", 1, None, False, False), ("train.epochs", "num", 0, None, True, False),
    ("train.max_steps", "int", 1, None, False, True), ("train.max_grad_norm", "num", 0, None, False, False),
    ("train.save_every", "int", 0, None, False, False), ("train.keep_last", "int", 1, None, False, False),
    ("train.max_nonfinite", "int", 1, None, False, False), ("train.timeout", "num", 0, None, True, False),
    ("train.head_chunk_elems", "int", 1, None, False, False), ("train.precision", PRECISIONS, None, None, False, False),
    ("data.max_length", "int", 2, None, False, False), ("data.n_init", "int", 1, None, False, True),
    ("eval.every", "int", 0, None, False, False), ("eval.batch_size", "int", 1, None, False, False),
    ("eval.max_new_tokens", "int", 1, None, False, True), ("eval.max_examples", "int", 1, None, False, True),
    ("log.log_every", "int", 1, None, False, False),
]


def _check(key: str, v, kind, low, high, open_low: bool, nullable: bool) -> None:
    """One setting against its range; the error names the key, the value and the valid range."""
    if v is None:
        if nullable:
            return
        raise ConfigError(f"{key} must be set (null is not allowed here)")
    if isinstance(kind, tuple):
        if v not in kind:
            raise ConfigError(f"{key} must be one of {list(kind)}, got {v!r}")
        return
    if kind == "bool":
        if not isinstance(v, bool):
            raise ConfigError(f"{key}: expected true or false, got {v!r}")
        return
    numeric = isinstance(v, (int, float)) and not isinstance(v, bool)
    if not numeric or (kind == "int" and not (isinstance(v, int) or float(v).is_integer())):
        raise ConfigError(f"{key}: expected {'an integer' if kind == 'int' else 'a number'}, got {v!r}")
    if v != v or v in (float("inf"), float("-inf")):
        raise ConfigError(f"{key} must be finite, got {v!r}")
    if low is not None and (v <= low if open_low else v < low):
        raise ConfigError(f"{key} must be {'>' if open_low else '>='} {low}" + (" (or null)" if nullable else "")
                          + f", got {v!r}")
    if high is not None and v > high:
        raise ConfigError(f"{key} must be <= {high}, got {v!r}")


def _check_ranges(cfg: RunConfig) -> None:
    for key, *rule in RANGES:
        section, name = key.split(".")
        _check(key, getattr(getattr(cfg, section), name), *rule)


def check_vocabulary(hp: dict, vocab_size: int, model: str) -> None:
    """K and kl_topk may not exceed the model's vocabulary (no silent clamp): called where the model is known."""
    for key in ("K", "kl_topk"):
        if hp.get(key) is not None and int(hp[key]) > vocab_size:
            raise ConfigError(f"method.params.{key}={hp[key]} is larger than the vocabulary of {model} "
                              f"({vocab_size} tokens): set it to at most {vocab_size} (or null for all of it)")


def check_model_vocabulary(cfg: RunConfig) -> None:
    """:func:`check_vocabulary` against the reference model's config.json, before any weights load (when the config
    sets K or kl_topk; a model whose config cannot be read here is checked again where it loads)."""
    given = {k: v for k, v in cfg.method.params.items() if k in ("K", "kl_topk") and v is not None}
    if not given:
        return
    path = resolve(cfg).cfg.reference.model
    try:
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code).vocab_size
    except Exception:  # noqa: BLE001 - unreadable here: the model load reports it, and palu_ds.reference checks again
        return
    check_vocabulary(given, int(vocab), path)


def check_run_paths(cfg: RunConfig, ds_config_path: str | None) -> dict | None:
    """The files a run needs, checked before any model loads: the DeepSpeed config (exists, is JSON, its batch sizes
    agree) and an explicit ``train.resume`` checkpoint (a complete one). Returns the filled DeepSpeed config."""
    import os

    from palu_ds import checkpoint
    from palu_ds.ds_config import load_ds_config

    r = cfg.train.resume
    if r not in ("auto", "never"):
        if not os.path.isdir(r):
            raise ConfigError(f"train.resume={r}: no such checkpoint folder (give a step_NNNNNN folder, auto or never)")
        if not os.path.isfile(os.path.join(r, checkpoint.MARKER)):
            raise ConfigError(f"train.resume={r} is not a complete checkpoint (no {checkpoint.MARKER} marker)")
    if ds_config_path is None:
        return None
    if not os.path.isfile(ds_config_path):
        raise ConfigError(f"--deepspeed {ds_config_path}: no such file")
    from palu_ds.dist import discover_env

    discover_env()
    try:
        return load_ds_config(ds_config_path, cfg.train, int(os.environ.get("WORLD_SIZE", "1")), on_cpu=True)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"--deepspeed {ds_config_path}: {e}") from None


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)
