"""The bf16 dither of the starting weights (``train.bf16_dither``): each trainable weight of the ``nn.Linear`` modules
moved to a uniformly random point of its bf16 rounding cell, its bf16 value unchanged.

Why (BENCHMARKS, issue 29, "which products carry the lag"): under bf16 autocast every product rounds the fp32 weight
to bf16 afresh, so it sees AdamW's updates (about lr a step, far below bf16's resolution of 2^-7..2^-8 of a weight)
only when a weight's drift carries it across a rounding boundary.  A weight whose offset inside its cell is uniform
crosses with probability drift / ulp, so the products follow the fp32 weights on average; a weight that sits exactly
on the bf16 grid -- as every weight of a checkpoint stored in bf16 does, and 20.7% of SmolLM2-135M's as imported from
its GGUF -- must first drift half an ulp (about 50 steps at lr 1e-5 for |w| ~ 0.13) before any product sees it move.
Measured on SmolLM2 (palu, 30 steps, lr 1e-5): bf16's objective lagged fp32's by up to 12.3%; rounding only the
products' weights to bf16 reproduces that lag (11.0%), rounding only their inputs does not (1.0%); from a dithered
start bf16 follows fp32's curve far closer (``python -m benchmarks.real_model_throughput --bf16-dither``; BENCHMARKS).

What changes: the weights of the ``nn.Linear`` modules (what autocast multiplies in bf16) move by less than half a
bf16 ulp each, below what any bf16 product (or a bf16 copy of the model) can see; the bf16 model at step 0 is the
same (a tied LM head's weight is the embedding's too, whose fp32 lookup does see its dither).  Only at a fresh start
(a resumed run loads its checkpoint's weights over them); the noise of a weight depends only on ``train.seed`` and
its name, so the dither does not depend on the world size or the ZeRO stage.
"""

from __future__ import annotations

import zlib

import torch


def bf16_dither(w: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``w`` (fp32) with each element moved to a uniformly random point of its bf16 rounding cell.

    Formula: ``b = bf16(w)``, ``ulp = 2^(floor(log2 |b|) - 7)`` (the spacing of bf16 values at ``b``),
    ``out = b + (u - 1/2) * ulp`` with ``u ~ U[0, 1)`` drawn from ``generator``; an element whose ``out`` would round
    elsewhere (at a power of two the cell below is half as wide; a tie), and zeros and non-finite elements, keep
    ``w``.  So ``bf16(out) == bf16(w)`` everywhere and ``|out - w| < ulp``.

    Worked example: ``w = 1.0`` (on the grid; ulp 2^-7 = 0.0078125): ``u = 0.75`` gives ``1.001953125``, which still
    rounds to 1.0 in bf16; ``u = 0.1`` gives ``0.996875``, which would round to the bf16 value 0.99609375 below
    (the spacing there is 2^-8), so that element keeps 1.0.

    Gradient: none -- applied once to the starting weights, outside autograd.
    """
    b = w.to(torch.bfloat16)
    bf = b.float()
    ulp = torch.exp2(torch.floor(torch.log2(bf.abs())) - 7)
    noise = torch.rand(w.shape, generator=generator, dtype=torch.float32).to(w.device)
    out = bf + (noise - 0.5) * ulp
    keep = (bf == 0) | ~torch.isfinite(bf) | (out.to(torch.bfloat16) != b)
    return torch.where(keep, w, out)


def dither_model(model: torch.nn.Module, seed: int) -> int:
    """:func:`bf16_dither` of the trainable parameters of ``model``'s ``nn.Linear`` modules (the weights autocast
    multiplies in bf16, a tied LM head's with them; norms and embedding lookups run in fp32 and see every update), in
    place (ZeRO-3: gathered, modified on rank 0 and partitioned again); the generator of each is seeded with the
    CRC-32 of ``"<seed>/<name>"``.  Returns the number of elements dithered."""
    import deepspeed

    in_products = {id(p) for m in model.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters()}
    count = 0
    for name, p in model.named_parameters():
        if not (id(p) in in_products and p.requires_grad and p.is_floating_point()):
            continue
        g = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{name}".encode()))
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=hasattr(p, "ds_id")):
            with torch.no_grad():
                p.data.copy_(bf16_dither(p.data, g))
            count += p.numel()
    return count
