"""Pure metric functions on numbers and arrays (no model, no tokenizer, no torch.distributed).

Sources, cited per function:

* TOFU: Maini et al., "TOFU: A Task of Fictitious Unlearning for LLMs" (2024), and its evaluation code
  ``locuslab/tofu`` ``aggregate_eval_stat.py`` (forget quality, model utility, truth ratio aggregation).
* open-unlearning (``locuslab/open-unlearning``), current code: ``src/evals/metrics/memorization.py``
  (probability, truth_ratio, extraction_strength, probability_w_options), ``src/evals/metrics/utils.py``
  (rouge via ``eval_text_similarity``), ``src/evals/metrics/privacy.py`` (forget_quality, privleak),
  ``src/evals/metrics/mia/min_k.py``, ``min_k_plus_plus.py`` and ``mia/utils.py`` (``mia_auc``).
* MUSE: Shi et al., "MUSE: Machine Unlearning Six-Way Evaluation for Language Models" (2024).
* Min-K% Prob: Shi et al., "Detecting Pretraining Data from Large Language Models" (2023, arXiv:2310.16789).
* Min-K%++: Zhang et al., "Min-K%++: Improved Baseline for Detecting Pre-Training Data from LLMs" (2024).
* Extraction strength: Carlini et al., "Quantifying Memorization Across Neural Language Models" (2022), as
  implemented in open-unlearning.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Iterable, Sequence

import numpy as np


# --------------------------------------------------------------------------------------------------------------
# Probabilities and the truth ratio (TOFU)
# --------------------------------------------------------------------------------------------------------------
def mean_nll(token_logps: Sequence[float]) -> float:
    """Mean negative log-likelihood of the answer tokens: ``-(1/T) sum_t log p(y_t | x, y_<t)``."""
    lp = np.asarray(token_logps, dtype=np.float64)
    if lp.size == 0:
        raise ValueError("mean_nll: no answer tokens (empty answer after tokenization)")
    return float(-lp.mean())


def probability(token_logps: Sequence[float]) -> float:
    """TOFU "Probability": the length-normalized answer probability ``P(a|q)^(1/|a|) = exp(-mean NLL)``.

    TOFU paper, Sec. 2.5; open-unlearning ``evaluate_probability`` (``exp(-avg_loss)``).
    Example: log-probs ``[log 0.5, log 0.125]`` -> mean NLL ``(log 2 + log 8)/2 = 2 log 2`` -> ``exp(-2 log 2) = 0.25``.
    """
    return math.exp(-mean_nll(token_logps))


def normalized_probability(p_correct: float, p_wrong: Sequence[float]) -> float:
    """TOFU probability on Real Authors / World Facts: ``p_c / (p_c + sum_j p_j)`` over the per-token-normalized
    probabilities of the correct and the perturbed options (TOFU ``get_model_utility``; open-unlearning
    ``probability_w_options``, which adds ``1e-10`` to the denominator; so do we).

    Example: ``p_c = 0.5``, wrong ``[0.25, 0.25]`` -> ``0.5 / 1.0 = 0.5``.
    """
    return float(p_correct / (p_correct + float(np.sum(p_wrong)) + 1e-10))


def truth_ratio(para_nll: float, pert_nlls: Sequence[float]) -> float:
    """Per-example truth ratio ``R = (prod_j P(a_pert_j|q)^(1/|a_pert_j|))^(1/m) / P(a_para|q)^(1/|a_para|)``.

    Inputs are mean NLLs (per-token normalized), so ``R = exp(-mean_j pert_nll_j) / (exp(-para_nll) + 1e-10)``:
    the geometric mean of the perturbed (false) answers' probabilities over the paraphrased (true) answer's.  This
    is open-unlearning's ``truth_ratio`` exactly (``wrong_prob / (correct_prob + 1e-10)`` with ``wrong`` averaged
    in log space, i.e. a geometric mean; the 1e-10 matters when the true answer's probability is ~1e-6, as on
    world facts); TOFU's ``aggregate_eval_stat.py`` stores the reciprocal (``exp(pert - para)``) and uses
    ``1 - 1/x``, which is the same aggregate.

    Example: para NLL ``log 2`` (P = 1/2); perturbed NLLs ``[log 4, log 16]`` (P = 1/4, 1/16, geometric mean 1/8)
    -> ``R = (1/8) / (1/2) = 0.25``.
    """
    pert = np.asarray(pert_nlls, dtype=np.float64)
    if pert.size == 0:
        raise ValueError("truth_ratio: no perturbed answers")
    return float(math.exp(-float(pert.mean())) / (math.exp(-float(para_nll)) + 1e-10))


def truth_ratio_forget(ratios: Iterable[float]) -> float:
    """Forget-set aggregate: ``mean(min(R, 1/R))`` -- 1 when true and false answers are equally likely.

    TOFU ``aggregate_eval_stat.py`` (``np.minimum(x, 1/x)``); open-unlearning ``closer_to_1_better``.
    Example: ``R = [0.5, 2, 1]`` -> ``mean(0.5, 0.5, 1) = 2/3``.
    """
    r = np.asarray(list(ratios), dtype=np.float64)
    return float(np.mean(np.minimum(r, 1.0 / (r + 1e-10))))


def truth_ratio_retain(ratios: Iterable[float]) -> float:
    """Retain / Real Authors / World Facts aggregate: ``mean(max(0, 1 - R))`` -- high when the true answer wins.

    TOFU ``aggregate_eval_stat.py`` (``max(0, 1 - 1/x)`` on its reciprocal statistic); open-unlearning
    ``true_better``.  Example: ``R = [0.25, 2]`` -> ``mean(0.75, 0) = 0.375``.
    """
    r = np.asarray(list(ratios), dtype=np.float64)
    return float(np.mean(np.maximum(0.0, 1.0 - r)))


# --------------------------------------------------------------------------------------------------------------
# Forget quality and model utility (TOFU)
# --------------------------------------------------------------------------------------------------------------
def _samples(x: Sequence[float], y: Sequence[float], need: str, what: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Two samples as float64 arrays; an empty one is an error (``need``, then the sizes)."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.size == 0 or b.size == 0:
        raise ValueError(f"{need} (got {a.size} and {b.size}{' ' + what if what else ''})")
    return a, b


def forget_quality(unlearned_truth_ratios: Sequence[float], retain_truth_ratios: Sequence[float]) -> dict:
    """Forget quality = p-value of the two-sample KS test (``scipy.stats.ks_2samp``) between the forget-set truth
    ratios of the unlearned model and of the retain model (TOFU Sec. 2.5.2; ``aggregate_eval_stat.py``
    ``get_forget_quality``; open-unlearning ``forget_quality``).

    TOFU tests ``exp(pert - para)`` (= 1/R) and open-unlearning tests ``R``; the KS statistic is invariant under the
    strictly monotone map ``x -> 1/x`` applied to both samples, so the p-value is the same.
    Returns ``{"forget_quality": p, "ks_statistic": D}``.
    """
    from scipy.stats import ks_2samp

    a, b = _samples(unlearned_truth_ratios, retain_truth_ratios, "forget_quality needs two non-empty samples",
                    "truth ratios")
    res = ks_2samp(a, b)
    return {"forget_quality": float(res.pvalue), "ks_statistic": float(res.statistic)}


def harmonic_mean(values: Iterable[float]) -> float:
    """Harmonic mean ``n / sum(1/v)`` (TOFU model utility uses ``scipy.stats.hmean`` over the nine
    retain / real-authors / world-facts values).  A zero value gives 0 (the limit); negatives are an error.

    Example: ``[1, 0.5, 0.25]`` -> ``3 / (1 + 2 + 4) = 3/7``.
    """
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        raise ValueError("harmonic_mean of no values")
    if np.any(v < 0) or np.any(~np.isfinite(v)):
        raise ValueError(f"harmonic_mean needs finite non-negative values, got {v.tolist()}")
    if np.any(v == 0):
        return 0.0
    return float(v.size / np.sum(1.0 / v))


# --------------------------------------------------------------------------------------------------------------
# ROUGE
# --------------------------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(reference: str, generation: str) -> dict:
    """ROUGE-L of a generation against the reference with ``rouge_score`` (``use_stemmer=True``, as open-unlearning's
    ``eval_text_similarity``).  Returns ``{"rougeL_recall": LCS/|ref|, "rougeL_f1": F1}`` on tokens.

    TOFU reports the recall; MUSE reports the F1 (VerbMem, KnowMem).
    Example: ref "the cat sat on the mat", gen "the cat sat": LCS 3 -> recall 3/6 = 0.5, precision 1, F1 2/3.
    """
    s = _scorer().score(reference, generation)["rougeL"]
    return {"rougeL_recall": float(s.recall), "rougeL_f1": float(s.fmeasure)}


# --------------------------------------------------------------------------------------------------------------
# Memorization
# --------------------------------------------------------------------------------------------------------------
def extraction_strength(greedy_match: Sequence[bool]) -> float:
    """Extraction strength ``ES = 1 - k*/T`` where ``k*`` is the shortest prefix of the ``T`` answer tokens after
    which every remaining token is the model's teacher-forced argmax (Carlini et al. 2022; open-unlearning
    ``extraction_strength``).  ``greedy_match[t]`` says whether ``argmax p(. | x, y_<t) == y_t``.

    ``k*`` ranges over ``0..T``; ``k* = T`` (the empty suffix) when even the last token is missed, so ES = 0.
    (open-unlearning's loop stops at ``k = T - 1`` and reports ``1/T`` in that case; we use the definition.)

    Examples: ``[T, T, T, T]`` -> 1; ``[F, T, T, T]`` -> ``1 - 1/4 = 0.75``; ``[T, F, T, T]`` -> 0.5;
    ``[T, T, T, F]`` -> 0.
    """
    m = np.asarray(greedy_match, dtype=bool)
    n = m.size
    if n == 0:
        return 0.0
    # length of the all-correct suffix
    wrong = np.flatnonzero(~m)
    k_star = 0 if wrong.size == 0 else int(wrong[-1]) + 1
    return float(1.0 - k_star / n)


def exact_memorization(greedy_match: Sequence[bool]) -> float:
    """Fraction of answer tokens equal to the teacher-forced argmax (open-unlearning ``exact_memorization``)."""
    m = np.asarray(greedy_match, dtype=bool)
    return float(m.mean()) if m.size else 0.0


# --------------------------------------------------------------------------------------------------------------
# Membership inference: Min-K%, Min-K%++, AUC, PrivLeak
# --------------------------------------------------------------------------------------------------------------
def _lowest_k_mean(values: np.ndarray, k: float) -> float:
    if not 0 < k <= 1:
        raise ValueError(f"k must be in (0, 1], got {k}")
    if values.size == 0:
        return 0.0
    n = max(1, int(values.size * k))
    return float(np.sort(values)[:n].mean())


def min_k(token_logps: Sequence[float], k: float = 0.4) -> float:
    """Min-K% Prob membership score: the mean of the lowest ``k`` fraction of the token log-probs
    (``n = max(1, int(T k))`` tokens; Shi et al. 2023).  Higher = more likely a training member.

    open-unlearning's ``MinKProbAttack.compute_score`` returns the negation (a loss); see :func:`mia_auc` for why
    the AUCs agree.  Example: log-probs ``[-1, -2, -3, -4, -5]``, ``k = 0.4`` -> lowest 2 ``[-5, -4]`` -> ``-4.5``.
    """
    return _lowest_k_mean(np.asarray(token_logps, dtype=np.float64), k)


def min_k_plus_plus(token_logps: Sequence[float], mu: Sequence[float], var: Sequence[float], k: float = 0.4) -> float:
    """Min-K%++ membership score (Zhang et al. 2024; open-unlearning ``MinKPlusPlusAttack``): per token
    ``z_t = (log p(y_t) - mu_t) / sqrt(var_t)`` with ``mu_t = E_{v~p}[log p(v)]`` and
    ``var_t = E_{v~p}[log p(v)^2] - mu_t^2`` under the model's next-token distribution (``var`` clamped at 1e-6),
    then the mean of the lowest ``k`` fraction of ``z``.  Higher = more likely a member.

    Example: logps ``[-1, -3]``, mu ``[-2, -2]``, var ``[1, 4]`` -> z ``[1, -0.5]``; ``k = 0.5`` -> ``-0.5``.
    """
    lp = np.asarray(token_logps, dtype=np.float64)
    z = (lp - np.asarray(mu, dtype=np.float64)) / np.sqrt(np.maximum(np.asarray(var, dtype=np.float64), 1e-6))
    return _lowest_k_mean(z, k)


def mia_auc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float:
    """ROC AUC of separating forget (members) from holdout (non-members) with a membership score where higher
    means "member": ``P(s_forget > s_holdout) + 0.5 P(tie)`` (Mann-Whitney U / (n_f n_h)).

    open-unlearning ``mia_auc`` computes ``roc_auc_score(labels=[0]*forget + [1]*holdout, scores)`` with loss-like
    scores (the negation of ours), which is the same number: AUC is 1 when the forget data is much more likely
    than the holdout data.  Example: forget ``[3, 4]``, holdout ``[1, 3]`` -> pairs (3>1, 3=3, 4>1, 4>3)
    -> ``(1 + 0.5 + 1 + 1) / 4 = 0.875``.
    """
    from scipy.stats import rankdata

    f, h = _samples(member_scores, nonmember_scores, "mia_auc needs non-empty forget and holdout scores")
    ranks = rankdata(np.concatenate([f, h]))
    u = ranks[: f.size].sum() - f.size * (f.size + 1) / 2.0
    return float(u / (f.size * h.size))


def privleak(auc: float, retain_auc: float) -> float:
    """PrivLeak (MUSE Sec. 3): relative difference, in percent, of the unlearned model's MIA AUC from the retain
    model's.  MUSE reports AUC as ``1 - x`` of the conventional ``x``; open-unlearning's ``privleak`` converts,
    and so do we: ``((1 - auc) - (1 - retain_auc)) / (1 - retain_auc) * 100``.

    ~0 is ideal; strongly negative = the forget set is still recognisably "member" (under-unlearning);
    positive = over-unlearning.  Example: auc 0.9, retain 0.5 -> ``(0.1 - 0.5) / 0.5 * 100 = -80``.
    """
    score, ref = 1.0 - auc, 1.0 - retain_auc
    return float((score - ref) / (ref + 1e-10) * 100.0)
