"""The MUSE suite (Shi et al. 2024, "MUSE: Machine Unlearning Six-Way Evaluation"; code ``swj0419/muse_bench``
``eval.py``; open-unlearning ``configs/eval/muse``), for base (non-chat) models as in MUSE.

Parts (``--splits``):

* ``verbmem``: greedy 128-token continuation of each ``verbmem/forget.json`` prompt; ROUGE-L F1 against ``gt``.
* ``knowmem_forget`` / ``knowmem_retain``: few-shot QA -- the in-context examples of ``*_qa_icl.json`` as
  ``"Question: {q}\\nAnswer: {a}\\n\\n"`` then ``"Question: {q}\\nAnswer: "``; 32 new tokens, cut at
  ``"\\n\\n"``, ``"\\nQuestion"``, ``"Question:"`` (MUSE ``get_prefix_before_words_occur``); ROUGE-L F1 against the
  answer (MUSE's ``mean_rougeL``; the recall is stored too).
* ``privleak``: Min-K% and Min-K%++ (k = 0.4) scores of ``privleak/forget.json`` and ``holdout.json`` texts
  (up to ``max_length`` tokens); AUC of forget vs holdout; PrivLeak relative to the retain model's AUC.
  ``privleak`` is the published number: Min-K% with k = 0.4, as MUSE (``privleak_auc_key='forget_holdout_Min-40%'``)
  and open-unlearning (``configs/eval/muse_metrics/privleak.yaml`` -> ``mia_min_k``, ``k: 0.4``) compute it;
  ``privleak_min_k_pp`` is the same relative difference with Min-K%++ AUCs (not a published number).

ROUGE uses ``use_stemmer=True`` (open-unlearning); MUSE's scorer has ``use_stemmer=False``.  Values are fractions
(MUSE tables show x100); PrivLeak is in percent.
"""

from __future__ import annotations

import time

from palu_ds.data.prompt import encode_text
from palu_ds.dist import gather_records, rank, shard_indices, world

from . import metrics as M
from .checks import check_finite_scores
from .config import SuiteConfig, load_retain_results
from .data import load_muse
from .results import EvalOutput, mean
from .scoring import generate_greedy, pad_id_of, score_targets

QA = {"question": str, "answer": str}
STOP = ("\n\n", "\nQuestion", "Question:")


def icl_prompt(shots: list[dict], question: str) -> str:
    return "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots) + \
        f"Question: {question}\nAnswer: "


def cut_at_stop(text: str, stops=STOP) -> str:
    for s in stops:
        text = text.split(s)[0]
    return text


def _left_truncate(ids: list[int], room: int, bos: int | None) -> list[int]:
    if len(ids) <= room:
        return ids
    if bos is not None and ids and ids[0] == bos:
        return [bos] + ids[len(ids) - room + 1:]
    return ids[len(ids) - room:]


def _generate_part(model, tokenizer, texts: list[str], refs: list[str], cfg: SuiteConfig, max_new: int,
                   stop: bool, extra: list[dict], part: str = "muse") -> list[dict]:
    idx = shard_indices(len(texts), rank(), world())
    room = max(1, (cfg.max_length or 2048) - max_new)
    prompts = [_left_truncate(encode_text(tokenizer, texts[i]), room, tokenizer.bos_token_id) for i in idx]
    gens = generate_greedy(model, tokenizer, prompts, max_new_tokens=max_new, batch_size=cfg.batch_size,
                           desc=f"eval {part}: generation")
    recs = []
    for n, i in enumerate(idx):
        g = cut_at_stop(gens[n]).strip() if stop else gens[n]
        recs.append({"index": i, **extra[i], "generation": g, **M.rouge_l(refs[i], g)})
    return gather_records(recs)


def _privleak_part(model, tokenizer, texts: list[str], cfg: SuiteConfig) -> list[dict]:
    idx = shard_indices(len(texts), rank(), world())
    max_len = cfg.max_length or 2048
    queries = []
    for i in idx:
        ids = encode_text(tokenizer, texts[i])[:max_len]
        if len(ids) < 2:
            raise ValueError(f"MUSE privleak text {i} has fewer than 2 tokens")
        queries.append((ids[:1], ids[1:]))  # first token (BOS when used) conditions, the rest is scored
    stats = score_targets(model, queries, pad_id=pad_id_of(tokenizer), batch_size=cfg.batch_size, vocab_stats=True,
                          desc="eval privleak: scoring")
    recs = [{"index": i, "text_start": texts[i][:80], "n_tokens": int(len(st.logps)),
             "avg_nll": M.mean_nll(st.logps), "min_k": M.min_k(st.logps, cfg.k),
             "min_k_pp": M.min_k_plus_plus(st.logps, st.mu, st.var, cfg.k)} for i, st in zip(idx, stats)]
    return gather_records(recs)


def summarize(examples: dict[str, list[dict]], cfg: SuiteConfig, retain: dict | None) -> dict:
    s: dict = {}
    notes: list[str] = []
    if "verbmem_forget" in examples:
        s["verbmem_f"] = mean(r["rougeL_f1"] for r in examples["verbmem_forget"])
    for part, key in (("knowmem_forget", "knowmem_f"), ("knowmem_retain", "knowmem_r")):
        if part in examples:
            s[key] = mean(r["rougeL_f1"] for r in examples[part])
            s[f"{key}_recall"] = mean(r["rougeL_recall"] for r in examples[part])
    if "privleak_forget" in examples:
        f, h = examples["privleak_forget"], examples["privleak_holdout"]
        s["mia_min_k_pp_auc"] = M.mia_auc([r["min_k_pp"] for r in f], [r["min_k_pp"] for r in h])
        s["mia_min_k_auc"] = M.mia_auc([r["min_k"] for r in f], [r["min_k"] for r in h])
        if not cfg.forget_quality:
            notes.append("privleak omitted (--no-forget-quality / forget_quality=False): it needs a retain model")
        elif retain is not None:
            rf, rh = retain["examples"]["privleak_forget"], retain["examples"]["privleak_holdout"]
            s["retain_mia_min_k_pp_auc"] = M.mia_auc([r["min_k_pp"] for r in rf], [r["min_k_pp"] for r in rh])
            s["retain_mia_min_k_auc"] = M.mia_auc([r["min_k"] for r in rf], [r["min_k"] for r in rh])
            s["privleak"] = M.privleak(s["mia_min_k_auc"], s["retain_mia_min_k_auc"])  # the published one
            s["privleak_min_k_pp"] = M.privleak(s["mia_min_k_pp_auc"], s["retain_mia_min_k_pp_auc"])
            s["privleak_reference"] = retain.get("_path")
    s["notes"] = notes
    return s


def run(model, tokenizer, cfg: SuiteConfig) -> EvalOutput:
    corpus = cfg.split
    retain = load_retain_results(cfg, ["privleak_forget", "privleak_holdout"] if "privleak" in cfg.parts else [])

    def rows(part, fields):
        r = load_muse(cfg.data, corpus, part, fields)
        return r[: cfg.max_examples] if cfg.max_examples else r

    examples, seconds = {}, {}
    for part in cfg.parts:
        t0 = time.perf_counter()
        if part == "verbmem":
            data = rows("verbmem_forget", {"prompt": str, "gt": str})
            examples["verbmem_forget"] = _generate_part(
                model, tokenizer, [d["prompt"] for d in data], [d["gt"] for d in data], cfg,
                cfg.max_new_tokens or 128, stop=False, extra=[{"gt": d["gt"]} for d in data], part=part)
        elif part in ("knowmem_forget", "knowmem_retain"):
            which = part.split("_")[1]
            qa = rows(f"knowmem_{which}_qa", QA)
            shots = load_muse(cfg.data, corpus, f"knowmem_{which}_qa_icl", QA)
            examples[part] = _generate_part(
                model, tokenizer, [icl_prompt(shots, d["question"]) for d in qa], [d["answer"] for d in qa], cfg,
                cfg.max_new_tokens or 32, stop=True,
                extra=[{"question": d["question"], "answer": d["answer"]} for d in qa], part=part)
        elif part == "privleak":
            examples["privleak_forget"] = _privleak_part(model, tokenizer, rows("privleak_forget", None), cfg)
            examples["privleak_holdout"] = _privleak_part(model, tokenizer, rows("privleak_holdout", None), cfg)
        seconds[part] = round(time.perf_counter() - t0, 3)
    return EvalOutput("muse", corpus, cfg.to_dict(), examples, summarize(check_finite_scores(examples), cfg, retain),
                      meta={"part_seconds": seconds})
