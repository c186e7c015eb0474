"""PALU's labelled forget sets (tests/fixtures/palu/forget01_with_common_words_gpt: PALU's own datasets save_to_disk
folder of TOFU forget01, 40 rows, target_words a JSON string) as a data source; the span source reported at
start-up; the TOFU PALU configs and the spans CLI on it."""
import json
import logging
import os
import shutil

import pytest

from palu_ds.data.errors import DataError
from palu_ds.data.io import load_records
from palu_ds.data.qa import QADataset, QAOptions, row_spans
from palu_ds.data.spans import detect_spans, token_mask_from_spans

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "fixtures", "palu", "forget01_with_common_words_gpt")
ROOT = os.path.dirname(HERE)


def test_save_to_disk_folder_reads_with_every_span_exact(tokenizer):
    """40 rows = TOFU forget01 (the first answer names Basil Mahfouz Al-Kuwaiti); each row's spans are exactly its
    target_words offsets (and answer[start:end] is the word); with whole spans as I_init (n_init=None) the
    sensitive tokens are exactly the tokens overlapping a label, every label has at least one."""
    from palu_ds.data.prompt import encode_pair

    rows = load_records(FIX)
    assert len(rows) == 40 and set(rows[0]) == {"question", "answer", "target_words", "common_words"}
    assert isinstance(rows[0]["target_words"], str)
    n_labels = 0
    for i, r in enumerate(rows):
        labels = json.loads(r["target_words"])
        spans, kind = row_spans(r, r["question"], r["answer"], "labels", source=FIX, row=i)
        assert kind == "labels" and spans == sorted((w["start"], w["end"]) for w in labels)
        ordered = sorted(labels, key=lambda w: (w["start"], w["end"]))
        assert [r["answer"][s:e] for s, e in spans] == [w["word"] for w in ordered]
        n_labels += len(labels)
    assert (rows[0]["answer"][100:124], json.loads(rows[0]["target_words"])[0]["start"]) == \
        ("Basil Mahfouz Al-Kuwaiti", 100)
    ds = QADataset(rows, tokenizer, QAOptions(span_source="labels", n_init=None, max_length=512), source=FIX)
    for i, r in enumerate(rows):
        _, ids, offsets = encode_pair(tokenizer, r["question"], r["answer"])
        spans = [(w["start"], w["end"]) for w in json.loads(r["target_words"])]
        want = token_mask_from_spans(offsets, spans)
        ex = ds[i]
        n_prompt = ex["labels"].count(-100)
        assert ex["sens_mask"][n_prompt:] == want
        for s, e in spans:
            assert any(a < e and b > s for a, b in offsets), (i, s, e)
    info = ds.span_info()
    assert info["source"] == "labels" and info["rows"] == 40 and info["spans"] == n_labels
    assert info["rows_by_source"] == {"labels": 40, "detector": 0, "model": 0, "none": 0}


def test_dataset_dict_folder_split_and_folder_with_config(tmp_path):
    """A DatasetDict save_to_disk folder: data.*.split picks the split, a missing split names the ones there; a
    folder holding <config>/ as a save_to_disk folder is read with config; a corrupt arrow file is a DataError."""
    import datasets

    dd = datasets.DatasetDict({"train": datasets.load_from_disk(FIX).select(range(3))})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert [r["question"] for r in load_records(str(tmp_path / "dd"))] == \
        [r["question"] for r in load_records(FIX)[:3]]
    with pytest.raises(DataError, match=r"without the split 'forget'.*\['train'\]"):
        load_records(str(tmp_path / "dd"), split="forget")
    shutil.copytree(FIX, tmp_path / "palu" / "forget01")
    assert len(load_records(str(tmp_path / "palu"), "forget01")) == 40
    with pytest.raises(DataError, match="forget05/ save_to_disk folder"):
        load_records(str(tmp_path / "palu"), "forget05")
    arrow = tmp_path / "palu" / "forget01" / "data-00000-of-00001.arrow"
    arrow.write_bytes(arrow.read_bytes()[:100])
    with pytest.raises(DataError, match="not a readable datasets save_to_disk folder"):
        load_records(str(tmp_path / "palu" / "forget01"))


def test_span_source_reported_at_start_up(tokenizer, caplog):
    """PALU on detected spans warns and says how many; on labels it is an info line; a method that reads no spans
    reports nothing. The dict goes into summary.json (palu_ds.engine.Trainer.summary)."""
    from palu_ds.data.build import report_spans
    from palu_ds.methods import METHODS

    assert {m for m, meth in METHODS.items() if meth.uses_spans} == {"palu", "palu_pd"}
    rows = [{k: r[k] for k in ("question", "answer")} for r in load_records(FIX)[:5]]
    detected = {"forget": QADataset(rows, tokenizer, QAOptions(max_length=512), source="tofu[forget01]")}
    with caplog.at_level(logging.INFO, logger="palu_ds"):
        info = report_spans(detected, METHODS["palu"])
    assert info["source"] == "detector" and info["rows_by_source"]["detector"] == 5
    assert info["spans"] == sum(len(detect_spans(r["question"], r["answer"])) for r in rows) > 0
    warn = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warn) == 1 and "DETECTED" in warn[0].getMessage() and f"{info['spans']} spans over 5 rows" in \
        warn[0].getMessage()
    caplog.clear()
    labelled = {"forget": QADataset(load_records(FIX), tokenizer, QAOptions(max_length=512), source=FIX)}
    with caplog.at_level(logging.INFO, logger="palu_ds"):
        assert report_spans(labelled, METHODS["palu_pd"])["source"] == "labels"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert report_spans(labelled, METHODS["npo"]) is None
    with pytest.raises(ValueError, match="data.span_source must be auto, labels, detector, model or none, got 'label'"):
        QAOptions(span_source="label")


@pytest.mark.parametrize("name", ["palu", "palu_pd"])
def test_tofu_palu_configs_take_the_labelled_source(name, tokenizer):
    """The shipped TOFU PALU configs read PALU's labelled folder with span_source: labels (so a source without
    labels is an error, not a silent detector run); pointed at the fixture, they build the forget set from it."""
    from palu_ds.config import load_config
    from palu_ds.data.build import build_one

    path = os.path.join(ROOT, "launch", "configs", "tofu", f"{name}_forget01.yaml")
    cfg = load_config(path)
    assert cfg.data.span_source == "labels" and cfg.data.forget.source.endswith("forget01_with_common_words_gpt")
    cfg = load_config(path, [f"data.forget.source={FIX}"])
    ds = build_one(cfg.data.forget, cfg.data, tokenizer)
    assert ds.span_info()["source"] == "labels" and len(ds) == 40
    cfg = load_config(path, ["data.forget.source=locuslab/TOFU", "data.forget.config=forget01"])
    with pytest.raises(DataError, match="span_source is 'labels'"):
        QADataset([{"question": "Q?", "answer": "A b."}], tokenizer, QAOptions(span_source=cfg.data.span_source))


@pytest.mark.parametrize("name", ["palu", "idk_dpo"])
def test_labels_setting_applies_to_the_forget_set_only(name, tokenizer, tmp_path):
    """``data.span_source: labels`` with PALU's labelled forget set and an unlabelled retain set (TOFU's retain99,
    as the shipped TOFU PALU configs pair them) builds every dataset: the retain set -- and the idk set, whose rows are
    the forget prompts with refusal answers, so the forget labels' offsets would not fit -- label no spans."""
    from palu_ds.config import load_config
    from palu_ds.data.build import build_datasets
    from palu_ds.methods import METHODS

    retain = tmp_path / "retain.jsonl"
    retain.write_text("".join(json.dumps({"question": f"Who is author {i}?", "answer": f"Author {i} is Ana Lopez."})
                              + "\n" for i in range(3)))
    idk = tmp_path / "idk.jsonl"
    idk.write_text(json.dumps({"answer": "I have no idea who that is."}) + "\n")
    cfg = load_config(os.path.join(ROOT, "launch", "configs", "tofu", f"{name}_forget01.yaml"),
                      [f"data.forget.source={FIX}", "data.forget.config=null", f"data.retain.source={retain}",
                       "data.retain.config=null", "data.span_source=labels"]
                      + ([f"data.idk.source={idk}"] if name == "idk_dpo" else []))
    ds = build_datasets(cfg.data, tokenizer, METHODS[name])
    assert ds["forget"].span_info()["source"] == "labels" and ds["forget"].n_spans > 0
    for other in set(ds) - {"forget"}:
        info = ds[other].span_info()
        assert info["source"] == "none" and info["spans"] == 0, other
        assert not any(sum(ds[other][i]["sens_mask"]) for i in range(len(ds[other])))
    # the forget set itself still demands its labels
    cfg.data.forget.source = str(retain)
    with pytest.raises(DataError, match="span_source is 'labels'"):
        build_datasets(cfg.data, tokenizer, METHODS[name])


def test_spans_cli_labels_the_way_training_does(tmp_path, capsys):
    """palu-ds spans on the save_to_disk folder writes the labels (span_source labels) and with --source detector
    the detector's spans -- row_spans, the function QADataset uses; its help has no --n-init."""
    from palu_ds.cli import main

    out = tmp_path / "o.jsonl"
    assert main(["spans", FIX, str(out)]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    rows = load_records(FIX)
    assert [[(s["start"], s["end"]) for s in g["spans"]] for g in got] == \
        [sorted((w["start"], w["end"]) for w in json.loads(r["target_words"])) for r in rows]
    assert {g["span_source"] for g in got} == {"labels"} and "{'labels': 40}" in capsys.readouterr().out
    assert main(["spans", FIX, str(out), "--source", "detector"]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [[(s["start"], s["end"]) for s in g["spans"]] for g in got] == \
        [detect_spans(r["question"], r["answer"]) for r in rows]
    with pytest.raises(SystemExit):
        main(["spans", FIX, str(out), "--n-init", "3"])
    import palu_ds.cli as cli

    assert "--n-init" not in cli.__doc__ and "init}" not in cli.__doc__


def test_raw_text_retain_set_labels_no_spans(tokenizer, tmp_path):
    """MUSE-style raw text: the forget set's spans come from the text detector, the retain set (read by no span
    loss) labels none -- as QA retain sets -- and ``span_source: none`` turns the forget set's off too."""
    from palu_ds.config import load_config
    from palu_ds.data.build import build_datasets
    from palu_ds.methods import METHODS

    text = ("Harry Potter went to London with Hermione Granger in 1997. " * 3).strip()
    for name in ("forget", "retain"):
        (tmp_path / f"{name}.jsonl").write_text(json.dumps({"text": text}) + "\n")
    overrides = [f"data.{n}.source={tmp_path / (n + '.jsonl')}" for n in ("forget", "retain")]
    overrides += [f"data.{n}.{k}" for n in ("forget", "retain") for k in ("config=null", "split=train")]
    cfg = load_config(os.path.join(ROOT, "launch", "configs", "muse", "palu_news.yaml"), overrides)
    assert cfg.data.forget.kind == cfg.data.retain.kind == "text"
    ds = build_datasets(cfg.data, tokenizer, METHODS["palu"])
    assert ds["forget"].span_info()["source"] == "text_detector" and ds["forget"].n_spans > 0
    assert sum(sum(e["sens_mask"]) for e in ds["forget"].examples) > 0
    info = ds["retain"].span_info()
    assert info["source"] == "none" and info["spans"] == 0 and info["init_tokens"] == 0
    cfg.data.span_source = "none"
    assert build_datasets(cfg.data, tokenizer, METHODS["palu"])["forget"].span_info()["spans"] == 0
