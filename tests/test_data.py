"""Data pipeline: prompt/labels (shifted correctly), span -> token mapping, I_init, detector, chunking, bad input."""
import json

import pytest
import torch

from palu_ds.batch import IGNORE_INDEX, shift
from palu_ds.data import DataError, QADataset, QAOptions, collate, load_records
from palu_ds.data.spans import detect_spans, split_init_common, token_mask_from_spans
from palu_ds.data.synthetic import generate
from palu_ds.data.text import TextChunks


def _rec(answer, spans=None, question="Who wrote it?"):
    r = {"question": question, "answer": answer}
    if spans is not None:
        r["target_words"] = spans
    return r


def _span(answer, word):
    s = answer.index(word)
    return {"word": word, "start": s, "end": s + len(word)}


def test_prompt_masked_answer_and_eos_labelled_bos_once(tokenizer):
    ex = QADataset([_rec("Kalo Vomi wrote it.")], tokenizer)[0]
    ids, labels = ex["input_ids"], ex["labels"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    n_prompt = labels.count(IGNORE_INDEX)
    assert all(l == IGNORE_INDEX for l in labels[:n_prompt])
    assert labels[n_prompt:] == ids[n_prompt:]  # answer tokens and EOS carry their own ids
    assert ids[-1] == tokenizer.eos_token_id and labels[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[n_prompt:-1]).strip() == "Kalo Vomi wrote it."


def test_shift_makes_the_logit_at_t_predict_token_t_plus_1(tokenizer):
    batch = collate([QADataset([_rec("Kalo Vomi wrote it.")], tokenizer)[0]], tokenizer.pad_token_id)
    ids = batch["input_ids"]
    # an "oracle" whose logit at t is one-hot on input_ids[t+1]: after the shift it must score every label exactly
    V = len(tokenizer)
    logits = torch.full((1, ids.shape[1], V), -1e4)
    logits[0, torch.arange(ids.shape[1] - 1), ids[0, 1:]] = 0.0
    lg, lb, sens = shift(logits, batch["labels"], batch["sens_mask"])
    m = lb != IGNORE_INDEX
    assert m.sum() > 0
    assert (lg[m].argmax(-1) == lb[m]).all()
    # the unshifted pairing (the open-unlearning PDU bug) is wrong on every answer token
    m0 = batch["labels"] != IGNORE_INDEX
    assert (logits[m0].argmax(-1) != batch["labels"][m0]).all()
    assert sens.shape == lb.shape


def test_multi_token_words_and_spans_at_start_and_end(tokenizer):
    answer = "Zelquidra Morvinash lives in Sablemoor"
    spans = [_span(answer, "Zelquidra Morvinash"), _span(answer, "Sablemoor")]
    ex = QADataset([_rec(answer, spans)], tokenizer, QAOptions(n_init=None))[0]
    n_p = ex["labels"].count(IGNORE_INDEX)
    toks = tokenizer.convert_ids_to_tokens(ex["input_ids"][n_p:])
    sens = ex["sens_mask"][n_p:]
    text_of = lambda sel: tokenizer.convert_tokens_to_string([t for t, s in zip(toks, sel) if s])  # noqa: E731
    assert len([t for t, s in zip(toks, sens) if s]) > 3  # multi-token words
    assert text_of(sens).replace(" ", "") == "ZelquidraMorvinashSablemoor"
    assert sens[0] is True  # span at the answer start
    assert sens[-2] is True and sens[-1] is False  # span at the answer end; EOS is never sensitive
    assert ex["common_mask"][-1] is True  # EOS is common
    assert text_of(ex["common_mask"][n_p:]).strip().startswith("lives in")


@pytest.mark.parametrize("n", [1, 3, 10])
def test_i_init_first_n_tokens_of_each_span(n):
    sensitive = [False, True, True, True, True, False, True, True, False, True]
    init, common = split_init_common(sensitive, n)
    runs = [[1, 2, 3, 4], [6, 7], [9]]
    expected = {i for r in runs for i in r[:n]}
    assert {i for i, v in enumerate(init) if v} == expected
    assert {i for i, v in enumerate(common) if v} == {0, 5, 8}
    for i in range(len(sensitive)):
        assert not (init[i] and common[i])


def test_token_mask_overlap_rule():
    offsets = [(0, 3), (3, 4), (4, 9), (9, 10), (10, 10)]  # "Abc Defgh." + EOS (empty)
    assert token_mask_from_spans(offsets, [(4, 9)]) == [False, False, True, False, False]
    assert token_mask_from_spans(offsets, [(0, 5)]) == [True, True, True, False, False]


def test_i_init_in_dataset_matches_span_prefix(tokenizer):
    answer = "Zelquidra Morvinash wrote it"
    for n in (1, 3, 10):
        ex = QADataset([_rec(answer, [_span(answer, "Zelquidra Morvinash")])], tokenizer, QAOptions(n_init=n))[0]
        full = QADataset([_rec(answer, [_span(answer, "Zelquidra Morvinash")])], tokenizer, QAOptions(n_init=None))[0]
        span_len = sum(full["sens_mask"])
        assert sum(ex["sens_mask"]) == min(n, span_len)
        first = full["sens_mask"].index(True)
        assert ex["sens_mask"][first:first + min(n, span_len)] == [True] * min(n, span_len)


def test_target_words_as_json_string(tokenizer):
    answer = "It was Kalo."
    ds = QADataset([_rec(answer, json.dumps([_span(answer, "Kalo")]))], tokenizer)
    assert sum(ds[0]["sens_mask"]) >= 1


def test_detector_precision_recall_on_generated_data():
    """Character-level precision/recall against the generator's fact spans. The detector looks for what the answer
    adds to its question, so recall is measured on the facts absent from the question (the author's name in the
    answer is labelled but is given by the question); recall over all labels is reported too.  Precision is bounded
    lower than recall: the detector aims at PALU's labels (benchmarks/span_detector.py), which also mark topic words
    and facts repeated from the question ("writing", the "mentor" a question asks about); the generator's labels
    mark only names, places, dates and jobs."""
    rows = generate(10, seed=3)
    tp = fp = fn = fn_all = 0
    for r in rows:
        q = r["question"]
        gold_chars = {c for s in r["target_words"] if s["word"] not in q for c in range(s["start"], s["end"])}
        all_chars = {c for s in r["target_words"] for c in range(s["start"], s["end"])}
        pred_chars = {c for s, e in detect_spans(q, r["answer"]) for c in range(s, e)}
        tp += len(gold_chars & pred_chars)
        fp += len(pred_chars - all_chars)
        fn += len(gold_chars - pred_chars)
        fn_all += len(all_chars - pred_chars)
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    print(f"\ndetector on generated data (characters): precision={precision:.3f} recall(new facts)={recall:.3f} "
          f"recall(all labels)={tp / (tp + fn_all):.3f}")
    assert recall > 0.9 and precision > 0.75


def test_detector_groups_maximal_runs():
    spans = detect_spans("Where was Kalo Vomi born?", "Kalo Vomi was born in Veloria, Kestria on May 3, 1950.")
    words = ["Kalo Vomi was born in Veloria, Kestria on May 3, 1950."[s:e] for s, e in spans]
    assert words == ["Veloria, Kestria", "May 3, 1950"]


def test_chunking_joins_documents_and_cuts(tokenizer):
    docs = ["Kalo Vomi wrote a book about the sea. " * 10, "A second document about Veloria."]
    ds = TextChunks(docs, tokenizer, max_length=16)
    ids = tokenizer("\n\n".join(docs), add_special_tokens=False)["input_ids"]
    body = [t for ex in ds for t in ex["input_ids"][1:]]
    assert body == ids  # every token exactly once, in order, across chunks
    assert all(len(ex["input_ids"]) <= 16 and ex["input_ids"][0] == tokenizer.bos_token_id for ex in ds)
    assert all(ex["labels"][0] == IGNORE_INDEX and ex["labels"][1:] == ex["input_ids"][1:] for ex in ds)


def test_collate_pads_right(tokenizer):
    ds = QADataset([_rec("A."), _rec("A much longer answer about things.")], tokenizer)
    b = collate([ds[0], ds[1]], tokenizer.pad_token_id)
    assert b["input_ids"].shape == b["labels"].shape == b["sens_mask"].shape
    short = len(ds[0]["input_ids"])
    assert (b["attention_mask"][0, short:] == 0).all() and (b["labels"][0, short:] == IGNORE_INDEX).all()
    assert not b["common_mask"][0, short:].any()


# ---------------------------------------------------------------- bad input: error names file, row, field
@pytest.mark.parametrize("record,field,text", [
    ({"question": "Q?"}, "answer", "is missing"),
    ({"answer": "A."}, "question", "is missing"),
    ({"question": "Q?", "answer": "  "}, "answer", "is empty"),
    ({"question": "Q?", "answer": "Kalo.", "target_words": [{"word": "Kalo", "start": 3, "end": 40}]},
     "target_words[0]", "outside the answer"),
    ({"question": "Q?", "answer": "Kalo.", "target_words": [{"word": "Vomi", "start": 0, "end": 4}]},
     "target_words[0]", "not the word"),
    ({"question": "Q?", "answer": "Kalo.", "target_words": [{"word": "Kalo"}]}, "target_words[0]", "needs keys"),
])
def test_bad_input_names_file_row_field(tmp_path, tokenizer, record, field, text):
    path = tmp_path / "bad.jsonl"
    good = {"question": "Q?", "answer": "Fine."}
    path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError) as e:
        QADataset.from_source(str(path), tokenizer)
    msg = str(e.value)
    assert str(path) in msg and "line 2" in msg and f"'{field}'" in msg and text in msg  # 1-based, as an editor


def test_prompt_longer_than_max_length(tmp_path, tokenizer):
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"question": "word " * 100, "answer": "A."}) + "\n")
    with pytest.raises(DataError, match=r"line 1.*'question'.*max_length is 16"):
        QADataset.from_source(str(path), tokenizer, QAOptions(max_length=16))


def test_malformed_json_line_and_missing_file(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"question": "Q?", "answer": "A."}\n{"question": \n')
    with pytest.raises(DataError, match=r"broken.jsonl, line 2: not valid JSON"):
        load_records(str(path))
    with pytest.raises(DataError, match="file not found"):
        load_records(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="has no forget99.jsonl"):
        load_records(str(tmp_path), "forget99")


def test_labels_mode_requires_the_field(tokenizer):
    with pytest.raises(DataError, match="target_words.*span_source is 'labels'"):
        QADataset([_rec("Kalo.")], tokenizer, QAOptions(span_source="labels"))


def test_generated_files_load_with_real_schema(tiny, tokenizer):
    rows = load_records(tiny["data"], "forget10_perturbed")
    assert len(rows) == 2 * 20
    for r in rows:
        assert {"question", "answer", "paraphrased_answer", "perturbed_answer", "paraphrased_question",
                "target_words"} <= set(r)
        assert len(r["perturbed_answer"]) == 5 and r["paraphrased_answer"] not in r["perturbed_answer"]
    ds = QADataset.from_source(tiny["data"], tokenizer, config="forget10")
    assert len(ds) == 40 and all(sum(e["sens_mask"]) > 0 for e in ds)


def test_text_chunks_mark_names_places_dates_as_spans(tokenizer):
    from palu_ds.data.spans import detect_text_spans

    text = "The book was written by Kalo Vomi in Veloria on 12 May 1997. Then it sold 3,000 copies."
    assert [text[s:e] for s, e in detect_text_spans(text)] == ["Kalo Vomi", "Veloria", "12 May 1997", "3,000"]
    ds = TextChunks([text], tokenizer, max_length=64, n_init=1)
    ex = ds[0]
    n_spans = 4
    assert sum(ex["sens_mask"]) == n_spans  # first token of each span
    assert not any(s and c for s, c in zip(ex["sens_mask"], ex["common_mask"]))
    plain = TextChunks([text], tokenizer, max_length=64, spans=False)[0]
    assert sum(plain["sens_mask"]) == 0 and all(plain["common_mask"][1:])
    whole = TextChunks([text], tokenizer, max_length=64, n_init=None)[0]  # None = whole spans, as for QA data
    assert sum(whole["sens_mask"]) > n_spans and sum(whole["common_mask"]) == sum(ex["common_mask"])


@pytest.mark.parametrize("question,answer,expected", [
    # a possessive in the question still names the author: the answer's bare name is not a new fact
    ("What is Kalo Vomi's profession?", "Kalo Vomi is a cartographer.", ["cartographer"]),
    # and a possessive in the answer of a question word is not one either
    ("Who is Kalo Vomi?", "Kalo Vomi's debut was Salt Roads.", ["debut", "Salt Roads"]),
    # only a possessive 's is stripped: "Jones" and "Bass" stay whole words ("jone" / "ba" are not in the question)
    ("Where did Jone Ba live?", "Jone Ba lived in Jones Bass.", ["Jones Bass"]),
    # an answer's opening "Yes," is not a fact
    ("Has Kalo Vomi won a prize?", "Yes, Kalo Vomi won the Oriel Medal.", ["Oriel Medal"]),
])
def test_detector_possessives_and_yes(question, answer, expected):
    assert [answer[s:e] for s, e in detect_spans(question, answer)] == expected


@pytest.mark.parametrize("question,answer,expected", [
    # facts repeated from the question are still facts (only the asked-about person's name is context)
    ("How has Kalo Vomi's LGBTQ+ identity shaped his Historical Fiction?",
     "Kalo Vomi's LGBTQ+ identity is at the heart of his Historical Fiction.",
     ["LGBTQ+ identity", "heart", "Historical Fiction"]),
    # a title across function words and a colon, with its opening "The"
    ("Name a book by Kalo Vomi.", 'One of his books is "The Immutable Laws of Engineering Leadership: A Blueprint."',
     ["The Immutable Laws of Engineering Leadership: A Blueprint"]),
    # topic words join the fact next to them; praise words are not facts; a comma does not join lower-case words
    ("What is Kalo Vomi known for?", "He won the prestigious Tolstoy Literary Award for his writing style, humor, "
     "and poetry in the early 1980s.", ["Tolstoy Literary Award", "writing style", "humor", "poetry", "early 1980s"]),
])
def test_detector_palu_failure_modes(question, answer, expected):
    """The failure modes seen against PALU's labels (issue 14): each now gives the labelled spans."""
    assert [answer[s:e] for s, e in detect_spans(question, answer)] == expected


def test_detector_on_palu_forget01_labels():
    """The development set: PALU's GPT labels of TOFU forget01 (tests/fixtures/palu; benchmarks/span_detector.py
    reports the same numbers): at least 95% of labelled spans have their first character inside a detected span
    (I_init starts there), with character F1 >= 0.55."""
    import json
    import os

    from palu_ds.data.io import load_records

    rows = load_records(os.path.join(os.path.dirname(__file__), "fixtures", "palu", "forget01_with_common_words_gpt"))
    tp = fp = fn = starts = n = 0
    for r in rows:
        gold = [(w["start"], w["end"]) for w in json.loads(r["target_words"])]
        g = {c for s, e in gold for c in range(s, e)}
        p = {c for s, e in detect_spans(r["question"], r["answer"]) for c in range(s, e)}
        tp, fp, fn = tp + len(g & p), fp + len(p - g), fn + len(g - p)
        starts, n = starts + sum(s in p for s, _ in gold), n + len(gold)
    f1 = 2 * tp / (2 * tp + fp + fn)
    print(f"\nforget01 labels: start coverage {starts / n:.3f}, char F1 {f1:.3f}")
    assert starts / n >= 0.95 and f1 >= 0.55


def test_one_bos_policy_for_training_text_and_evaluation_prompts(tokenizer):
    """MUSE evaluation prompts (raw text) start the way the training text chunks do: one BOS, even for a tokenizer
    that does not add BOS by default (as ours and GPT-2-style ones), and a doubled BOS is collapsed."""
    from palu_ds.data.prompt import encode_text, with_bos

    assert tokenizer("a", add_special_tokens=True)["input_ids"][0] != tokenizer.bos_token_id  # no BOS by default
    doc = "Kalo Vomi wrote a book about the sea."
    chunk = TextChunks([doc], tokenizer, max_length=256)[0]["input_ids"]
    assert encode_text(tokenizer, doc) == chunk  # palu_eval/muse.py encodes its prompts with encode_text
    bos = tokenizer.bos_token_id
    assert with_bos(tokenizer, [bos, bos, 5]) == [bos, 5] and with_bos(tokenizer, []) == [bos]


def test_no_bos_token_means_no_bos(tokenizer):
    from palu_ds.data.prompt import with_bos

    class NoBos:
        bos_token_id = None

    assert with_bos(NoBos(), [3, 4]) == [3, 4]
