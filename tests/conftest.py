"""Test-wide CPU settings for DeepSpeed/gloo (set here, not in library code that must also run on GPUs)."""
import os
import warnings

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=FutureWarning)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Generated TOFU-style data (20 authors, forget 10%), a tokenizer trained on it and a tiny Llama dir."""
    from palu_ds.data.synthetic import REFUSALS, generate, write_splits
    from palu_ds.tiny import build_model_dir, qa_texts

    root = tmp_path_factory.mktemp("tiny")
    paths = write_splits(str(root / "data"), n_authors=20, forget_pct=10, seed=0)
    model_dir = build_model_dir(str(root / "model"), qa_texts(generate(20, 0)) + REFUSALS, vocab_size=1024)
    return {"root": root, "data": str(root / "data"), "paths": paths, "model": model_dir}


@pytest.fixture(scope="session")
def tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny["model"])
