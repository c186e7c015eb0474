"""`palu-ds spans` writes each row's sensitive spans; a token-classification model can supply them."""
import json

import pytest

from palu_ds.cli import main


def test_spans_cli_from_labels_and_detector(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    rows = [{"question": "Where was Kalo Vomi born?", "answer": "Kalo Vomi was born in Veloria, Kestria."},
            {"question": "Q?", "answer": "It was Zelmor.", "target_words": [{"word": "Zelmor", "start": 7, "end": 13}]}]
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["spans", str(src), str(out)]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [s["word"] for s in got[0]["spans"]] == ["Veloria, Kestria"]  # detector (no labels)
    assert [s["word"] for s in got[1]["spans"]] == ["Zelmor"]  # labels
    assert "wrote 2 rows with 2 spans" in capsys.readouterr().out


def test_spans_cli_bad_row_names_it_and_writes_nothing(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"question": "Q?", "answer": "A."}) + "\n" + json.dumps({"question": "Q?"}) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["spans", str(src), str(out)]) == 2
    assert "line 2" in capsys.readouterr().err and not out.exists()


@pytest.fixture(scope="module")
def ner_dir(tiny, tmp_path_factory):
    """A tiny (random) Llama token classifier with PER labels, saved as an HF dir."""
    import torch
    from transformers import AutoTokenizer, LlamaForTokenClassification

    from palu_ds.tiny import tiny_llama_config

    tok = AutoTokenizer.from_pretrained(tiny["model"])
    cfg = tiny_llama_config(len(tok), tokenizer=tok)
    cfg.num_labels, cfg.id2label, cfg.label2id = 3, {0: "O", 1: "B-PER", 2: "I-PER"}, {"O": 0, "B-PER": 1, "I-PER": 2}
    torch.manual_seed(0)
    model = LlamaForTokenClassification(cfg)
    with torch.no_grad():  # make it call every token PER, so spans are deterministic: the whole answer
        model.score.weight.zero_()
        model.score.bias = torch.nn.Parameter(torch.tensor([0.0, 5.0, 0.0]))
    d = tmp_path_factory.mktemp("ner")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def test_token_classification_model_spans(tokenizer, ner_dir):
    from palu_ds.data import QADataset, QAOptions

    ds = QADataset([{"question": "Who?", "answer": "Kalo Vomi"}], tokenizer,
                   QAOptions(span_source="model", span_model=ner_dir, n_init=None))
    ex = ds[0]
    n_prompt = ex["labels"].count(-100)
    answer_tokens = len(ex["input_ids"]) - n_prompt - 1  # without EOS
    assert sum(ex["sens_mask"]) == answer_tokens and ex["common_mask"][-1]


def test_model_source_needs_a_model_name(tokenizer):
    from palu_ds.data import QADataset, QAOptions

    with pytest.raises(ValueError, match="span_model"):
        QADataset([{"question": "Q?", "answer": "A."}], tokenizer, QAOptions(span_source="model"))
