"""Every shipped config loads: YAML run configs validate; DeepSpeed JSON configs fill for any world size."""
import glob
import os

import pytest
import torch

from palu_ds.config import ConfigError, data_sources, load_config, resolve
from palu_ds.ds_config import load_ds_config
from palu_ds.methods import METHODS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
YAMLS = sorted(glob.glob(os.path.join(ROOT, "launch", "configs", "**", "*.yaml"), recursive=True))
JSONS = sorted(glob.glob(os.path.join(ROOT, "ds_configs", "**", "*.json"), recursive=True))


def test_configs_exist():
    assert len(YAMLS) >= 3 + 24 + 14 and len(JSONS) >= 7


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_yaml_validates(path):
    cfg = load_config(path)
    assert cfg.model.path and cfg.data.forget.source


@pytest.mark.parametrize("path", JSONS, ids=lambda p: os.path.relpath(p, ROOT))
@pytest.mark.parametrize("world", [1, 2, 16])
def test_every_deepspeed_json_fills_auto(path, world):
    train = load_config(os.path.join(ROOT, "launch", "configs", "demo.yaml")).train
    ds = load_ds_config(path, train, world, on_cpu="cpu" in path)
    assert ds["train_batch_size"] == train.batch_size * train.grad_accum * world
    assert "'auto'" not in str(ds)  # no value left "auto" (the key torch_autocast is not one)
    assert ds["optimizer"]["params"]["lr"] == train.lr


@pytest.mark.parametrize("stage", [0, 2, 3])
@pytest.mark.parametrize("precision", ["auto", "fp32", "bf16"])
def test_precision_is_resolved_once_from_train_precision_and_the_json(stage, precision):
    """The shipped CPU configs say ``"bf16": {"enabled": "auto"}``: train.precision decides (auto: fp32 on CPU).
    bf16 is torch autocast at every stage (fp32 weights, which are the master weights, and fp32 Adam; DeepSpeed's
    ``bf16`` section is off: under ZeRO its fp32 masters would start from bf16-rounded weights, issue 29); Adam on
    CPU is torch's fused AdamW."""
    from palu_ds.ds_config import autocast_dtype

    train = load_config(None, BASE + ["data.retain.source=r", f"train.precision={precision}"]).train
    ds = load_ds_config(os.path.join(ROOT, "ds_configs", "cpu", f"zero{stage}.json"), train, 1, on_cpu=True)
    bf16 = precision == "bf16"
    assert ds["bf16"]["enabled"] is False
    assert autocast_dtype(ds) == (torch.bfloat16 if bf16 else None)
    assert ds["optimizer"]["params"]["fused"] is True and ds["optimizer"]["params"]["torch_adam"] is True


@pytest.mark.parametrize("given,precision,on_cpu,expect", [
    ("auto", "auto", False, "bf16"), (True, "auto", True, "bf16"), (False, "auto", False, "fp32"),
    (True, "bf16", True, "bf16"), ("auto", "fp32", False, "fp32"), (True, "fp32", True, None), (False, "bf16", True, None),
])
def test_an_explicit_bf16_setting_that_contradicts_train_precision_is_an_error(given, precision, on_cpu, expect):
    from palu_ds.ds_config import resolve_precision

    ds = {"bf16": {"enabled": given}}
    if expect is None:
        with pytest.raises(ValueError, match=f"train.precision={precision} but the DeepSpeed config sets"):
            resolve_precision(ds, precision, on_cpu)
    else:
        assert resolve_precision(ds, precision, on_cpu) == expect


BASE = ["model.path=m", "data.forget.source=f.jsonl"]


@pytest.mark.parametrize("overrides,message", [
    (["train.lrr=1"], "unknown key train.lrr"),
    (["method.name=palu2"], "unknown method 'palu2'"),
    (["method.name=grad_diff", "reference.mode=precomputed", "reference.cache_dir=c"], "reference-free"),
    (["method.name=pd_flat", "reference.mode=none"], "needs a retain set"),
    (["method.name=grad_diff", "reference.mode=none", "method.params.lambda0=1"], "unknown for grad_diff"),
    (["method.name=palu", "reference.mode=none", "data.retain.source=r"], "needs the reference"),
    (["method.name=idk_dpo", "data.retain.source=r"], "needs refusal strings"),
    (["method.name=pd_flat", "reference.mode=none", "data.retain.source=r", "method.params.epsilon_rel=0.1"],
     "exactly one of epsilon"),
    (["method.name=grad_ascent", "reference.mode=none", "data.retain.source=r"], "uses no retain set"),
    (["train.batch_size=0", "method.name=sft", "reference.mode=none"], "train.batch_size must be >= 1"),
    (["train.lr=fast", "method.name=sft", "reference.mode=none"], "train.lr: expected a number"),
    (["train.scheduler=step", "method.name=sft", "reference.mode=none"], "train.scheduler"),
    (["eval.epochs=[1, 0]", "method.name=sft", "reference.mode=none"], r"eval.epochs must be .* got \[1, 0\]"),
    (["eval.epochs=3", "method.name=sft", "reference.mode=none"], "eval.epochs must be a non-empty list"),
    (["train.precision=fp16", "method.name=sft", "reference.mode=none"], "train.precision must be auto, fp32 or bf16"),
])
def test_bad_combinations_are_rejected_at_parse_time(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, BASE + ["data.retain=null"] + overrides)


def test_method_N_sets_the_data_n_init():
    cfg = load_config(None, BASE + ["data.retain.source=r", "method.params.N=1"])
    assert resolve(cfg).cfg.data.n_init == 1
    assert cfg.data.n_init == 3  # resolve works on a copy: the parsed config is not changed


def test_exponent_without_dot_is_a_number():
    cfg = load_config(None, BASE + ["data.retain=null", "method.name=sft", "reference.mode=none", "train.lr=1e-5"])
    assert cfg.train.lr == 1e-5


def test_resolve_decides_each_derived_setting_once():
    """resolve(cfg): the method's hyper-parameters (paper defaults + params), PALU's N as data.n_init ("all" = whole
    spans), the reference model, cache and TensorBoard folders under train.output_dir, one tokenizer (model.path)."""
    cfg = load_config(None, BASE + ["data.retain.source=r", "method.params.N=all", "method.params.K=7",
                                    "train.output_dir=out"])
    run = resolve(cfg)
    assert run.method.name == "palu" and run.hp["K"] == 7 and run.hp["kl_topk"] == 256 and run.hp["N"] is None
    assert run.cfg.data.n_init is None and cfg.data.n_init == 3 and cfg.method.params["N"] == "all"  # a copy
    assert (run.cfg.reference.model, run.cfg.reference.cache_dir, run.cfg.log.tensorboard_dir, run.tokenizer_path) \
        == ("m", os.path.join("out", "reference_cache"), os.path.join("out", "tensorboard"), "m")
    assert run.reference_parts == {"topk_ids", "kl"}
    with pytest.raises(TypeError):
        run.hp["K"] = 8                                      # read-only
    run = resolve(load_config(None, BASE + ["data.retain.source=r", "reference.model=ref", "reference.cache_dir=c",
                                            "method.name=pd_flat", "reference.mode=precomputed",
                                            "method.params.epsilon=null", "method.params.epsilon_rel=0.1"]))
    assert (run.cfg.reference.model, run.cfg.reference.cache_dir, run.tokenizer_path) == ("ref", "c", "m")
    assert run.reference_parts == {"retain_loss"} and run.hp["lambda0"] == 100.0
    for overrides, message in ((["method.name=x"], "method.name: unknown method 'x'"),
                               (["method.params.K2=1"], r"method.params: unknown for palu: \['K2'\]")):
        with pytest.raises(ConfigError, match=message):
            resolve(load_config(None, BASE + overrides, validate=False))


@pytest.mark.parametrize("name", sorted(m for m in METHODS))
def test_every_method_validates_with_the_data_its_batches_need(name):
    """The data sources a config needs follow the method's batches: each one set validates, a missing one is an
    error naming data.<batch>.source and what it is, an extra optional one is an error naming it."""
    m = METHODS[name]
    sources = [f"data.{b}.source=x" for b in m.batches] + ["data.retain=null"] * ("retain" not in m.batches)
    mode = [f"method.name={name}", f"reference.mode={'none' if m.is_reference_free else 'precomputed'}"]
    load_config(None, BASE + sources + mode)
    for b in m.batches[1:]:
        with pytest.raises(ConfigError, match=rf"needs {m.needs[b]}: set data.{b}.source"):
            load_config(None, BASE + sources + mode + [f"data.{b}=null"])
    for extra in (b for b in data_sources(optional=True) if b not in m.batches):
        with pytest.raises(ConfigError, match=rf"data.{extra} is set but method {name} uses no {extra} set"):
            load_config(None, BASE + sources + mode + [f"data.{extra}.source=x"])


def test_eval_epochs_name_optimizer_steps():
    """eval.epochs=[1, 2.5, 10] at 10 steps an epoch evaluates after steps 10, 25 and 100; eval.every adds its own
    steps; neither set: no evaluation during training."""
    cfg = load_config(None, BASE + ["data.retain=null", "method.name=sft", "reference.mode=none",
                                    "eval.epochs=[1, 2.5, 10]", "eval.every=40"])
    assert cfg.eval.enabled and cfg.eval.steps(10) == {10, 25, 100}
    assert [s for s in range(1, 101) if cfg.eval.due(s, 10)] == [10, 25, 40, 80, 100]
    assert cfg.eval.steps(1) == {1, 2, 10}
    off = load_config(None, BASE + ["data.retain=null", "method.name=sft", "reference.mode=none"])
    assert not off.eval.enabled and not any(off.eval.due(s, 10) for s in range(1, 50))
