"""The top-K hidden-state form of PALU's local loss (benchmarks/palu_topk.py, outside the library): equal to the
dense :func:`palu_ds.losses.palu_local_entropy` in value and gradient, chunked or not."""
import pytest
import torch

from benchmarks import palu_topk as P
from palu_ds import losses as L


@pytest.mark.parametrize("detach", [False, True])
@pytest.mark.parametrize("chunk_elems", [1, 1 << 25])     # one position per chunk, and everything at once
def test_palu_topk_path_equals_dense(detach, chunk_elems):
    g = torch.Generator().manual_seed(1)
    N, V, d, K = 7, 50, 6, 12
    h = torch.randn(N, d, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(V, d, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(N)])
    dense = L.palu_local_entropy(h @ W.T + b, ids, detach)
    topk = P.palu_local_entropy_topk(h, W, ids, b, detach, max_chunk_elems=chunk_elems)
    assert torch.allclose(dense, topk, rtol=1e-5, atol=1e-6)
    w = torch.rand(N, generator=g, dtype=torch.float64)      # a weighted sum exercises per-position gradients
    gd = torch.autograd.grad((dense * w).sum(), (h, W, b))
    gt = torch.autograd.grad((topk * w).sum(), (h, W, b))
    for a, c in zip(gd, gt):
        assert torch.allclose(a, c, rtol=1e-5, atol=1e-6)


def test_topk_logits_and_mean_gradcheck_and_empty():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(10, 4, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[0, 3, 9], [3, 3, 1], [9, 8, 7]])      # repeated ids accumulate in dW
    bias = torch.randn(10, generator=g, dtype=torch.float64, requires_grad=True)
    fn = lambda a, b, c: P.topk_logits_and_mean(a, b, ids, c, max_chunk_elems=8)
    assert torch.autograd.gradcheck(fn, (h, W, bias))
    z, c = fn(h, W, bias)
    assert torch.allclose(z, (h @ W.T + bias).gather(1, ids)) and torch.allclose(c, (h @ W.T + bias).mean(-1))
    e = P.palu_local_entropy_topk(h[:0], W, ids[:0])
    e.sum().backward()
    assert e.shape == (0,) and W.grad is not None
