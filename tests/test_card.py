"""The model card written with every saved model (palu_ds.card): Hugging Face metadata and the run's record; a card
that cannot be written is a warning that leaves the model as it was. The cards of real runs (unlearning, with an
evaluation, and the demo's fine-tuned targets) are checked in tests/test_engine_e2e.py and tests/test_demo.py."""
import logging
import os

import pytest

from palu_ds.card import git_commit, run_info, write_card
from palu_ds.config import load_config, resolve
from palu_ds.data.build import build_datasets


@pytest.fixture()
def info(tiny, tokenizer):
    """A pd_flat run on the tiny data whose config names hub sources (the card records names, it loads nothing)."""
    cfg = load_config(None, ["model.path=HuggingFaceTB/SmolLM2-135M-Instruct", "data.forget.source=locuslab/TOFU",
                             "data.forget.config=forget10", "data.retain.source=locuslab/TOFU",
                             "data.retain.config=retain90", "method.name=pd_flat", "reference.mode=none",
                             "train.output_dir=runs/pd_flat_tofu"])
    run = resolve(cfg)
    local = load_config(None, [f"model.path={tiny['model']}", f"data.forget.source={tiny['data']}",
                               "data.forget.config=forget10", f"data.retain.source={tiny['data']}",
                               "data.retain.config=retain90", "method.name=pd_flat", "reference.mode=none"])
    datasets = build_datasets(local.data, tokenizer, run.method)
    return run_info(run, datasets, steps=12, world_size=4, skipped_steps=1,
                    final={"loss/forget": 0.5, "loss/retain": 0.25, "loss/total": 0.75, "dual/lambda": 3.5, "lr": 1e-5},
                    spans={"source": "labels", "rows": 40, "spans": 80, "init_tokens": 120},
                    evaluation={"step": 12, "metrics": {"forget_quality": 0.42, "model_utility": 0.61,
                                                        "forget/prob": 0.1}})


def test_card_metadata_and_record(info, tmp_path):
    from huggingface_hub import ModelCard

    (tmp_path / "model.safetensors").write_bytes(b"weights")
    path = write_card(str(tmp_path), info)
    card = ModelCard.load(path)
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.library_name == "transformers"
    assert card.data.tags == ["palu_ds", "unlearning", "pd_flat"] and card.data.datasets == ["locuslab/TOFU"]
    text = card.text
    assert text.startswith("\n# pd_flat_tofu\n") and "by **pd_flat**" in text and "arXiv 2506.05314" in text
    for k, v in (("lambda0", "100"), ("eta_lambda", "5"), ("epsilon", "0.3"), ("dual_update", "step")):
        assert f"| {k} | {v} |" in text
    assert f"| forget | locuslab/TOFU | forget10 | train | 40 | {info['data']['forget']['sha256']} |" in text
    assert "| retain | locuslab/TOFU | retain90 | train | 360 |" in text
    assert "source **labels**" in text and "init_tokens 120" in text
    for row in ("| steps | 12 |", "| world size | 4 |", "| skipped (non-finite) steps | 1 |",
                "| reference | none (reference-free) |", "| dual/lambda | 3.5 |", "| loss/retain | 0.25 |"):
        assert row in text, row
    assert "| lr | 1e-05 |" in text and "| lr | 1e-05 |\n" not in text.split("## Final values")[1]
    assert "at step 12" in text and "| forget_quality | 0.42 |" in text and "forget/prob" not in text  # headline
    assert f"palu_ds {info['version']}" in text and (info["commit"] is None or info["commit"][:12] in text)


def test_commit_outside_a_checkout_is_none(tmp_path):
    assert git_commit(str(tmp_path)) is None


def test_a_card_that_cannot_be_written_is_a_warning_and_the_model_stays(info, tmp_path, caplog):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "README.md").mkdir()  # in the way: the card cannot be written there (as in a read-only folder)
    with caplog.at_level(logging.WARNING, logger="palu_ds"):
        assert write_card(str(tmp_path), info) is None
    assert "model card not written" in caplog.text and str(tmp_path) in caplog.text
    assert (tmp_path / "model.safetensors").read_bytes() == b"weights" and (tmp_path / "README.md").is_dir()
    assert sorted(os.listdir(tmp_path)) == ["README.md", "model.safetensors"]  # no temporary left behind
