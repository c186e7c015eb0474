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
from dataclasses import dataclass
from typing import Any, Mapping

import yaml

from palu_ds.data.qa import QAOptions
from palu_ds.ds_config import PRECISIONS
from palu_ds.schedule import SCHEDULERS
from palu_ds.settings import check_choices, setting


class ConfigError(ValueError):
    """An invalid configuration; the message names the key and what to do."""


@dataclass
class DataSource:
    source: str = setting("", "a .json/.jsonl path, a folder of <config>.jsonl, a save_to_disk folder or a hub dataset")
    config: str | None = setting(None, "hub config / file stem inside a folder (e.g. forget10)")
    split: str = setting("train", "hub split (MUSE: forget, retain1, ...)")
    kind: str = setting("qa", "qa (question/answer rows) or text (MUSE-style raw documents)", choices=("qa", "text"))


@dataclass
class ModelConfig:
    path: str = setting("", "the model to train: a local Hugging Face folder or a hub name")
    trust_remote_code: bool = setting(False, "passed to transformers' from_pretrained")
    gradient_checkpointing: bool = setting(False, "recompute activations in backward (less memory, more time)")
    lora: dict | None = setting(None, "peft LoraConfig kwargs, e.g. {r: 8, lora_alpha: 16, target_modules: [q_proj, "
                                      "v_proj]}; merged into the saved model")


@dataclass
class DataConfig(QAOptions):
    """The data sources, and how QA becomes tokens (:class:`palu_ds.data.qa.QAOptions`, declared there once: keys,
    max_length, n_init -- I_init = the first n_init tokens of each span, null: whole spans --, the forget set's
    span_source, span_model, and the prompt format for training, precompute and in-training evaluation)."""

    forget: DataSource = setting(help="the forget set (launch/finetune.py: the training data)", factory=DataSource)
    retain: DataSource | None = setting(None, "the retain set (methods with a retain batch)")
    idk: DataSource | None = setting(None, "refusal strings for idk_dpo (records with an answer field)")


@dataclass
class MethodConfig:
    name: str = setting("palu", "the method (palu_ds.methods; see the methods below)")
    params: dict = setting(help="overrides of the method's paper defaults (see the methods below)", factory=dict)


@dataclass
class ReferenceConfig:
    mode: str = setting("precomputed", "precomputed: a cache written once (launch/precompute.py or at start); "
                                       "resident: the reference model in memory; none: reference-free methods",
                        choices=("precomputed", "resident", "none"))
    model: str | None = setting(None, "the reference model; null: model.path (the model before unlearning)")
    cache_dir: str | None = setting(None, "the reference cache; null: <output_dir>/reference_cache")
    dtype: str = setting("float16", "storage dtype of cached values", choices=("float16", "bfloat16", "float32"))


@dataclass
class TrainConfig:
    output_dir: str = setting("runs/default", "checkpoints, the model, summary.json, TensorBoard")
    seed: int = setting(42, "seed of the samplers and of the model's initial state")
    lr: float = setting(1e-5, "peak learning rate (AdamW)")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    warmup_steps: int = setting(0, "linear warm-up steps")
    scheduler: str = setting("constant", "learning-rate schedule after warm-up (palu_ds.schedule)", choices=SCHEDULERS)
    batch_size: int = setting(4, "examples per rank per micro-batch")
    grad_accum: int = setting(1, "micro-batches per optimizer step")
    epochs: float = setting(1.0, "passes over the forget set (ignored when max_steps is set)")
    max_steps: int | None = setting(None, "optimizer steps; overrides epochs")
    max_grad_norm: float = setting(1.0, "gradient clipping norm")
    save_every: int = setting(0, "optimizer steps between checkpoints; 0: only at the end")
    keep_last: int = setting(2, "checkpoints kept")
    resume: str = setting("auto", "auto (the latest complete checkpoint) | never | force (auto, accepting config "
                                   "changes other than BOOKKEEPING, recorded in summary.json) | <checkpoint dir>")
    max_nonfinite: int = setting(3, "consecutive non-finite steps before the run stops (with a checkpoint)")
    timeout: float = setting(600.0, "seconds: bound on any collective and on one step (watchdog)")
    answer_only_logits: bool = setting(True, "LM head only where the next token is an answer token, in training and "
                                             "in the reference's passes, precomputed or resident (false: full "
                                             "logits)")
    padding_free: bool = setting(True, "the forward (and the reference's, precomputed or resident) runs a micro-batch's "
                                       "rows end to end without padding, attention within each row (palu_ds.packing; "
                                       "false: right-padded rows)")
    head_path: str = setting("dense", "dense: the answer rows' logits at once; chunked: head + losses in chunks",
                             choices=("dense", "chunked"))
    head_chunk_elems: int = setting(1 << 24, "chunked: logits elements alive at a time (rows = this // vocabulary)")
    precision: str = setting("auto", "auto (the DeepSpeed config's bf16.enabled; its \"auto\": bf16 on GPUs, fp32 on "
                                     "CPU) | fp32 | bf16: torch autocast at every ZeRO stage (fp32 weights, which are "
                                     "the master weights; bf16 products; fp32 losses)", choices=PRECISIONS)
    bf16_dither: bool = setting(False, "bf16 only: at a fresh start, move each trainable nn.Linear weight to a random "
                                       "point of its bf16 rounding cell (bf16 value unchanged) so that the bf16 "
                                       "products follow sub-ulp updates on average (palu_ds.dither)")


@dataclass
class EvalSuite:
    """What one TOFU / MUSE evaluation runs, defined once: the run config's ``eval`` section (:class:`EvalConfig`)
    and ``palu_eval.SuiteConfig`` (which documents each field and validates them) both extend it."""

    suite: str = setting("tofu", "the suite", choices=("tofu", "muse"))
    split: str = setting("forget10", "TOFU forget split (forget01 / forget05 / forget10) / MUSE corpus (news, books)")
    data: str | None = setting(None, "folder or hub name; null: the suite's hub dataset")
    splits: list | None = setting(None, "the parts to run, e.g. [forget, retain]; null: all of the suite")
    batch_size: int = setting(16, "evaluation batch size per rank")
    max_new_tokens: int | None = setting(None, "generation length; null: the suite's defaults")
    max_length: int | None = setting(None, "longest scored sequence; null: the suite's default")
    max_examples: int | None = setting(None, "first N rows of each part; null: all")
    k: float = setting(0.4, "Min-K% fraction")
    retain_results: str | None = setting(None, "the retain model's results.json / open-unlearning TOFU_EVAL.json: "
                                                "adds forget quality")


@dataclass
class EvalConfig(EvalSuite):
    """Evaluation during training: every ``every`` optimizer steps, and after each epoch listed in ``epochs``, the
    engine calls the evaluator its entry point gave it (launch/train.py: ``palu_eval.trainer_evaluator``) on every
    rank, data split across ranks and merged."""

    every: int = setting(0, "optimizer steps between evaluations during training; 0: off")
    epochs: list | None = setting(None, "also evaluate after these epochs, e.g. [1, 2, 3, 5, 10] (epoch e = optimizer "
                                        "step round(e x steps per epoch)); null: none")
    dtype: str | None = setting(None, "in-training evaluation scores a copy of the model cast to this dtype; null: the "
                                      "model being trained as it is", choices=("float32", "bfloat16", "float16"))

    @property
    def enabled(self) -> bool:
        """Whether any evaluation runs during training."""
        return bool(self.every or self.epochs)

    def steps(self, steps_per_epoch: int) -> frozenset[int]:
        """The optimizer steps ``epochs`` names (each at least step 1)."""
        return frozenset(max(1, round(float(e) * steps_per_epoch)) for e in (self.epochs or ()))

    def due(self, step: int, steps_per_epoch: int) -> bool:
        """Whether the evaluator runs after optimizer step ``step``."""
        return bool(self.every and step % self.every == 0) or step in self.steps(steps_per_epoch)


@dataclass
class LogConfig:
    tensorboard_dir: str | None = setting(None, "TensorBoard folder; null: <output_dir>/tensorboard")
    log_every: int = setting(1, "optimizer steps between progress lines when the output is not a terminal")
    report_to: list = setting(help="experiment trackers besides TensorBoard: [] or [wandb] (pip install "
                                   "palu_ds[wandb]; WANDB_MODE=offline works without a network)",
                              factory=list, choices=("wandb",))
    wandb_project: str = setting("palu_ds", "wandb project")
    run_name: str | None = setting(None, "the run's name in the tracker; null: the output folder's name")


@dataclass
class RunConfig:
    model: ModelConfig = setting(help="the model to train", factory=ModelConfig)
    data: DataConfig = setting(help="the data", factory=DataConfig)
    method: MethodConfig = setting(help="the method and its hyper-parameters", factory=MethodConfig)
    reference: ReferenceConfig = setting(help="the frozen reference model", factory=ReferenceConfig)
    train: TrainConfig = setting(help="the optimisation", factory=TrainConfig)
    eval: EvalConfig = setting(help="evaluation during training", factory=EvalConfig)
    log: LogConfig = setting(help="logging and experiment tracking", factory=LogConfig)


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
    try:
        return cls(**kwargs)
    except ValueError as e:  # a section's own check (data.span_source)
        raise ConfigError(str(e)) from None


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
    raw = read_yaml(path) if path else {}
    raw = apply_overrides(raw, list(overrides))
    try:
        cfg = _build(RunConfig, raw, "")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None
    cfg.model.path = os.path.expanduser(cfg.model.path)  # "~/.cache/palu_ds/models/..." in shipped configs
    if cfg.reference.model:
        cfg.reference.model = os.path.expanduser(cfg.reference.model)
    if validate:
        validate_config(cfg)
    return cfg


def _check_unique_keys(node, path: str, prefix: str = "") -> None:
    """A key given twice in one mapping of the composed YAML ``node`` is a ConfigError naming the file, both lines
    and the dotted key (PyYAML's loaders let the last one win silently)."""
    if isinstance(node, yaml.MappingNode):
        seen = {}
        for key_node, value in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.start_mark)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"{path}, line {line}: key {prefix}{key} is given twice (first on line {seen[key]});"
                                  " keep one")
            seen[key] = line
            _check_unique_keys(value, path, f"{prefix}{key}.")
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_unique_keys(item, path, f"{prefix}{i}.")


def read_yaml(path: str) -> dict:
    """A YAML config file as a dict; every problem (not UTF-8, a syntax error, a key given twice, a top level that is
    not a mapping of sections) is a ConfigError naming the file, the line and the key."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path}, line {line}: is not UTF-8 (byte 0x{data[e.start]:02x}); save the file as UTF-8") \
            from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        _check_unique_keys(node, path)
        raw = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({e.problem or e.context})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}, line {node.start_mark.line + 1}: the top level is a {type(raw).__name__}, not a "
                          "mapping of sections "
                          f"(model:, data:, method:, train:, ...)")
    return raw


def validate_config(cfg: RunConfig, run: "Run | None" = None) -> None:
    """Incompatible combinations are errors here, before any model is loaded. ``cfg`` is not changed; ``run``: its
    :func:`resolve` when the caller has it already."""
    if not cfg.model.path:
        raise ConfigError("model.path is empty: give a local model dir or a hub name")
    if cfg.model.path.endswith(".gguf"):
        raise ConfigError(f"model.path={cfg.model.path} is a GGUF file: convert it first with "
                          "`palu-ds import-model FILE.gguf OUT_DIR` and set model.path=OUT_DIR")
    if not cfg.data.forget.source:
        raise ConfigError("data.forget.source is empty: give the forget (or fine-tuning) data")
    check_choices(cfg, "", ConfigError)
    _check_ranges(cfg)
    epochs = cfg.eval.epochs
    if epochs is not None and (not isinstance(epochs, list) or not epochs or not all(
            isinstance(e, (int, float)) and not isinstance(e, bool) and e > 0 for e in epochs)):
        raise ConfigError(f"eval.epochs must be a non-empty list of positive numbers (e.g. [1, 2, 5]) or null, "
                          f"got {epochs!r}")
    _check_trackers(cfg)
    if cfg.train.head_path == "chunked" and not cfg.train.answer_only_logits:
        raise ConfigError("train.head_path=chunked computes the head from the answer positions' hidden states: "
                          "it needs train.answer_only_logits: true (or set train.head_path: dense)")
    _check_method(cfg, run or resolve(cfg))


def load_run(path: str | None, overrides: list[str] = ()) -> "Run":
    """:func:`load_config` and :func:`resolve` for an entry point, resolving once (validation reads the same Run)."""
    cfg = load_config(path, overrides, validate=False)
    run = resolve(cfg)
    validate_config(cfg, run)
    return run


def _check_method(cfg: RunConfig, run: "Run") -> None:
    """The method's hyper-parameters, reference and data sources against the (unresolved) ``cfg``."""
    method, hp = run.method, run.hp
    for k in cfg.method.params:  # each range is declared next to its default (palu_ds.methods.Param)
        _check(f"method.params.{k}", hp[k], *method.params[k].rule)
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
    ("train.head_chunk_elems", "int", 1, None, False, False),
    ("data.max_length", "int", 2, None, False, False), ("data.n_init", "int", 1, None, False, True),
    ("eval.every", "int", 0, None, False, False), ("eval.batch_size", "int", 1, None, False, False),
    ("eval.max_new_tokens", "int", 1, None, False, True), ("eval.max_examples", "int", 1, None, False, True),
    ("eval.max_length", "int", 2, None, False, True), ("eval.k", "num", 0, 1, True, False),
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


def _check_trackers(cfg: RunConfig) -> None:
    """A tracker of ``log.report_to`` must be importable here, before any model loads."""
    import importlib.util

    if not isinstance(cfg.log.report_to, list):
        raise ConfigError(f"log.report_to must be a list (e.g. [wandb]), got {cfg.log.report_to!r}")
    for name in cfg.log.report_to:
        if importlib.util.find_spec(name) is None:
            raise ConfigError(f"log.report_to names {name} but the {name} package is not installed: "
                              f"pip install 'palu_ds[{name}]' (or remove it from log.report_to)")


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


def check_model_vocabulary(run: Run) -> None:
    """:func:`check_vocabulary` against the reference model's config.json, before any weights load (when the config
    sets K or kl_topk; a model whose config cannot be read here is checked again where it loads)."""
    cfg = run.cfg
    given = {k: v for k, v in cfg.method.params.items() if k in ("K", "kl_topk") and v is not None}
    if not given:
        return
    path = cfg.reference.model
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
    if r not in ("auto", "never", "force"):
        if not os.path.isdir(r):
            raise ConfigError(f"train.resume={r}: no such checkpoint folder (give a step_NNNNNN folder, auto, force or "
                              "never)")
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


# ---------------------------------------------------------------------------------------------------------------
# Resume: what may change between a checkpoint's run and the run that continues it
# ---------------------------------------------------------------------------------------------------------------
# Keys (dotted; a trailing "." covers a whole section) that do not change what is trained: where things are written
# and shown, how often, how long to wait, how the same numbers are computed. Anything else that differs from the
# checkpoint's recorded (resolved) config makes the continuation another run: refused unless train.resume=force.
BOOKKEEPING = (
    "log.", "eval.",  # logging and experiment tracking, in-training evaluation
    "train.output_dir", "train.resume", "train.save_every", "train.keep_last", "train.timeout",
    "train.max_nonfinite", "train.answer_only_logits", "train.padding_free", "train.head_path",
    "train.head_chunk_elems",
    "reference.cache_dir",  # the cache's own key guards what it holds
    "model.gradient_checkpointing",
)
# The run's length: free to change (a run is extended by raising it) while the lr schedule does not depend on it
LENGTH = ("train.max_steps", "train.epochs")


def _flat(d: dict, prefix: str = "") -> dict:
    """Dotted keys of a config dict; the free-form mappings (method.params, model.lora) stay whole values."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and f"{prefix}{k}" not in ("method.params", "model.lora"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(recorded: dict, now: dict) -> dict[str, dict]:
    """``{key: {"checkpoint": old, "run": new}}`` for every setting of ``now`` (a resolved config as a dict, plus the
    method's resolved hyper-parameters under ``method.hparams``) that differs from ``recorded`` (the same, from a
    checkpoint), bookkeeping keys (:data:`BOOKKEEPING`) left out, and the run's length (:data:`LENGTH`) too under
    the constant lr schedule. A key the checkpoint does not record (an older palu_ds) is not compared."""
    old, new = _flat(recorded), _flat(now)
    free = BOOKKEEPING + (LENGTH if new.get("train.scheduler") == "constant" and old.get("train.scheduler") ==
                          "constant" else ())
    return {k: {"checkpoint": old[k], "run": new[k]} for k in sorted(new)
            if k in old and old[k] != new[k] and not any(k == b or (b.endswith(".") and k.startswith(b))
                                                           for b in free)}


def changes_message(changes: dict[str, dict], checkpoint_path: str) -> str:
    return (f"train.resume: this run's config differs from the one {checkpoint_path} was trained with: "
            + "; ".join(f"{k} (checkpoint {v['checkpoint']!r}, now {v['run']!r})" for k, v in changes.items())
            + ". Continuing would make it another run: put the old values back, give this run another "
            "train.output_dir (or train.resume=never to start afresh there), or set train.resume=force to continue "
            "deliberately (the changes are recorded in summary.json)")
