"""Reproducible installs: requirements.lock pins every dependency exactly and the Makefile installs through it; a
tokenizer whose character offsets are zero-width (the Llama-3 tokenizers bug that makes L_sens silently 0) is
refused with the reason."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCK = os.path.join(ROOT, "requirements.lock")


def _lock() -> dict:
    pins = {}
    for line in open(LOCK, encoding="utf-8"):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([A-Za-z0-9_.\-+!]+)", line)
        assert m, f"requirements.lock: {line!r} is not an exact name==version pin"
        pins[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    return pins


def _setup_requirements() -> set[str]:
    """Names in setup.py's install_requires and extras_require (read with ast, not executed)."""
    import ast

    call = next(n for n in ast.walk(ast.parse(open(os.path.join(ROOT, "setup.py"), encoding="utf-8").read()))
                if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    kw = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require")}
    reqs = list(kw["install_requires"]) + [r for extra in kw["extras_require"].values() for r in extra]
    return {re.sub(r"[-_.]+", "-", re.split(r"[<>=!~\[ ;]", r)[0]).lower() for r in reqs}


def test_lock_pins_every_requirement_and_the_makefile_uses_it():
    """Every install_requires / extras requirement of setup.py (and what they pull in: huggingface-hub, pyarrow...)
    has an exact pin; torch is 2.13.0 (the CPU wheel comes from the index, the version from the lock); the Makefile's
    install passes -c requirements.lock and `make lock` regenerates it with pip freeze."""
    pins = _lock()
    names = _setup_requirements()
    assert {"torch", "transformers", "tokenizers", "deepspeed", "mpi4py", "peft", "pytest"} <= names
    assert not names - set(pins), f"not pinned in requirements.lock: {sorted(names - set(pins))}"
    assert pins["torch"] == "2.13.0" and {"huggingface-hub", "pyarrow"} <= set(pins)
    make = open(os.path.join(ROOT, "Makefile"), encoding="utf-8").read()
    assert make.count("pip install -q -c constraints.txt -c $(LOCK)") == 3 and "LOCK := requirements.lock" in make
    assert re.search(r"^lock:", make, re.M) and 'pip" freeze --exclude-editable' in make


def test_installed_versions_are_the_locked_ones():
    """The environment running the tests is the locked one (CI installs through the Makefile): each direct
    dependency's installed version equals its pin (torch compared without its local build label, e.g. +cpu)."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    pins, off = _lock(), []
    for name in ("torch", "transformers", "tokenizers", "deepspeed", "datasets", "safetensors", "numpy", "scipy",
                 "peft", "accelerate"):
        try:
            got = Version(version(name)).public
        except PackageNotFoundError:
            continue
        if got != pins[name]:
            off.append(f"{name} {got} (lock {pins[name]})")
    assert not off, f"installed versions differ from requirements.lock: {off}; reinstall with make install"


@pytest.fixture()
def zero_width_tokenizer(tiny):
    """The test tokenizer with the Llama-3 bug's output: every offset (start, start)."""
    from transformers import AutoTokenizer

    base = type(AutoTokenizer.from_pretrained(tiny["model"]))

    class ZeroWidth(base):
        def __call__(self, *args, **kwargs):
            enc = super().__call__(*args, **kwargs)
            if kwargs.get("return_offsets_mapping"):
                enc["offset_mapping"] = [(a, a) for a, _ in enc["offset_mapping"]]
            return enc

    return ZeroWidth.from_pretrained(tiny["model"])


def test_zero_width_offsets_are_refused_with_the_reason(tokenizer, zero_width_tokenizer):
    from palu_ds.data import QADataset, QAOptions
    from palu_ds.data.spans import ZeroWidthOffsets
    from palu_ds.data.text import TextChunks

    rec = {"question": "Where was Kalo Vomi born?", "answer": "Kalo Vomi was born in Veloria.",
           "target_words": [{"word": "Veloria", "start": 22, "end": 29}]}
    ok = QADataset([rec], tokenizer, QAOptions(n_init=None))
    assert sum(ok[0]["sens_mask"]) >= 1  # the real offsets put the span on tokens
    with pytest.raises(ZeroWidthOffsets, match=r"<records>, record 1: the tokenizer .* zero-width .*L_sens silently 0"):
        QADataset([rec], zero_width_tokenizer, QAOptions(n_init=None))
    with pytest.raises(ZeroWidthOffsets, match="tokenizers=="):
        TextChunks(["Kalo Vomi was born in Veloria."], zero_width_tokenizer, 16, source="doc", n_init=2)
    TextChunks(["Kalo Vomi was born in Veloria."], zero_width_tokenizer, 16, spans=False)  # no spans, no offsets


def test_whitespace_and_special_tokens_may_be_zero_width(tokenizer):
    """EOS (special) and a whitespace-only token carry no text: zero width is allowed for them, not for a word."""
    from palu_ds.data.spans import ZeroWidthOffsets, check_offsets

    space = tokenizer(" ", add_special_tokens=False)["input_ids"]
    word = tokenizer("Veloria", add_special_tokens=False)["input_ids"]
    check_offsets(tokenizer, space + [tokenizer.eos_token_id], [(0, 0)] * (len(space) + 1))
    with pytest.raises(ZeroWidthOffsets):
        check_offsets(tokenizer, word, [(0, 0)] * len(word))
