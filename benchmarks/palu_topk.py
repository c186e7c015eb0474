"""Micro-benchmark (not a test): PALU's sensitive-position loss, top-K path vs dense logits, on CPU.

    python benchmarks/palu_topk.py                      # V in (128256, 32000), d=2048, K=5000, N=64 positions
    python benchmarks/palu_topk.py --k 5000 1000 250    # sweep K to find the crossover
    python benchmarks/palu_topk.py --quick              # small sizes, a few seconds

Times forward + backward (gradients to the hidden states and the lm_head weight) of
  dense:  z = h W^T + b ([N, V]), then palu_local_entropy(z, topk_ids)
  top-K:  palu_local_entropy_topk(h, W, topk_ids, b)  (gathered rows + bmm, chunked over positions)
and prints one markdown table row per (V, K): best of --repeats interleaved runs, and their ratio.
"""

from __future__ import annotations

import argparse
import time

import torch

from palu_ds.losses import palu_local_entropy, palu_local_entropy_topk


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
