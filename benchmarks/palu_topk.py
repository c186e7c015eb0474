"""Micro-benchmark (not a test): PALU's sensitive-position loss, top-K path vs dense logits, on CPU.

    python benchmarks/palu_topk.py                      # V in (128256, 32000), d=2048, K=5000, N=64 positions
    python benchmarks/palu_topk.py --k 5000 1000 250    # sweep K to find the crossover
    python benchmarks/palu_topk.py --quick              # small sizes, a few seconds

Times forward + backward (gradients to the hidden states and the lm_head weight) of
  dense:  z = h W^T + b ([N, V]), then palu_local_entropy(z, topk_ids)
  top-K:  palu_local_entropy_topk(h, W, topk_ids, b)  (gathered rows + bmm, chunked over positions)
and prints one markdown table row per (V, K): best of --repeats interleaved runs, and their ratio.

The top-K path lives here, not in the library: at K = 5000 it runs at 0.56x the dense speed (BENCHMARKS.md), so the
engine never took it (issue 15, item 7).  Its math is tested in tests/test_palu_topk.py against the dense
:func:`palu_ds.losses.palu_local_entropy`.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from palu_ds.losses import palu_local_entropy


# ---------------------------------------------------------------------------------------------- the top-K path
def _chunk_rows(k: int, d: int, max_chunk_elems: int) -> int:
    return max(1, max_chunk_elems // max(1, k * d))


class _TopKLogitsAndMean(torch.autograd.Function):
    """``z[n, k] = h_n . W[ids[n, k]]`` and ``c[n] = h_n . mean_v(W_v)`` without the V-wide logits.

    Forward gathers rows (``index_select`` into one reused buffer -- ``F.embedding`` semantics without a fresh
    allocation per chunk) and contracts them with ``bmm``, a chunk of positions at a time; only
    ``hidden``, ``ids``, ``mean(W)`` (and a handle on ``W``) are kept, so memory is O(chunk K d), never O(N K d).
    Backward: ``dh_n = sum_k gz[n,k] W[ids[n,k]] + gc_n mean(W)`` (fused ``embedding_bag``, no [n, K, d] temporary);
    ``dW = (1/V) sum_n gc_n h_n`` broadcast to every row (one write of the dense gradient), then
    ``dW[ids[n,k]] += gz[n,k] h_n`` (``index_add_``, chunked).
    """

    @staticmethod
    def forward(ctx, hidden, weight, ids, chunk):
        dt = torch.promote_types(hidden.dtype, torch.float32)
        w_mean = weight.mean(0, dtype=dt)
        c = hidden.to(dt) @ w_mean
        z = hidden.new_empty(ids.shape)
        buf = weight.new_empty(min(chunk, ids.shape[0]) * ids.shape[1], weight.shape[1])  # reused: no page faults
        for s in range(0, ids.shape[0], chunk):
            i = ids[s:s + chunk]
            rows = torch.index_select(weight, 0, i.reshape(-1), out=buf[:i.numel()]).view(*i.shape, -1)  # [n, K, d]
            z[s:s + chunk] = torch.bmm(rows, hidden[s:s + chunk, :, None].to(weight.dtype)).squeeze(-1)
        ctx.save_for_backward(hidden, weight, ids, w_mean)
        ctx.chunk = chunk
        return z, c

    @staticmethod
    def backward(ctx, gz, gc):
        hidden, weight, ids, w_mean = ctx.saved_tensors
        gz = gz.to(weight.dtype)
        gh = gw = None
        if ctx.needs_input_grad[0]:
            gh = F.embedding_bag(ids, weight, mode="sum", per_sample_weights=gz).to(w_mean.dtype)
            gh = (gh + gc[:, None] * w_mean).to(hidden.dtype)
        if ctx.needs_input_grad[1]:
            row = (gc @ hidden.to(gc.dtype)) / weight.shape[0]
            gw = row.to(weight.dtype).expand_as(weight).contiguous()
            buf = weight.new_empty(min(ctx.chunk, ids.shape[0]) * ids.shape[1], weight.shape[1])
            for s in range(0, ids.shape[0], ctx.chunk):
                g, h, i = gz[s:s + ctx.chunk], hidden[s:s + ctx.chunk].to(weight.dtype), ids[s:s + ctx.chunk]
                outer = torch.mul(g[:, :, None], h[:, None, :], out=buf[:i.numel()].view(*i.shape, -1))
                gw.index_add_(0, i.reshape(-1), outer.flatten(0, 1))
        return gh, gw, None, None


def topk_logits_and_mean(hidden, weight, ids, bias=None, max_chunk_elems: int = 1 << 25):
    """``(z, c)``: ``z[n, k] = h_n . W[ids[n, k]] + b[ids[n, k]]`` ([N, K]) and the full-vocabulary mean logit
    ``c[n] = h_n . mean(W) + mean(b)`` ([N]) -- never forming the [N, V] logits.  ``max_chunk_elems // (K d)``
    positions are gathered at a time (forward and backward)."""
    chunk = _chunk_rows(ids.shape[-1], hidden.shape[-1], max_chunk_elems)
    z, c = _TopKLogitsAndMean.apply(hidden, weight, ids, chunk)
    z = z.to(c.dtype)
    if bias is not None:
        z = z + bias[ids].to(c.dtype)
        c = c + bias.to(c.dtype).mean()
    return z, c


def palu_local_entropy_topk(hidden: torch.Tensor, weight: torch.Tensor, topk_ids: torch.Tensor,
                            bias: torch.Tensor | None = None, detach_target: bool = False,
                            max_chunk_elems: int = 1 << 25) -> torch.Tensor:
    """:func:`palu_local_entropy` from last hidden states, never forming the V-wide logits; [N] from [N, d].

    With ``z_t = W h_t + b`` (``W`` = lm_head weight [V, d]):  ``c_t = h_t . mean_v(W_v) + mean(b)`` and
    ``z_{t,i} = h_t . W_i + b_i`` for the K reference ids only (:func:`topk_logits_and_mean`).  Equal to the dense
    form up to rounding (tests/test_palu_topk.py).  Cost: O(N K d) gathered memory traffic + one pass over W for its mean and one
    write of its (dense) gradient, instead of the O(N V d) GEMMs of the dense path; memory bounded by
    ``max_chunk_elems``.  Which is faster depends on K/V and the machine (:func:`bench` below).
    """
    z, c = topk_logits_and_mean(hidden, weight, topk_ids, bias, max_chunk_elems)
    if detach_target:
        c = c.detach()
    return (z - c[:, None]).pow(2).mean(-1)


def _best_times(fns, repeats: int) -> list[float]:
    """Best wall time of each function, the runs interleaved so that a noisy neighbour hits all of them alike."""
    for fn in fns:
        fn()                                                 # warm-up
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for j, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[j] = min(best[j], time.perf_counter() - t0)
    return best


def bench(V: int, d: int, K: int, N: int, repeats: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    K = min(K, V)
    W = (torch.randn(V, d, generator=g) * d ** -0.5).to(dtype).requires_grad_()
    b = torch.zeros(V, dtype=dtype, requires_grad=True)
    h = torch.randn(N, d, generator=g).to(dtype).requires_grad_()
    # reference top-K ids: a skewed draw (frequent tokens overlap across positions, as in a real LM)
    ids = torch.stack([torch.multinomial(torch.arange(V, 0, -1).float() ** 2, K, generator=g) for _ in range(N)])

    def dense():
        W.grad = b.grad = h.grad = None
        palu_local_entropy(h @ W.T + b, ids).sum().backward()

    def topk():
        W.grad = b.grad = h.grad = None
        palu_local_entropy_topk(h, W, ids, b).sum().backward()

    with torch.no_grad():
        diff = (palu_local_entropy(h @ W.T + b, ids) - palu_local_entropy_topk(h, W, ids, b)).abs().max().item()
    td, tk = _best_times([dense, topk], repeats)
    return td, tk, diff


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (V=8000/4000, d=256, K=500, N=16), seconds")
    p.add_argument("--vocab", type=int, nargs="*", default=None)
    p.add_argument("--d", type=int, default=2048)
    p.add_argument("--k", type=int, nargs="*", default=[5000], help="top-K size(s); several values sweep K")
    p.add_argument("--n", type=int, default=64, help="number of sensitive positions (I_init tokens in the batch)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.quick:
        vocab, d, ks, N, repeats = a.vocab or [8000, 4000], 256, [500], 16, 2
    else:
        vocab, d, ks, N, repeats = a.vocab or [128256, 32000], a.d, a.k, a.n, a.repeats
    print(f"# PALU sensitive loss, fwd+bwd, CPU threads={torch.get_num_threads()}, fp32; ratio > 1: top-K faster")
    print("| V | d | K | N | dense (ms) | top-K (ms) | dense / top-K | max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    for V in vocab:
        for K in ks:
            td, tk, diff = bench(V, d, K, N, repeats)
            print(f"| {V} | {d} | {min(K, V)} | {N} | {td * 1e3:.1f} | {tk * 1e3:.1f} | {td / tk:.2f}x | {diff:.1e} |",
                  flush=True)


if __name__ == "__main__":
    main()
