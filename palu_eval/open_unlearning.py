"""Read open-unlearning's TOFU evaluation logs (``TOFU_EVAL.json``, what its ``retain_logs_path`` points to) as our
per-example results, so that ``--retain-results`` can be either our ``results.json`` or an open-unlearning log.

open-unlearning (``locuslab/open-unlearning``, ``src/evals/metrics/*``, ``configs/eval/tofu_metrics/*``) writes one
entry per metric: ``{"agg_value": x, "value_by_index": {"0": {...}, ...}}`` (MIA metrics: ``{"forget": {...},
"holdout": {...}, "auc": x}``).  :func:`tofu_eval_to_examples` turns the per-example values into our records:

================  =====================================================================================
our part/key      open-unlearning per-example values
================  =====================================================================================
forget            ``forget_Q_A_Prob`` (prob, avg_nll), ``forget_Q_A_PARA_Prob``, ``forget_Q_A_PERT_Prob``,
                  ``forget_Q_A_ROUGE``, ``extraction_strength``, ``exact_memorization``, ``mia_min_k.forget``
retain            ``retain_Q_A_Prob``, ``retain_Q_A_PARA_Prob``, ``retain_Q_A_PERT_Prob``, ``retain_Q_A_ROUGE``
real_authors      ``ra_Q_A_Prob``, ``ra_Q_A_PERT_Prob``, ``ra_Q_A_ROUGE`` (normalized prob recomputed)
world_facts       ``wf_*`` as real_authors
holdout           ``mia_min_k.holdout``
truth_ratio       recomputed from the answers' avg losses with :func:`palu_eval.metrics.truth_ratio`
                  (their ``*_Truth_Ratio`` / ``forget_truth_ratio`` ``score`` is kept as ``ou_truth_ratio``)
min_k             minus their score (open-unlearning's Min-K% score is a loss: ``-mean(lowest k log-probs)``)
================  =====================================================================================

open-unlearning's Min-K% uses ``k = 0.4`` (``configs/eval/tofu_metrics/mia_min_k.yaml``); the log does not store
k, so a run comparing with it must use k = 0.4.  The forget split is not stored either; it is checked by the number
of forget rows (TOFU forgetNN has 40 * NN rows).
"""

from __future__ import annotations

import re

import numpy as np

from . import metrics as M

#: k of open-unlearning's mia_min_k (its TOFU and MUSE configs)
OU_MIN_K = 0.4
#: our part -> open-unlearning metric-name prefix
PREFIX = {"forget": "forget", "retain": "retain", "real_authors": "ra", "world_facts": "wf"}


class NotOpenUnlearningLog(ValueError):
    pass


def is_tofu_eval(obj) -> bool:
    """True for an open-unlearning TOFU_EVAL.json object (metric-name keys holding ``agg_value``)."""
    return (isinstance(obj, dict) and "examples" not in obj
            and any(isinstance(obj.get(k), dict) and "agg_value" in obj[k]
                    for k in ("forget_truth_ratio", "forget_Q_A_Prob", "retain_Q_A_Prob", "mia_min_k")))


def _by_index(obj: dict, name: str, where: str) -> list[tuple[int, dict]]:
    ent = obj.get(name)
    if not isinstance(ent, dict) or not isinstance(ent.get("value_by_index"), dict):
        raise NotOpenUnlearningLog(f"{where}: metric {name!r} with 'value_by_index' missing (it has "
                                   f"{sorted(obj)[:12]}...); is this an open-unlearning TOFU_EVAL.json?")
    return sorted(((int(i), v) for i, v in ent["value_by_index"].items()), key=lambda t: t[0])


def _qa_part(obj: dict, part: str, where: str) -> list[dict]:
    p = PREFIX[part]
    answer = dict(_by_index(obj, f"{p}_Q_A_Prob", where))
    pert = dict(_by_index(obj, f"{p}_Q_A_PERT_Prob", where))
    para = dict(_by_index(obj, f"{p}_Q_A_PARA_Prob", where)) if part in ("forget", "retain") else None
    rouge = dict(_by_index(obj, f"{p}_Q_A_ROUGE", where)) if f"{p}_Q_A_ROUGE" in obj else {}
    tr_name = "forget_truth_ratio" if part == "forget" else f"{p}_Truth_Ratio"
    ou_tr = dict(_by_index(obj, tr_name, where)) if tr_name in obj else {}
    extra = {}
    if part == "forget":
        for name in ("extraction_strength", "exact_memorization"):
            if name in obj:
                extra[name] = dict(_by_index(obj, name, where))
        if "mia_min_k" in obj:
            extra["min_k"] = dict(_by_index(obj["mia_min_k"], "forget", f"{where} mia_min_k"))
    recs = []
    for i in sorted(answer):
        a, w = answer[i], pert.get(i)
        if a is None or w is None or a.get("avg_loss") is None:
            continue  # open-unlearning drops rows it could not score (None)
        rec = {"index": i, "prob": float(a["prob"]), "avg_nll": float(a["avg_loss"])}
        pert_nlls = np.atleast_1d(np.asarray(w["avg_loss"], dtype=np.float64)).tolist()
        rec["pert_probs"] = np.atleast_1d(np.asarray(w["prob"], dtype=np.float64)).tolist()
        rec["pert_nlls"] = pert_nlls
        if para is not None:
            rec["para_prob"] = float(para[i]["prob"])
            rec["para_nll"] = float(para[i]["avg_loss"])
            ref_nll = rec["para_nll"]
        else:
            ref_nll = rec["avg_nll"]  # real authors / world facts: the answer itself is the true option
            rec["normalized_prob"] = M.normalized_probability(rec["prob"], rec["pert_probs"])
        rec["truth_ratio"] = M.truth_ratio(ref_nll, pert_nlls)
        if i in ou_tr:
            rec["ou_truth_ratio"] = float(ou_tr[i]["score"])
        if i in rouge:
            r = rouge[i]
            rec.update({"rougeL_recall": float(r["rougeL_recall"]), "rougeL_f1": float(r["rougeL_f1"])})
            for key, ours in (("ground_truth", "answer"), ("generation", "generation")):
                if key in r:
                    rec[ours] = r[key]
        for name, vals in extra.items():
            if i in vals and vals[i] is not None and vals[i].get("score") is not None:
                rec[name] = -float(vals[i]["score"]) if name == "min_k" else float(vals[i]["score"])
        recs.append(rec)
    return recs


def tofu_eval_to_examples(obj: dict, where: str = "TOFU_EVAL.json") -> dict[str, list[dict]]:
    """Our per-part records from an open-unlearning TOFU_EVAL.json object (the parts it holds)."""
    if not is_tofu_eval(obj):
        raise NotOpenUnlearningLog(f"{where} is not an open-unlearning TOFU_EVAL.json (no forget_truth_ratio / "
                                   f"*_Q_A_Prob / mia_min_k entries with agg_value)")
    ex: dict[str, list[dict]] = {}
    for part, p in PREFIX.items():
        if f"{p}_Q_A_Prob" in obj:
            ex[part] = _qa_part(obj, part, where)
    if "mia_min_k" in obj:
        ex["holdout"] = [{"index": i, "min_k": -float(v["score"])}
                         for i, v in _by_index(obj["mia_min_k"], "holdout", f"{where} mia_min_k")]
        if "forget" not in ex:  # Min-K only (e.g. a log of the MIA metrics alone)
            ex["forget"] = [{"index": i, "min_k": -float(v["score"])}
                            for i, v in _by_index(obj["mia_min_k"], "forget", f"{where} mia_min_k")]
    elif "forget_truth_ratio" in obj and "forget" not in ex:
        ex["forget"] = [{"index": i, "truth_ratio": float(v["score"]), "ou_truth_ratio": float(v["score"])}
                        for i, v in _by_index(obj, "forget_truth_ratio", where)]
    return ex


def tofu_eval_as_results(obj: dict, split: str, path: str) -> dict:
    """An open-unlearning TOFU_EVAL.json as our ``results.json`` layout for the TOFU ``split`` it must belong to;
    raises :class:`NotOpenUnlearningLog` naming the file when its forget set has the wrong number of rows."""
    ex = tofu_eval_to_examples(obj, path)
    m = re.fullmatch(r"forget(\d+)", split)
    want = 40 * int(m.group(1)) if m else None
    n = len(ex.get("forget", []))
    if want is not None and n and n != want:
        raise NotOpenUnlearningLog(
            f"{path}: open-unlearning log with {n} forget rows, but TOFU {split} has {want}: it was evaluated on "
            f"another forget split (open-unlearning's eval.tofu.forget_split); use the log of the same split")
    return {"suite": "tofu", "split": split, "config": {"k": OU_MIN_K, "splits": sorted(ex)},
            "examples": ex, "summary": {k: v.get("agg_value") for k, v in obj.items() if isinstance(v, dict)},
            "source": "open-unlearning"}


def mia_auc_from_log(entry: dict) -> float:
    """Our :func:`palu_eval.metrics.mia_auc` on an open-unlearning MIA entry (``{"forget", "holdout"}``), whose
    scores are loss-like (higher = non-member), so negated."""
    f = [-float(v["score"]) for _, v in _by_index(entry, "forget", "mia")]
    h = [-float(v["score"]) for _, v in _by_index(entry, "holdout", "mia")]
    return M.mia_auc(f, h)


#: our TOFU summary key -> open-unlearning's metric name (TOFU_EVAL.json / TOFU_SUMMARY.json)
OU_NAMES = {
    "forget/prob": "forget_Q_A_Prob", "forget/para_prob": "forget_Q_A_PARA_Prob",
    "forget/pert_prob": "forget_Q_A_PERT_Prob", "retain/pert_prob": "retain_Q_A_PERT_Prob",
    "real_authors/pert_prob": "ra_Q_A_PERT_Prob", "world_facts/pert_prob": "wf_Q_A_PERT_Prob",
    "forget/rougeL_recall": "forget_Q_A_ROUGE", "forget/truth_ratio": "forget_truth_ratio",
    "forget/extraction_strength": "extraction_strength", "forget/exact_memorization": "exact_memorization",
    "retain/prob": "retain_Q_A_Prob", "retain/para_prob": "retain_Q_A_PARA_Prob",
    "retain/rougeL_recall": "retain_Q_A_ROUGE", "retain/truth_ratio": "retain_Truth_Ratio",
    "real_authors/prob": "ra_Q_A_Prob_normalised", "real_authors/answer_prob": "ra_Q_A_Prob",
    "real_authors/rougeL_recall": "ra_Q_A_ROUGE", "real_authors/truth_ratio": "ra_Truth_Ratio",
    "world_facts/prob": "wf_Q_A_Prob_normalised", "world_facts/answer_prob": "wf_Q_A_Prob",
    "world_facts/rougeL_recall": "wf_Q_A_ROUGE", "world_facts/truth_ratio": "wf_Truth_Ratio",
    "model_utility": "model_utility", "forget_quality": "forget_quality", "mia_min_k_auc": "mia_min_k",
    "privleak": "privleak",
}


def as_open_unlearning_names(summary: dict) -> dict:
    """Our TOFU summary's values under open-unlearning's metric names (those it has)."""
    return {ou: summary[ours] for ours, ou in OU_NAMES.items() if ours in summary}
