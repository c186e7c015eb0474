"""Rank split and gather of per-example records, so that an N-rank evaluation equals the 1-rank one.

Every rank gets the same number of examples (strided ``i = rank, rank + world, ...``, padded by wrapping around),
computes per-example records carrying their ``index``, and :func:`gather_records` returns the union ordered by
index with the padding duplicates dropped.  Works with or without an initialized process group.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_world() -> tuple[int, int]:
    if is_dist():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env() -> bool:
    """Initialize torch.distributed when launched by torchrun / the deepspeed launcher (``RANK`` in the env):
    NCCL with CUDA (device = ``LOCAL_RANK``), gloo otherwise.  Returns True when running distributed."""
    if is_dist():
        return True
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 1:
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl")
    else:
        dist.init_process_group(backend="gloo")
    return True


def shard_indices(n: int, rank: int, world: int) -> list[int]:
    """Example indices for ``rank``: strided, padded (wrapping around) so every rank has ``ceil(n / world)``.

    Example: ``n = 5, world = 2`` -> rank 0 ``[0, 2, 4]``, rank 1 ``[1, 3, 0]`` (the trailing 0 is padding).
    """
    if n == 0:
        return []
    per_rank = -(-n // world)
    return [(rank + k * world) % n for k in range(per_rank)]


def gather_records(records: list[dict]) -> list[dict]:
    """All ranks' records (dicts with an integer ``"index"``), ordered by index, first copy of each index kept.
    Returned on every rank."""
    if is_dist() and dist.get_world_size() > 1:
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, records)
        records = [r for part in parts for r in part]
    out, seen = [], set()
    for r in sorted(records, key=lambda r: r["index"]):
        if r["index"] not in seen:
            seen.add(r["index"])
            out.append(r)
    return out


def max_across_ranks(value: int, device: torch.device | str = "cpu") -> int:
    """The maximum of an integer over ranks (to run the same number of forward passes everywhere)."""
    if not (is_dist() and dist.get_world_size() > 1):
        return value
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def barrier() -> None:
    if is_dist():
        dist.barrier()
