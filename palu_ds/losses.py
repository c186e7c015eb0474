"""Unlearning losses as pure functions of tensors (torch only; never a model, never DeepSpeed).

Conventions
-----------
* Every input is already *shifted* (:func:`palu_ds.batch.shift`): ``logits[:, t]`` scores ``labels[:, t]``.
* Per-position losses take packed rows -- ``logits_s[mask_s]`` of shape [N, V] -- and return [N]; per-sequence
  losses take [B] and return [B].  Reduction is done once, by :func:`aggregate_loss`.
* Loss math runs in float32 on the selected rows (logits may arrive in bf16).

Sources: PALU = arXiv 2601.03190 (reference code github.com/nxZhai/PALU, ``src/trainer/unlearn/palu.py``, read
from its public copy bursteries-cn/PALU_demo);
PDU = "Constrained Entropic Unlearning", arXiv 2506.05314 (open-unlearning ``src/trainer/unlearn/pdu.py``);
NPO = arXiv 2404.05868; SimNPO = arXiv 2410.07163; DPO = arXiv 2305.18290; WGA = arXiv 2502.19301 (Wang et al.
2025, "Rethinking LLM Unlearning Objectives: A Gradient Perspective and Go Beyond"); SatImp = arXiv 2505.11953 (Yang
et al. 2025, "Exploring Criteria of Loss Reweighting to Enhance LLM Unlearning"); UNDIAL = arXiv 2402.10052 (Dong et
al. 2024/2025); RMU = arXiv 2403.03218 (WMDP, Li et al. 2024, reference code centerforaisafety/wmdp
``rmu/unlearn.py``); baselines as implemented in open-unlearning (locuslab/open-unlearning ``src/trainer/utils.py``,
``src/trainer/unlearn/*.py``, read at commit d3d7cf9).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _f32(x: torch.Tensor) -> torch.Tensor:
    """Upcast half/bfloat16 to float32 for the loss math; float32/float64 pass through."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


# ----------------------------------------------------------------------------------------------------------------
# Reduction
# ----------------------------------------------------------------------------------------------------------------
def aggregate_loss(values: torch.Tensor, mask: torch.Tensor | None = None, normalizer=None) -> torch.Tensor:
    """``sum(values[mask]) / normalizer`` -- the only reduction in this module.

    ``normalizer`` defaults to the local count ``mask.sum()`` (``values.numel()`` without a mask).  With a *global*
    count (the same number on every rank, e.g. the all-reduced number of answer tokens) the per-rank results add up
    to the full-batch loss: ``sum_r aggregate_loss(v_r, m_r, n) == aggregate_loss(v, m)`` when ``n = sum_r m_r.sum()``
    (OpenRLHF ``openrlhf/models/loss.py`` style).  A zero count gives 0 (still attached to the graph).
    Example: ``values=[[1,2],[3,4]], mask=[[1,0],[1,1]]`` -> (1+3+4)/3 = 8/3; with ``normalizer=4`` -> 2.
    """
    if mask is not None:
        values = torch.where(mask, values, values.new_zeros(()))
        count = mask.sum()
    else:
        count = values.numel()
    if normalizer is None:
        normalizer = count
    normalizer = torch.as_tensor(normalizer, dtype=values.dtype, device=values.device)
    return values.sum() / normalizer.clamp(min=1)


def map_rows(logits, mask: torch.Tensor, fn, *row_args: torch.Tensor) -> torch.Tensor:
    """``fn(logits[mask], *row_args)``: a per-position loss ``fn`` (row i of its output depends only on row i of
    its inputs) on the rows ``mask`` selects.  ``logits`` is a dense [B, T, V] tensor or a logits provider with its
    own ``map_rows`` (:class:`palu_ds.batch.PackedLogits`; :class:`palu_ds.lm_head.ChunkedLogits`, which computes
    the same rows from the hidden states a chunk at a time, with their gradient in the forward pass when the
    objective weighs them linearly, else recomputed in backward).  Every loss below that needs V-wide rows goes
    through here, so one copy of the math serves the dense and the chunked head.
    """
    if hasattr(logits, "map_rows"):
        return logits.map_rows(mask, fn, *row_args)
    return fn(logits[mask], *row_args)


# ----------------------------------------------------------------------------------------------------------------
# Token / sequence log-probabilities (NLL, GradAscent, GradDiff, NPO, SimNPO, DPO)
# ----------------------------------------------------------------------------------------------------------------
def row_logps(rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log softmax(z_n)[y_n]`` per row; [N] from rows [N, V] and targets [N] (float32 math).
    Gradient w.r.t. ``z_n``: ``onehot(y_n) - softmax(z_n)``."""
    return -F.cross_entropy(_f32(rows), targets, reduction="none")


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log p_theta(labels[b,t] | x_<t)`` at answer tokens, 0 where ``labels == -100``; [B, T] from [B, T, V].

    Only the answer rows are upcast to float32 (``logits[mask]``), never the whole [B, T, V] tensor.
    Example: uniform logits over V=4 -> every answer token gets ``-ln 4``.
    """
    mask = labels != IGNORE_INDEX
    lp = map_rows(logits, mask, row_logps, labels[mask])
    return torch.zeros(labels.shape, dtype=lp.dtype, device=lp.device).masked_scatter(mask, lp)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log pi(y|x) = sum_t log p(y_t | y_<t, x)`` over the answer tokens of each sequence; [B]."""
    return token_logps(logits, labels).sum(-1)


def nll_loss(logits: torch.Tensor, labels: torch.Tensor, normalizer=None) -> torch.Tensor:
    """Mean negative log-likelihood over answer tokens: ``-(1/|A|) sum_{t in A} log p(y_t)`` (retain loss, SFT).

    GradAscent (Jang et al. 2022; open-unlearning ``grad_ascent.py``) minimises ``-nll_loss(forget)``;
    GradDiff minimises ``-gamma * nll(forget) + alpha * nll(retain)`` (open-unlearning ``grad_diff.py``).
    Gradient w.r.t. one token's logits: ``(softmax(z) - onehot(y)) / |A|``.
    """
    mask = labels != IGNORE_INDEX
    return aggregate_loss(-token_logps(logits, labels), mask, normalizer)


def npo_loss(logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """NPO (Zhang et al. 2024, arXiv 2404.05868, eq. 3), per sequence [B]:

    ``L = -(2/beta) * log sigmoid(-beta * (log pi_theta(y|x) - log pi_ref(y|x)))``

    exactly open-unlearning's ``compute_dpo_loss(win=None, lose=forget)``.  At ``log pi_theta = log pi_ref`` it is
    ``(2/beta) ln 2``; ``dL/d log pi_theta = 2 sigmoid(beta * delta)`` (= 1 at delta = 0), bounded in (0, 2).
    """
    return -2.0 / beta * F.logsigmoid(-beta * (logps - ref_logps))


def simnpo_loss(logps: torch.Tensor, lengths: torch.Tensor, beta: float, delta: float = 0.0) -> torch.Tensor:
    """SimNPO (Fan et al. 2024, arXiv 2410.07163), reference-free and length-normalised, per sequence [B]:

    ``L = -(2/beta) * log sigmoid(beta * (-log pi_theta(y|x) / |y| - delta))``

    as in open-unlearning ``simnpo.py`` (its ``delta`` is the paper's gamma divided by beta).
    Example: ``log pi = -6, |y| = 3, beta = 1, delta = 0`` -> ``-2 log sigmoid(2) = 2 ln(1 + e^-2) = 0.253856``;
    ``dL/d log pi = (2/|y|) sigmoid(-u)`` with ``u = beta(-log pi/|y| - delta)`` (= 0.079469 in the example).
    """
    avg_nll = -logps / lengths.clamp(min=1).to(logps.dtype)
    return -2.0 / beta * F.logsigmoid(beta * (avg_nll - delta))


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float) -> torch.Tensor:
    """DPO (Rafailov et al. 2023) with open-unlearning's 2/beta scale (``compute_dpo_loss``), per pair [B]:

    ``m = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))``,  ``L = -(2/beta) log sigmoid(beta m)``.

    IdkDPO (TOFU; open-unlearning ``dpo.py``): y_w = a refusal ("I don't know") answer, y_l = the forget answer.
    At m = 0 it is ``(2/beta) ln 2``; ``dL/dm = -2 sigmoid(-beta m)`` (= -1 at m = 0).
    """
    margin = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
    return -2.0 / beta * F.logsigmoid(beta * margin)


# ----------------------------------------------------------------------------------------------------------------
# PALU local entropy (arXiv 2601.03190)
# ----------------------------------------------------------------------------------------------------------------
def palu_local_entropy(logits: torch.Tensor, topk_ids: torch.Tensor, detach_target: bool = False) -> torch.Tensor:
    """PALU's local (top-K) flattening loss at sensitive positions t in I_init, dense form; [N] from [N, V].

    ``L_local(t) = (1/K) sum_{i in idx_t} (z_{t,i} - c_t)^2``,  ``c_t = (1/V) sum_{j=1..V} z_{t,j}``

    with ``idx_t`` the *reference* model's top-K ids at t and ``c_t`` the mean over the FULL vocabulary of the
    current logits (the reference code's ``target_mode="mean"``; not detached there -- ``detach_target=True``
    stops the gradient through c_t).  L_sens = mean of L_local over I_init (:func:`aggregate_loss`).
    Example: ``z = [1, 2, 3, 6]``, ``idx = {3, 2}`` -> c = 3, L = ((6-3)^2 + (3-3)^2)/2 = 4.5;
    gradient ``dL/dz_i = (2/K) [ (z_i - c) 1{i in idx} - (1/V) sum_{j in idx} (z_j - c) ]`` = [-.75, -.75, -.75, 2.25]
    (detached target: ``(2/K)(z_i - c) 1{i in idx}`` = [0, 0, 0, 3]).
    """
    z = _f32(logits)
    c = z.mean(-1, keepdim=True)
    if detach_target:
        c = c.detach()
    return (z.gather(-1, topk_ids) - c).pow(2).mean(-1)


def topk_ids(ref_logits: torch.Tensor, k: int) -> torch.Tensor:
    """The reference's top-k ids (sorted, k clipped to V) -- what the precompute stores as ``topk_ids``/``kl_ids``."""
    return ref_logits.topk(min(k, ref_logits.shape[-1]), dim=-1).indices


def target_first_topk_ids(ref_logits: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """``k`` reference ids per row (k clipped to V): the target first, then the reference's top k-1 other ids
    (sorted) -- what the precompute stores as ``ans_ids`` (UNDIAL lowers the target's logit, so it must be kept).
    Example: z = [0.1, 3.0, 2.0], target 0, k = 2 -> [0, 1]."""
    k = min(k, ref_logits.shape[-1])
    others = ref_logits.scatter(-1, targets[:, None], float("-inf")).topk(k - 1, dim=-1).indices
    return torch.cat([targets[:, None], others], -1)


# ----------------------------------------------------------------------------------------------------------------
# KL on common tokens
# ----------------------------------------------------------------------------------------------------------------
def kl_exact(logits: torch.Tensor, ref_logits: torch.Tensor, direction: str = "forward") -> torch.Tensor:
    """Per-position KL between the current model P_theta and the reference P_ref; [N] from [N, V] each.

    ``forward``: ``KL(P_theta || P_ref) = sum_v p_v (log p_v - log q_v)`` -- the PALU reference code's direction
    (``sum exp(cur_logp) * (cur_logp - ref_logp)`` on non-sensitive answer tokens);  ``reverse``: ``KL(P_ref || P_theta)``.
    Example: p = (1/2, 1/2), q = (1/4, 3/4): forward = (1/2) ln(4/3) = 0.143841, reverse = 0.130812.
    Gradient (forward) w.r.t. the current logits: ``p * (log p - log q - KL)``.
    """
    logp = F.log_softmax(_f32(logits), -1)
    logq = F.log_softmax(_f32(ref_logits), -1).to(logp.dtype)
    if direction == "forward":
        return F.kl_div(logq, logp, reduction="none", log_target=True).sum(-1)
    if direction == "reverse":
        return F.kl_div(logp, logq, reduction="none", log_target=True).sum(-1)
    raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}")


def _buckets(logits: torch.Tensor, ref_ids: torch.Tensor, ref_logps: torch.Tensor, tail_floor: float):
    """``(log p, log q)`` over the buckets of :func:`kl_sparse`: the k reference ids, plus the tail (the rest of the
    vocabulary) when k < V -- ``p`` the current model's (the tail by a logsumexp), ``q`` the reference's."""
    z = _f32(logits)
    lse = z.logsumexp(-1, keepdim=True)
    logp = z.gather(-1, ref_ids) - lse
    logq = ref_logps.to(z.dtype)
    if ref_ids.shape[-1] < z.shape[-1]:                                   # add the tail bucket
        logp_tail = z.scatter(-1, ref_ids, float("-inf")).logsumexp(-1, keepdim=True) - lse
        q_tail = (1.0 - logq.exp().sum(-1, keepdim=True)).clamp(min=tail_floor, max=1.0)
        logp = torch.cat([logp, logp_tail.clamp(min=-1e4)], -1)
        logq = torch.cat([logq, q_tail.log()], -1)
    return logp, logq


def kl_sparse(logits: torch.Tensor, ref_ids: torch.Tensor, ref_logps: torch.Tensor, direction: str = "forward",
              tail_floor: float = 1e-6) -> torch.Tensor:
    """KL from the reference's precomputed top-k log-probs, the rest of the vocabulary as one "tail" bucket; [N].

    Buckets: the k reference ids, plus the tail T = V minus those ids.  ``q_T = 1 - sum_i exp(ref_logps_i)``
    (clamped to ``[tail_floor, 1]``), ``p_i = softmax(z)_i`` and ``p_T = sum_{v in T} softmax(z)_v`` (a logsumexp
    over the tail, exact even when p_T is tiny).  Then ``forward = sum_b p_b (log p_b - log q_b)`` over the k+1
    buckets (``reverse`` swaps p and q).  Coarse-graining can only lower a KL, so this is a lower bound of
    :func:`kl_exact` (the tail's internal shape is ignored); it is exact when the tail holds at most one token.
    Example: p = (.4, .3, .2, .1), ref top-2 = ids (0, 1) with q = (.5, .25) -> q_T = .25, p_T = .3,
    forward = .4 ln(.4/.5) + .3 ln(.3/.25) + .3 ln(.3/.25) = 0.020136.
    Store ``ref_logps`` in float32: the tail is a difference from 1.
    """
    logp, logq = _buckets(logits, ref_ids, ref_logps, tail_floor)
    if direction == "forward":
        return (logp.exp() * (logp - logq)).sum(-1)
    if direction == "reverse":
        return (logq.exp() * (logq - logp)).sum(-1)
    raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}")


# ----------------------------------------------------------------------------------------------------------------
# Logit-margin flattening (Constrained Entropic Unlearning, arXiv 2506.05314)
# ----------------------------------------------------------------------------------------------------------------
def logit_margin_flat(logits: torch.Tensor) -> torch.Tensor:
    """Logit-margin flattening (arXiv 2506.05314, forget loss of PDU), per position; [...] from [..., V]:

    ``L(t) = (max_k z_{t,k} - (1/V) sum_k z_{t,k})^2``   (L_fgt = mean over the positions whose logits predict an
    answer token, the caller's mask after the shift).  open-unlearning's ``pdu.py`` masks the *unshifted* logits with
    ``labels != -100``, i.e. the logits at the answer tokens themselves, which predict the NEXT token: off by one
    position -- it leaves out the logit at the last prompt token (the one predicting the first answer token) and
    takes in the one at the last labelled token (EOS, predicting past the answer); the count is the same.
    Softmax-free: ``dL/dz = 2 (max - mean) (e_argmax - 1/V)``, which does not vanish on a near-one-hot
    distribution where the entropy's gradient ``-p (log p + H)`` does.
    Example: z = [3, 0, 0, 1] -> (3 - 1)^2 = 4, gradient = 4 ([1,0,0,0] - 1/4) = [3, -1, -1, -1].
    """
    z = _f32(logits)
    return (z.amax(-1) - z.mean(-1)).pow(2)


# ----------------------------------------------------------------------------------------------------------------
# Token-weighted likelihood losses (WGA, SatImp) and self-distillation with adjusted logits (UNDIAL)
# ----------------------------------------------------------------------------------------------------------------
def wga_loss(logps: torch.Tensor, beta: float) -> torch.Tensor:
    """Weighted gradient ascent (WGA, arXiv 2502.19301), per token [...] from the token log-probs ``log p_t``:

    ``L_t = w_t log p_t``,  ``w_t = sg(p_t)^beta``  (sg: no gradient through the weight)

    minimised, i.e. gradient ascent on the NLL with each token weighted by its own probability raised to beta: tokens
    already forgotten (p_t small) stop pulling. open-unlearning ``compute_wga_loss`` (``src/trainer/utils.py``, used
    by ``src/trainer/unlearn/wga.py``): ``-(exp(-ce)^beta * ce)`` averaged over the answer tokens, ``ce = -log p_t``.
    Example: ``p_t = 1/2, beta = 1`` -> ``(1/2) ln(1/2) = -0.346574``; ``dL/d log p_t = p_t^beta`` (= 1/2), so w.r.t.
    the logits z: ``p_t^beta (onehot(y_t) - softmax(z))``.
    """
    logps = _f32(logps)
    return (beta * logps.detach()).exp() * logps


def satimp_loss(logps: torch.Tensor, beta1: float, beta2: float) -> torch.Tensor:
    """SatImp (arXiv 2505.11953, "saturation" x "importance" reweighting), per token [...] from ``log p_t``:

    ``L_t = w_t log p_t``,  ``w_t = sg(p_t)^beta1 * (1 - sg(p_t))^beta2``

    minimised (weighted gradient ascent; the weight vanishes both for forgotten tokens, p_t -> 0, and for tokens the
    model is sure of, p_t -> 1). open-unlearning ``compute_satimp_loss`` (``src/trainer/utils.py``, used by
    ``src/trainer/unlearn/satimp.py``): ``-(weight_sat * weight_imp * ce)`` averaged over the answer tokens.
    Example: ``p_t = 1/2, beta1 = 5, beta2 = 1`` -> ``2^-5 * 2^-1 * ln(1/2) = -0.0108304``;
    ``dL/d log p_t = w_t`` (= 1/64), w.r.t. the logits ``w_t (onehot(y_t) - softmax(z))``.
    """
    logps = _f32(logps)
    p = logps.detach().exp()
    return p.pow(beta1) * (1.0 - p).pow(beta2) * logps


def undial_loss(logits: torch.Tensor, targets: torch.Tensor, ref_ids: torch.Tensor, ref_logps: torch.Tensor,
                beta: float, tail_floor: float = 1e-6) -> torch.Tensor:
    """UNDIAL (arXiv 2402.10052): self-distillation toward the reference with the target token's logit lowered by
    beta, per position; [N] from logits [N, V], targets [N] and the reference's log-probs ``ref_logps`` [N, k] of
    the ids ``ref_ids`` [N, k] (the target must be among them; the cache stores it in column 0):

    ``q' = softmax(log q_ref - beta * onehot(y_t))``,   ``L_t = CE(q', p_theta) = -sum_v q'_v log p_v``

    open-unlearning ``compute_undial_loss`` (``src/trainer/utils.py``, used by ``src/trainer/unlearn/undial.py``) is
    this with the whole vocabulary (k = V, exact; ``softmax(teacher_logits - beta * onehot)``), but averaged over
    EVERY position of the sequence: prompt and padding too, where its label -100 indexes the vocabulary from the end
    (it lowers token V-100 there; an IndexError below V = 100). Here the mean is over the answer tokens (the caller's
    mask). With k < V the ids not stored form one tail bucket, as in :func:`kl_sparse` (``q_T = 1 - sum
    exp(ref_logps)``, clamped to ``[tail_floor, 1]``, ``p_T`` = the model's tail mass): the coarse-grained pair's CE,
    a lower bound of the exact one (exact for k >= V - 1).
    Example: V = 2, z = (0, 0), reference q = (1/2, 1/2), y = 0, beta = ln 3 -> q' = (1/4, 3/4),
    L = ln 2 = 0.693147; gradient w.r.t. the logits ``softmax(z) - q'`` (bucket form: ``p_b - q'_b`` spread over a
    bucket's ids in proportion to p) = (1/4, -1/4).
    """
    logp, logq = _buckets(logits, ref_ids, ref_logps, tail_floor)
    shift = F.pad((ref_ids == targets[:, None]).to(logq.dtype), (0, logq.shape[-1] - ref_ids.shape[-1]))
    q_adj = (logq - beta * shift).softmax(-1)
    return -(q_adj * logp).sum(-1)


# ----------------------------------------------------------------------------------------------------------------
# Representation misdirection (RMU, WMDP arXiv 2403.03218)
# ----------------------------------------------------------------------------------------------------------------
def rmu_distance(hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """RMU's per-token distance (WMDP, arXiv 2403.03218, eq. 1-2), [N] from hidden states [N, D] of one layer and
    targets [N, D] (or [D], broadcast): ``d_t = (1/D) ||h_t - target_t||^2``.

    Forget: target = the control vector ``c`` (:func:`rmu_control_vector`); retain: target = the frozen reference's
    hidden state at the same token. The loss of a sequence is the mean of d_t over its answer tokens (the tokens
    themselves: ``labels != -100`` unshifted), and a term the mean over sequences -- open-unlearning
    ``RMU.compute_activation_loss`` (``src/trainer/unlearn/rmu.py``: ``mse(reduction=none).mean(-1)`` summed over the
    masked tokens, divided by their count, mean over the batch). That code divides the [B] sums by the [B, 1] counts,
    a broadcast whose mean is ``mean_b(S_b) * mean_b(1/n_b)``: the same only when every sequence has as many answer
    tokens (tests/test_new_methods.py). WMDP's own code takes a plain MSE over every position, padding included.
    Example: h = (1, 2), target = (0, 0) -> (1 + 4)/2 = 2.5; gradient ``dd/dh = (2/D)(h - target)`` = (1, 2).
    """
    h = _f32(hidden)
    return (h - target.to(h.dtype)).pow(2).mean(-1)


def rmu_control_vector(dim: int, coeff: float, seed: int) -> torch.Tensor:
    """RMU's fixed random direction scaled to norm ``coeff``: ``c = coeff * u / ||u||``, ``u ~ U[0, 1)^D`` drawn from
    a generator seeded with ``seed`` -- the same on every rank and every resume (the WMDP code and open-unlearning draw
    ``torch.rand(1, 1, D)`` from the global generator once per run). [D], float32, on the CPU.
    Example: ``||rmu_control_vector(576, 2.0, 0)|| = 2``."""
    u = torch.rand(dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    return coeff * u / u.norm()
