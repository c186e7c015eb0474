"""Math tier: every loss on hand-picked tensors (expected values derived in the losses' docstrings), its gradient,
PALU dense == top-K, the aggregation across two simulated ranks, and the sparse-KL error on a trained tiny model."""

import math

import pytest
import torch
import torch.nn.functional as F

from palu_ds import losses as L

torch.set_default_dtype(torch.float32)


def _grad(fn, x):
    x = x.detach().clone().requires_grad_()
    fn(x).sum().backward()
    return x.grad


# ---------------------------------------------------------------------------------------------- aggregation
def test_aggregate_hand_values():
    v = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    m = torch.tensor([[True, False], [True, True]])
    assert L.aggregate_loss(v, m).item() == pytest.approx(8 / 3)
    assert L.aggregate_loss(v, m, normalizer=4).item() == pytest.approx(2.0)
    assert L.aggregate_loss(v, m, normalizer=torch.tensor(4)).item() == pytest.approx(2.0)
    assert L.aggregate_loss(v).item() == pytest.approx(2.5)
    # masked-out NaNs do not leak; an empty selection is 0 and stays differentiable
    assert L.aggregate_loss(torch.tensor([1.0, float("nan")]), torch.tensor([True, False])).item() == 1.0
    e = torch.zeros(0, requires_grad=True)
    out = L.aggregate_loss(e)
    out.backward()
    assert out.item() == 0.0 and e.grad is not None


def test_aggregate_split_across_two_ranks_equals_full_batch():
    """Per-rank losses with the global count add up to the full-batch loss, and so do their gradients."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 7, 13, generator=g, requires_grad=True)
    labels = torch.randint(0, 13, (4, 7), generator=g)
    labels[:, :2] = -100
    labels[1, 5:] = -100                                   # uneven answer lengths across rows and ranks
    full = L.nll_loss(logits, labels)
    (g_full,) = torch.autograd.grad(full, logits)
    n_global = (labels != -100).sum()
    parts = [L.nll_loss(logits[r], labels[r], normalizer=n_global) for r in (slice(0, 1), slice(1, 4))]
    assert torch.allclose(sum(parts), full, atol=1e-6)
    (g_split,) = torch.autograd.grad(sum(parts), logits)
    assert torch.allclose(g_split, g_full, atol=1e-7)
    # the local-count default is NOT additive (that is why the engine passes global counts)
    local = [L.nll_loss(logits[r], labels[r]) for r in (slice(0, 1), slice(1, 4))]
    assert not torch.allclose(sum(local), full)


# ---------------------------------------------------------------------------------------------- NLL / GA
def test_nll_uniform_is_log_v_and_gradient():
    logits = torch.zeros(1, 3, 4)
    labels = torch.tensor([[-100, 2, 1]])
    assert L.nll_loss(logits, labels).item() == pytest.approx(math.log(4))
    assert L.sequence_logps(logits, labels).item() == pytest.approx(-2 * math.log(4))
    gr = _grad(lambda z: L.nll_loss(z, labels), logits)
    expect = torch.full((1, 3, 4), 0.25)
    expect[0, 0] = 0
    expect[0, 1, 2] -= 1
    expect[0, 2, 1] -= 1
    assert torch.allclose(gr, expect / 2)                  # (softmax - onehot) / |A|


def test_token_logps_low_precision_input():
    logits = torch.randn(2, 3, 5).bfloat16()
    labels = torch.tensor([[0, 1, -100], [2, -100, -100]])
    out = L.token_logps(logits, labels)
    assert out.dtype == torch.float32 and out[0, 2] == 0 and out[1, 1] == 0
    assert torch.allclose(out[0, 0], F.log_softmax(logits.float()[0, 0], -1)[0])


# ---------------------------------------------------------------------------------------------- PALU
def test_palu_local_entropy_hand_value_and_gradient():
    z = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    idx = torch.tensor([[3, 2]])
    assert L.palu_local_entropy(z, idx).item() == pytest.approx(4.5)
    assert L.palu_local_entropy(z, idx, detach_target=True).item() == pytest.approx(4.5)
    assert torch.allclose(_grad(lambda t: L.palu_local_entropy(t, idx), z), torch.tensor([[-.75, -.75, -.75, 2.25]]))
    assert torch.allclose(_grad(lambda t: L.palu_local_entropy(t, idx, True), z), torch.tensor([[0., 0., 0., 3.]]))
    zz = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    ids = torch.stack([torch.randperm(9)[:4] for _ in range(3)])
    assert torch.autograd.gradcheck(lambda t: L.palu_local_entropy(t, ids), (zz,))


def test_topk_ids_clipped_to_vocab():
    z = torch.tensor([[0.1, 3.0, 2.0]])
    assert L.topk_ids(z, 5000).tolist() == [[1, 2, 0]]


# ---------------------------------------------------------------------------------------------- KL
def test_kl_exact_hand_values_and_gradient():
    z = torch.zeros(1, 2)                                   # p = (1/2, 1/2)
    q = torch.tensor([[0.25, 0.75]]).log()
    assert L.kl_exact(z, q).item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-6)
    assert L.kl_exact(z, q, "reverse").item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), abs=1e-6)
    with pytest.raises(ValueError):
        L.kl_exact(z, q, "sideways")
    zz = torch.randn(3, 6)
    qq = torch.randn(3, 6)
    p, lp, lq = zz.softmax(-1), zz.log_softmax(-1), qq.log_softmax(-1)
    kl = (p * (lp - lq)).sum(-1, keepdim=True)
    assert torch.allclose(_grad(lambda t: L.kl_exact(t, qq), zz), p * (lp - lq - kl), atol=1e-6)


def test_kl_sparse_hand_value_and_exact_limits():
    z = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    ids, logps = torch.tensor([[0, 1]]), torch.tensor([[0.5, 0.25]]).log()
    expect = 0.4 * math.log(0.8) + 0.6 * math.log(1.2)
    assert L.kl_sparse(z, ids, logps).item() == pytest.approx(expect, abs=1e-6)
    rev = 0.5 * math.log(0.5 / 0.4) + 0.25 * math.log(0.25 / 0.3) + 0.25 * math.log(0.25 / 0.3)
    assert L.kl_sparse(z, ids, logps, "reverse").item() == pytest.approx(rev, abs=1e-6)
    # exact when the tail holds at most one token (k = V - 1, k = V), a lower bound otherwise
    g = torch.Generator().manual_seed(3)
    zz, rr = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    for direction in ("forward", "reverse"):
        exact = L.kl_exact(zz, rr, direction)
        for k in (7, 8):
            i = L.topk_ids(rr, k)
            assert torch.allclose(L.kl_sparse(zz, i, rr.log_softmax(-1).gather(1, i), direction), exact, atol=1e-5)
        i = L.topk_ids(rr, 3)
        assert (L.kl_sparse(zz, i, rr.log_softmax(-1).gather(1, i), direction) <= exact + 1e-6).all()


def test_kl_sparse_gradient():
    g = torch.Generator().manual_seed(4)
    zz = torch.randn(4, 9, generator=g, dtype=torch.float64)
    rr = torch.randn(4, 9, generator=g)
    for k in (3, 9):
        i = L.topk_ids(rr, k)
        lq = rr.log_softmax(-1).gather(1, i)
        got = _grad(lambda t: L.kl_sparse(t, i, lq), zz)
        assert torch.isfinite(got).all()
        # autograd of the bucketed KL written out by hand: p_b = sum of softmax over bucket b
        t = zz.clone().requires_grad_()
        p = t.softmax(-1)
        pb = p.gather(1, i)
        qb = lq.double().exp()
        if k < 9:
            pb = torch.cat([pb, 1 - pb.sum(-1, keepdim=True)], -1)
            qb = torch.cat([qb, 1 - qb.sum(-1, keepdim=True)], -1)
        (pb * (pb.log() - qb.log())).sum().backward()
        assert torch.allclose(got.double(), t.grad, atol=1e-5)


def test_kl_sparse_error_on_trained_tiny_model(capsys):
    """Approximation error of the sparse KL (reference top-k + tail bucket) against the exact KL, reported.

    Tiny LM: embedding -> linear over V=512, trained on a Markov chain with Zipfian successors and a Zipfian unigram
    background (an LLM-like heavy tail).  'Current' model = the reference after gradient ascent on a forget subset
    (a moderate, then an aggressive unlearning move).  The sparse form is a lower bound; its gap is reported.
    """
    torch.manual_seed(0)
    V, d, T = 512, 32, 24
    succ = torch.randint(0, V, (V, 16))
    succ_p = 1 / torch.arange(1, 17.0)
    unigram = 1 / torch.arange(1, V + 1.0)
    x = torch.multinomial(unigram, 256, replacement=True)[:, None]
    for _ in range(T - 1):
        nxt = succ[x[:, -1], torch.multinomial(succ_p, 256, replacement=True)]
        bg = torch.rand(256) < 0.1
        nxt = torch.where(bg, torch.multinomial(unigram, 256, replacement=True), nxt)
        x = torch.cat([x, nxt[:, None]], 1)
    model = torch.nn.Sequential(torch.nn.Embedding(V, d), torch.nn.Linear(d, V))
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(120):
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 4.0                                 # trained (uniform would be ln 512 = 6.24)
    with torch.no_grad():
        ref_logits = model(x[:, :-1]).flatten(0, 1)
    rows = []
    for move, (steps, lr) in {"moderate": (10, 1.0), "aggressive": (10, 3.0)}.items():
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        for _ in range(steps):                               # gradient ascent on a forget subset
            loss = -F.cross_entropy(model(x[:32, :-1]).flatten(0, 1), x[:32, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            cur = model(x[:, :-1]).flatten(0, 1)
        for direction in ("forward", "reverse"):
            exact = L.kl_exact(cur, ref_logits, direction).mean().item()
            g_exact = _grad(lambda z: L.kl_exact(z, ref_logits, direction).mean(), cur).flatten()
            for k in (8, 32, 128):
                i = L.topk_ids(ref_logits, k)
                lq = ref_logits.log_softmax(-1).gather(1, i)
                sparse = L.kl_sparse(cur, i, lq, direction).mean().item()
                g_sparse = _grad(lambda z: L.kl_sparse(z, i, lq, direction).mean(), cur).flatten()
                cos = F.cosine_similarity(g_exact, g_sparse, dim=0).item()
                assert sparse <= exact + 1e-5
                rows.append((move, direction, k, exact, sparse, (exact - sparse) / exact, cos))
    with capsys.disabled():
        print("\nsparse KL vs exact on a trained tiny LM (V=512, mean over 5888 positions):")
        for r in rows:
            print("  %-10s %-7s k=%-3d exact=%.4f sparse=%.4f rel.err=%5.2f%%  grad cosine=%.4f"
                  % (*r[:5], 100 * r[5], r[6]))
    err = {r[:3]: r[5] for r in rows}
    for move in ("moderate", "aggressive"):
        assert err[(move, "forward", 8)] >= err[(move, "forward", 128)] - 1e-6   # more ids, smaller gap
        assert err[(move, "forward", 128)] < 0.05


# ---------------------------------------------------------------------------------------------- flattening
def test_logit_margin_flat_hand_value_and_gradient():
    z = torch.tensor([[3.0, 0.0, 0.0, 1.0]])
    assert L.logit_margin_flat(z).item() == pytest.approx(4.0)
    assert torch.allclose(_grad(L.logit_margin_flat, z), torch.tensor([[3.0, -1.0, -1.0, -1.0]]))
    assert L.logit_margin_flat(torch.zeros(2, 3, 5)).abs().max() == 0   # already uniform: minimum


def test_flattening_gradient_does_not_vanish_where_entropy_does():
    V = 32
    z = torch.zeros(1, V)
    z[0, 0] = 60.0                                           # near one-hot: p_0 = 1 - 31 e^-60
    neg_entropy = lambda t: (t.softmax(-1) * t.log_softmax(-1)).sum(-1)
    g_ent = _grad(neg_entropy, z)
    g_flat = _grad(L.logit_margin_flat, z)
    assert g_ent.abs().max() < 1e-20
    assert g_flat[0, 0] == pytest.approx(2 * (60 - 60 / V) * (1 - 1 / V), rel=1e-5)


# ---------------------------------------------------------------------------------------------- NPO / SimNPO / DPO
def test_npo_hand_value_and_gradient():
    lp, ref = torch.tensor([-5.0, -5.0]), torch.tensor([-5.0, -3.0])
    out = L.npo_loss(lp, ref, beta=0.1)
    assert out[0].item() == pytest.approx(20 * math.log(2), rel=1e-6)
    assert out[1].item() == pytest.approx(-20 * math.log(1 / (1 + math.exp(-0.2))), rel=1e-6)
    gr = _grad(lambda t: L.npo_loss(t, ref, 0.1), lp)
    assert gr[0].item() == pytest.approx(1.0, rel=1e-6)     # 2 sigmoid(beta * 0)
    assert gr[1].item() == pytest.approx(2 / (1 + math.exp(0.2)), rel=1e-6)


def test_simnpo_hand_value_and_gradient():
    lp, n = torch.tensor([-6.0]), torch.tensor([3])
    assert L.simnpo_loss(lp, n, beta=1.0).item() == pytest.approx(2 * math.log(1 + math.exp(-2)), rel=1e-6)
    assert _grad(lambda t: L.simnpo_loss(t, n, 1.0), lp).item() == pytest.approx(2 / 3 / (1 + math.exp(2)), rel=1e-5)
    # delta shifts the average NLL: beta(2 - 0.5) = 1.5
    assert L.simnpo_loss(lp, n, 1.0, 0.5).item() == pytest.approx(2 * math.log(1 + math.exp(-1.5)), rel=1e-6)


def test_dpo_hand_value_and_gradient():
    c, r = torch.tensor([-4.0]), torch.tensor([-2.0])
    assert L.dpo_loss(c, r, c, r, beta=0.1).item() == pytest.approx(20 * math.log(2), rel=1e-6)
    cc, rr = c.clone().requires_grad_(), r.clone().requires_grad_()
    L.dpo_loss(cc, rr, c, r, 0.1).sum().backward()
    assert cc.grad.item() == pytest.approx(-1.0) and rr.grad.item() == pytest.approx(1.0)
    # margin m = 1 - (-1) = 2: -(2/beta) log sigmoid(2 beta)
    assert L.dpo_loss(c + 1, r - 1, c, r, 0.5).item() == pytest.approx(4 * math.log(1 + math.exp(-1)), rel=1e-6)
