"""The TOFU suite (Maini et al. 2024; metric definitions as in ``locuslab/tofu`` and open-unlearning, see
:mod:`palu_eval.metrics`).

Parts (``--splits``) and their files (TOFU configs):

==============  ==============================  ===========================================================
part            config                          per example
==============  ==============================  ===========================================================
forget          ``<split>_perturbed``           prob, para_prob, pert_probs, truth ratio, ROUGE-L, ES, Min-K%
retain          ``retain_perturbed``            prob, para_prob, pert_probs, truth ratio, ROUGE-L, ES
real_authors    ``real_authors_perturbed``      prob, normalized prob over options, truth ratio, ROUGE-L, ES
world_facts     ``world_facts_perturbed``       same as real_authors
holdout         ``holdout<NN>``                 Min-K% (for the MIA AUC / PrivLeak against forget)
==============  ==============================  ===========================================================

Aggregates: per part means (truth ratio: forget ``mean(min(R, 1/R))``, others ``mean(max(0, 1 - R))``); model
utility = harmonic mean of retain/real_authors/world_facts x (prob, ROUGE-L recall, truth ratio) -- over what
ran, said in ``model_utility_note`` when fewer than nine; forget quality = KS p-value against the retain model's
forget truth ratios; PrivLeak = Min-K% AUC (forget vs holdout) relative to the retain model's.
"""

from __future__ import annotations

import re
import time

from palu_ds.data.prompt import encode_qa
from palu_ds.dist import gather_records, rank, shard_indices, world

from . import metrics as M
from .checks import check_finite_scores
from .config import SuiteConfig, load_retain_results
from .data import load_tofu
from .results import EvalOutput, mean
from .scoring import generate_greedy, pad_id_of, score_targets

QA = {"question": str, "answer": str}
PERTURBED = {**QA, "paraphrased_answer": str, "perturbed_answer": list}
OPTIONS = {**QA, "perturbed_answer": list}
UTILITY_PARTS = ("retain", "real_authors", "world_facts")
UTILITY_METRICS = ("prob", "rougeL_recall", "truth_ratio")


def part_config(part: str, split: str) -> tuple[str, dict]:
    """(TOFU config name, required fields) of a part."""
    m = re.fullmatch(r"forget(\d+)", split)
    if not m:
        raise ValueError(f"TOFU split must look like forget01 / forget05 / forget10, got {split!r}")
    return {
        "forget": (f"{split}_perturbed", PERTURBED),
        "retain": ("retain_perturbed", PERTURBED),
        "real_authors": ("real_authors_perturbed", OPTIONS),
        "world_facts": ("world_facts_perturbed", OPTIONS),
        "holdout": (f"holdout{m.group(1)}", QA),
    }[part]


def _truncate(prompt: list[int], target: list[int], max_length: int) -> list[int]:
    room = max(1, max_length - len(prompt))
    return target[:room]


def _eval_part(model, tokenizer, part: str, rows: list[dict], cfg: SuiteConfig) -> list[dict]:
    """Per-example records of one part, for this rank's shard, gathered over ranks (ordered by index)."""
    idx = shard_indices(len(rows), rank(), world())
    max_len = cfg.max_length or 512
    generate = part != "holdout"
    mia = part in ("forget", "holdout")
    has_para = part in ("forget", "retain")

    queries, spans, prompts = [], [], []
    for i in idx:
        r = rows[i]
        answers = [r["answer"]]
        if part != "holdout":
            answers += ([r["paraphrased_answer"]] if has_para else []) + list(r["perturbed_answer"])
        prompt, targets = encode_qa(tokenizer, r["question"], answers, fmt=cfg.prompt)
        spans.append((len(queries), len(targets)))
        queries += [(prefix, _truncate(prefix, t, max_len)) for prefix, t in targets]
        prompts.append(prompt)
    pad = pad_id_of(tokenizer)
    stats = score_targets(model, queries, pad_id=pad, batch_size=cfg.batch_size, desc=f"eval {part}: scoring")
    gens = (generate_greedy(model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens or 200,
                            batch_size=cfg.batch_size, desc=f"eval {part}: generation")
            if generate else [None] * len(idx))
    eos = tokenizer.eos_token_id

    records = []
    for n, i in enumerate(idx):
        r = rows[i]
        first, count = spans[n]
        ans = stats[first]
        # the answer's content tokens: EOS excluded for ES / EM / Min-K (open-unlearning drops the last label)
        content = slice(0, len(ans.logps) - 1) if (eos is not None and len(ans.logps) > 1
                                                   and queries[first][1][-1] == eos) else slice(None)
        rec = {"index": i, "question": r["question"], "answer": r["answer"],
               "n_answer_tokens": int(len(ans.logps)), "avg_nll": M.mean_nll(ans.logps),
               "prob": M.probability(ans.logps)}
        if mia:
            rec["min_k"] = M.min_k(ans.logps[content], cfg.k)
        if part != "holdout":
            rec["extraction_strength"] = M.extraction_strength(ans.greedy_match[content])
            rec["exact_memorization"] = M.exact_memorization(ans.greedy_match[content])
            others = stats[first + 1: first + count]
            if has_para:
                para, perts = others[0], others[1:]
                rec["para_prob"] = M.probability(para.logps)
                ref_nll = M.mean_nll(para.logps)
            else:
                perts = others
                ref_nll = rec["avg_nll"]  # real authors / world facts: the answer itself is the "true" option
            pert_nlls = [M.mean_nll(p.logps) for p in perts]
            rec["pert_probs"] = [M.probability(p.logps) for p in perts]
            rec["truth_ratio"] = M.truth_ratio(ref_nll, pert_nlls)
            if not has_para:
                rec["normalized_prob"] = M.normalized_probability(rec["prob"], rec["pert_probs"])
            gen = gens[n].strip()
            rec["generation"] = gen
            rec.update(M.rouge_l(r["answer"], gen))
        records.append(rec)
    return gather_records(records)


def aggregate_part(part: str, recs: list[dict]) -> dict:
    """Part-level values from per-example records (also used to recompute from a saved results JSON)."""
    if part == "holdout":
        return {}
    def has(key):  # a value every record holds (open-unlearning's logs have ES / EM on forget only)
        return bool(recs) and all(r.get(key) is not None for r in recs)

    out = {}
    if has("prob"):
        out["prob"] = mean(r["normalized_prob"] if part in ("real_authors", "world_facts") else r["prob"]
                           for r in recs)
    if has("rougeL_recall"):
        out["rougeL_recall"] = mean(r["rougeL_recall"] for r in recs)
    if has("truth_ratio"):
        tr = [r["truth_ratio"] for r in recs]
        out["truth_ratio"] = M.truth_ratio_forget(tr) if part == "forget" else M.truth_ratio_retain(tr)
    for key in ("extraction_strength", "exact_memorization", "rougeL_f1"):
        if has(key):
            out[key] = mean(r[key] for r in recs)
    if has("pert_probs"):
        out["pert_prob"] = mean(mean(r["pert_probs"]) for r in recs)
    if part in ("forget", "retain") and has("para_prob"):
        out["para_prob"] = mean(r["para_prob"] for r in recs)
    elif part not in ("forget", "retain") and has("prob"):
        out["answer_prob"] = mean(r["prob"] for r in recs)  # unnormalized, for reference
    return out


def summarize(examples: dict[str, list[dict]], cfg: SuiteConfig, retain: dict | None) -> dict:
    """The flat summary: per-part values, model utility, forget quality, MIA AUC and PrivLeak."""
    s: dict = {}
    notes: list[str] = []
    for part, recs in examples.items():
        for key, val in aggregate_part(part, recs).items():
            s[f"{part}/{key}"] = val
    comps = [f"{p}/{m}" for p in UTILITY_PARTS for m in UTILITY_METRICS if f"{p}/{m}" in s]
    if comps:
        s["model_utility"] = M.harmonic_mean(s[c] for c in comps)
        s["model_utility_components"] = comps
        if len(comps) < 9:
            missing = [p for p in UTILITY_PARTS if p not in examples]
            notes.append(f"model_utility is the harmonic mean of {len(comps)} of the 9 TOFU values: splits "
                         f"{missing} did not run, so it is not comparable with the full TOFU model utility")
            s["model_utility_note"] = notes[-1]
    if "forget" in examples and "holdout" in examples:
        s["mia_min_k_auc"] = M.mia_auc([r["min_k"] for r in examples["forget"]],
                                       [r["min_k"] for r in examples["holdout"]])
    if not cfg.forget_quality:
        notes.append("forget_quality and privleak omitted (--no-forget-quality / forget_quality=False)")
    elif retain is not None:
        if "forget" in examples:
            key = "question" if all("question" in r for r in retain["examples"]["forget"]) else "answer"
            mine = [r.get(key) for r in examples["forget"]]
            theirs = [r.get(key) for r in retain["examples"]["forget"]]
            if mine != theirs:
                notes.append(f"the retain results' forget set ({len(theirs)} rows) is not this run's forget set "
                             f"({len(mine)} rows, e.g. a different --max-examples): forget quality compares "
                             f"different questions")
            fq = M.forget_quality([r["truth_ratio"] for r in examples["forget"]],
                                  [r["truth_ratio"] for r in retain["examples"]["forget"]])
            s.update(fq)
            s["forget_quality_reference"] = retain.get("_path")
        if "mia_min_k_auc" in s:
            r_auc = M.mia_auc([r["min_k"] for r in retain["examples"]["forget"]],
                              [r["min_k"] for r in retain["examples"]["holdout"]])
            s["retain_mia_min_k_auc"] = r_auc
            s["privleak"] = M.privleak(s["mia_min_k_auc"], r_auc)
    if "forget" not in examples:
        notes.append("forget quality not computed: the forget split did not run")
    if "mia_min_k_auc" not in s:
        notes.append("privleak / MIA AUC not computed: needs both the forget and the holdout splits")
    s["notes"] = notes
    return s


def retain_parts_needed(cfg: SuiteConfig) -> list[str]:
    parts = cfg.parts
    need = ["forget"] if "forget" in parts else []
    if "forget" in parts and "holdout" in parts:
        need.append("holdout")
    return need


def run(model, tokenizer, cfg: SuiteConfig) -> EvalOutput:
    retain = load_retain_results(cfg, retain_parts_needed(cfg))  # fail before any compute
    examples, seconds = {}, {}
    for part in cfg.parts:
        t0 = time.perf_counter()
        config, fields = part_config(part, cfg.split)
        rows = load_tofu(cfg.data, config, fields)
        if cfg.max_examples:
            rows = rows[: cfg.max_examples]
        examples[part] = _eval_part(model, tokenizer, part, rows, cfg)
        seconds[part] = round(time.perf_counter() - t0, 3)
    return EvalOutput("tofu", cfg.split, cfg.to_dict(), examples, summarize(check_finite_scores(examples), cfg, retain),
                      meta={"part_seconds": seconds})
