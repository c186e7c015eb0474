"""A resumable, rank-sharded batch stream: its position is two integers, so resume is exact.

Epoch e's order is ``randperm(n, seed + e)``, padded by wrap-around to a multiple of the world size and dealt to
ranks like ``torch.utils.data.DistributedSampler``; the stream cycles through epochs forever (the retain set is
sampled with its own stream and seed).
"""

from __future__ import annotations

import torch


class BatchStream:
    def __init__(self, dataset, batch_size: int, rank: int, world: int, seed: int, collate, shuffle: bool = True):
        self.dataset, self.batch_size, self.rank, self.world = dataset, batch_size, rank, world
        self.seed, self.collate, self.shuffle = seed, collate, shuffle
        self.epoch, self.pos = 0, 0
        n = len(dataset)
        if n == 0:
            raise ValueError(f"{getattr(dataset, 'source', 'a dataset')}: no examples to train on (an empty data set); "
                             "check its data.*.source / config")
        self.per_rank = -(-n // world)
        self.batches_per_epoch = -(-self.per_rank // batch_size)
        self._order = None

    def _indices(self) -> list[int]:
        n = len(self.dataset)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(n))
        order += order[: self.per_rank * self.world - n]  # wrap-around padding, as DistributedSampler
        return order[self.rank::self.world]

    def next(self) -> dict:
        if self._order is None:
            self._order = self._indices()
        idx = self._order[self.pos * self.batch_size:(self.pos + 1) * self.batch_size]
        self.pos += 1
        if self.pos >= self.batches_per_epoch:
            self.epoch, self.pos, self._order = self.epoch + 1, 0, None
        return self.collate([self.dataset[i] for i in idx])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos, self._order = int(state["epoch"]), int(state["pos"]), None
        if self.pos >= self.batches_per_epoch:  # saved with another batch size (train.resume=force): next epoch
            self.epoch, self.pos = self.epoch + 1, 0
