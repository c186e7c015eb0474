"""Metric math on hand-made values; each expected value is derived in the test's docstring."""

import math

import numpy as np
import pytest
from scipy.stats import ks_2samp

from palu_ds.dist import gather_records, shard_indices
from palu_eval import metrics as M
from palu_eval.tofu import summarize
from palu_eval.config import SuiteConfig


def test_probability_and_normalized_probability():
    """log-probs [log 1/2, log 1/8]: mean NLL = (log 2 + log 8)/2 = 2 log 2, so P = exp(-2 log 2) = 1/4.
    Normalized over options: 0.5 / (0.5 + 0.25 + 0.25) = 0.5."""
    lp = [math.log(0.5), math.log(0.125)]
    assert M.mean_nll(lp) == pytest.approx(2 * math.log(2))
    assert M.probability(lp) == pytest.approx(0.25)
    assert M.normalized_probability(0.5, [0.25, 0.25]) == pytest.approx(0.5)


def test_truth_ratio_direction_and_aggregates():
    """Paraphrased answer P = 1/2 (NLL log 2); perturbed P = 1/4 and 1/16 (NLL log 4, log 16), geometric mean
    sqrt(1/64) = 1/8.  R = false/true = (1/8)/(1/2) = 0.25 (open-unlearning's direction).
    Forget aggregate of R = [0.5, 2, 1]: mean(min(R, 1/R)) = mean(0.5, 0.5, 1) = 2/3.
    Retain aggregate of R = [0.25, 2]: mean(max(0, 1 - R)) = mean(0.75, 0) = 0.375."""
    assert M.truth_ratio(math.log(2), [math.log(4), math.log(16)]) == pytest.approx(0.25)
    assert M.truth_ratio_forget([0.5, 2.0, 1.0]) == pytest.approx(2 / 3)
    assert M.truth_ratio_retain([0.25, 2.0]) == pytest.approx(0.375)


def test_truth_ratio_matches_tofu_original_formula():
    """TOFU's aggregate_eval_stat.py: x = exp(mean pert loss - para loss) (= 1/R), retain value mean(max(0, 1 - 1/x)),
    forget value mean(min(x, 1/x)); ours on R must give the same numbers."""
    rng = np.random.default_rng(0)
    para = rng.uniform(0.5, 3, 20)
    pert = rng.uniform(0.5, 3, (20, 5))
    x = np.exp(pert.mean(-1) - para)
    r = [M.truth_ratio(p, q) for p, q in zip(para, pert)]
    assert M.truth_ratio_retain(r) == pytest.approx(np.mean(np.maximum(0, 1 - 1 / x)))
    assert M.truth_ratio_forget(r) == pytest.approx(np.mean(np.minimum(x, 1 / x)), rel=1e-6)


def test_harmonic_mean():
    """[1, 0.5, 0.25]: 3 / (1 + 2 + 4) = 3/7; any zero gives 0; negatives are an error."""
    assert M.harmonic_mean([1, 0.5, 0.25]) == pytest.approx(3 / 7)
    assert M.harmonic_mean([0.3, 0.0]) == 0.0
    with pytest.raises(ValueError):
        M.harmonic_mean([0.5, -0.1])


def test_rouge_l_recall_and_f1():
    """ref "the cat sat on the mat", gen "the cat sat": LCS = 3 tokens; recall 3/6 = 0.5, precision 3/3 = 1,
    F1 = 2 * 0.5 * 1 / 1.5 = 2/3.  Stemming: "cats sitting" vs "cat sit" match fully (recall 1)."""
    r = M.rouge_l("the cat sat on the mat", "the cat sat")
    assert r["rougeL_recall"] == pytest.approx(0.5)
    assert r["rougeL_f1"] == pytest.approx(2 / 3)
    assert M.rouge_l("cats sitting", "cat sit")["rougeL_recall"] == pytest.approx(1.0)
    assert M.rouge_l("a b", "")["rougeL_recall"] == 0.0


def test_min_k_on_known_logprobs():
    """log-probs [-1, -2, -3, -4, -5], k = 0.4: int(5 * 0.4) = 2 lowest = [-5, -4], mean -4.5.
    k = 0.1: int(0.5) = 0 -> at least one token: -5."""
    lp = [-1.0, -2.0, -3.0, -4.0, -5.0]
    assert M.min_k(lp, 0.4) == pytest.approx(-4.5)
    assert M.min_k(lp, 0.1) == pytest.approx(-5.0)


def test_min_k_plus_plus_on_known_values():
    """logps [-1, -3], mu [-2, -2], var [1, 4]: z = [(-1+2)/1, (-3+2)/2] = [1, -0.5]; k = 0.5 -> lowest 1: -0.5;
    k = 1 -> mean 0.25."""
    assert M.min_k_plus_plus([-1, -3], [-2, -2], [1, 4], 0.5) == pytest.approx(-0.5)
    assert M.min_k_plus_plus([-1, -3], [-2, -2], [1, 4], 1.0) == pytest.approx(0.25)


def test_mia_auc_and_privleak():
    """forget [3, 4] vs holdout [1, 3]: pairs 3>1, 3=3 (1/2), 4>1, 4>3 -> 3.5/4 = 0.875.
    Agrees with open-unlearning's roc_auc_score(labels=[0,0,1,1], scores=-s) (computed by hand: same pairs).
    PrivLeak: auc 0.9, retain 0.5 -> ((1-0.9) - 0.5) / 0.5 * 100 = -80; equal AUCs -> 0."""
    assert M.mia_auc([3, 4], [1, 3]) == pytest.approx(0.875)
    assert M.mia_auc([1, 1], [1, 1]) == pytest.approx(0.5)
    assert M.privleak(0.9, 0.5) == pytest.approx(-80.0)
    assert M.privleak(0.7, 0.7) == pytest.approx(0.0)


def test_extraction_strength():
    """T = 4 answer tokens, greedy_match says which are the argmax.  ES = 1 - k*/T with k* the shortest prefix
    after which all tokens match: all match -> k*=0 -> 1; first missed -> k*=1 -> 0.75; second missed -> k*=2 ->
    0.5; last missed -> k*=4 -> 0."""
    assert M.extraction_strength([1, 1, 1, 1]) == 1.0
    assert M.extraction_strength([0, 1, 1, 1]) == 0.75
    assert M.extraction_strength([1, 0, 1, 1]) == 0.5
    assert M.extraction_strength([1, 1, 1, 0]) == 0.0
    assert M.exact_memorization([1, 0, 1, 1]) == 0.75


def test_forget_quality_is_ks_pvalue_and_invariant_to_reciprocal():
    """Forget quality = scipy ks_2samp p-value of the two truth-ratio samples; TOFU tests 1/R, which gives the
    same p-value since the KS statistic is invariant under a monotone map applied to both samples."""
    a, b = [0.2, 0.5, 0.9, 1.3, 0.7], [0.6, 0.8, 1.1, 1.5, 2.0, 0.95]
    fq = M.forget_quality(a, b)
    assert fq["forget_quality"] == pytest.approx(ks_2samp(a, b).pvalue)
    assert fq["forget_quality"] == pytest.approx(ks_2samp(1 / np.array(a), 1 / np.array(b)).pvalue)
    assert M.forget_quality(a, a)["forget_quality"] == pytest.approx(1.0)


def _tofu_rec(i, tr, min_k=0.0):
    return {"index": i, "truth_ratio": tr, "prob": 0.5, "normalized_prob": 0.5, "rougeL_recall": 0.5,
            "rougeL_f1": 0.5, "extraction_strength": 0.0, "exact_memorization": 0.0, "pert_probs": [0.1],
            "para_prob": 0.4, "min_k": min_k}


def test_summary_wires_forget_quality_and_privleak_from_retain_results():
    """summarize() takes the unlearned forget truth ratios and the retain JSON's forget truth ratios into
    ks_2samp, and the Min-K AUCs of both models into privleak; model utility over the 3 retain values
    (prob 0.5, ROUGE 0.5, TR mean(max(0, 1 - R)) = mean(0.5, 0.5) = 0.5) is 0.5, with a note."""
    unl = {"forget": [_tofu_rec(0, 0.1, -1.0), _tofu_rec(1, 0.2, -2.0)],
           "retain": [_tofu_rec(0, 0.5), _tofu_rec(1, 0.5)],
           "holdout": [{"index": 0, "min_k": -3.0}, {"index": 1, "min_k": -1.5}]}
    ret = {"examples": {"forget": [_tofu_rec(0, 0.9, -3.0), _tofu_rec(1, 1.1, -1.0)],
                        "holdout": [{"index": 0, "min_k": -2.0}, {"index": 1, "min_k": -2.0}]},
           "_path": "retain/results.json"}
    s = summarize(unl, SuiteConfig(splits=("forget", "retain", "holdout")), ret)
    assert s["forget_quality"] == pytest.approx(ks_2samp([0.1, 0.2], [0.9, 1.1]).pvalue)
    # unlearned AUC: forget [-1, -2] vs holdout [-3, -1.5]: -1>-3, -1>-1.5, -2>-3, -2<-1.5 -> 3/4
    assert s["mia_min_k_auc"] == pytest.approx(0.75)
    # retain AUC: forget [-3, -1] vs holdout [-2, -2] -> 2/4 = 0.5; privleak ((0.25) - 0.5) / 0.5 * 100 = -50
    assert s["retain_mia_min_k_auc"] == pytest.approx(0.5)
    assert s["privleak"] == pytest.approx(-50.0)
    assert s["model_utility"] == pytest.approx(0.5)
    assert "3 of the 9" in s["model_utility_note"]


def test_muse_privleak_is_min_k_and_min_k_pp_has_its_own_key():
    """MUSE/open-unlearning report PrivLeak from Min-K% (k = 0.4) AUCs. Unlearned model: Min-K forget [-1, -2] vs
    holdout [-3, -1.5] -> AUC 3/4; Min-K++ forget [1, 2] vs holdout [0, 0] -> AUC 1. Retain model: Min-K forget
    [-3, -1] vs holdout [-2, -2] -> 1/2; Min-K++ forget [0, 1] vs holdout [1, 0] -> (0.5 + 0 + 1 + 0.5)/4 = 1/2.
    privleak = ((1 - 3/4) - 1/2) / (1/2) * 100 = -50; privleak_min_k_pp = ((1 - 1) - 1/2) / (1/2) * 100 = -100."""
    from palu_eval.muse import summarize as muse_summarize

    def recs(mk, pp):
        return [{"index": i, "min_k": a, "min_k_pp": b} for i, (a, b) in enumerate(zip(mk, pp))]

    unl = {"privleak_forget": recs([-1, -2], [1, 2]), "privleak_holdout": recs([-3, -1.5], [0, 0])}
    ret = {"examples": {"privleak_forget": recs([-3, -1], [0, 1]), "privleak_holdout": recs([-2, -2], [1, 0])},
           "_path": "r.json"}
    s = muse_summarize(unl, SuiteConfig(suite="muse", split="news", splits=("privleak",)), ret)
    assert s["mia_min_k_auc"] == pytest.approx(0.75) and s["mia_min_k_pp_auc"] == pytest.approx(1.0)
    assert s["privleak"] == pytest.approx(-50.0)
    assert s["privleak_min_k_pp"] == pytest.approx(-100.0)
    assert "privleak_min_k" not in s


def test_shard_and_gather_single_process():
    """n = 5 over 2 ranks: rank 0 [0, 2, 4], rank 1 [1, 3, 0] (0 is padding); gathering both shards' records
    gives indices 0..4 once each, in order."""
    assert shard_indices(5, 0, 2) == [0, 2, 4]
    assert shard_indices(5, 1, 2) == [1, 3, 0]
    recs = [{"index": i, "v": i} for i in shard_indices(5, 0, 2) + shard_indices(5, 1, 2)]
    assert [r["index"] for r in gather_records(recs)] == [0, 1, 2, 3, 4]
